"""The storage seam over a folder of files: :class:`LocalStorage`.

A store may come from someone else. Every file is opened with ``O_NONBLOCK |
O_NOFOLLOW`` and checked with ``fstat`` (:func:`open_regular`), so a FIFO never
blocks and a symlink is never followed; paths are resolved and must stay inside
the root (:func:`check_inside`) before anything is read, written or deleted.
zarr-python reads and writes the same folder through :class:`SafeLocalStore`,
which applies the same rules.

Writes are atomic: a temporary file (named with host and pid, so a resuming
writer removes only temporaries of dead processes) renamed over the target
(``put``), hard-linked into place (``put_if_absent``: fails atomically if
another writer got there first), or renamed after checking the target's
``(inode, size, mtime)`` under an ``flock`` of its folder (``put_if_version``).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer as ZarrBuffer
from zarr.core.buffer import BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from ..format import META_NAME, FormatError, chunk_array_parts
from .base import (
    AlreadyExistsError,
    Buffer,
    FileInProgress,
    Storage,
    TemporaryFileLost,
    VersionMismatchError,
    check_key,
    check_prefix,
    coalesce_ranges,
)

__all__ = [
    "LocalStorage",
    "SafeLocalStore",
    "UnsafeFileError",
    "check_inside",
    "open_regular",
    "host_tag",
    "PARTIAL_MAX_AGE_S",
    "remove_store_files",
]

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

PARTIAL_MAX_AGE_S = 7 * 24 * 3600
"""A temporary ``.partial`` file of another host (or of unknown origin) is removed only when older than this."""

PARTIAL_NAME = re.compile(r"^\.(?P<name>[^.]+)\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[0-9a-f]+\.partial$")


class UnsafeFileError(FormatError):
    """A file of the store is not a regular file inside the store (a symlink, FIFO, device, or a path leading out)."""


# ------------------------------------------------------------------ file rules


def _within(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def check_inside(path: str | os.PathLike[str], root_real: str) -> None:
    """Raise :class:`UnsafeFileError` unless ``path`` (resolved through symlinks) lies inside ``root_real``.

    ``path`` need not exist: its deepest existing ancestor is checked.
    """
    probe = os.path.abspath(os.fspath(path))
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    real = os.path.realpath(probe)
    # the deepest existing part is inside the root, or (before the root exists) one of its ancestors
    if not _within(real, root_real) and not _within(root_real, real):
        raise UnsafeFileError(
            f"{path} leads outside the store ({real} is not inside {root_real}): a symbolic link in the "
            "store points elsewhere. vlastore never reads, writes or deletes outside a store; remove the link"
        )


def open_regular(path: str | os.PathLike[str], root_real: str | None = None) -> int | None:
    """A read-only file descriptor of ``path``, or None when it does not exist.

    Opened with ``O_NONBLOCK | O_NOFOLLOW`` and checked with ``fstat``, so a FIFO
    never blocks and a symlink is never followed.

    Raises:
        UnsafeFileError: ``path`` is a symlink, not a regular file, or (with
            ``root_real``) lies outside that folder.
    """
    if root_real is not None:
        check_inside(os.path.dirname(os.path.abspath(os.fspath(path))), root_real)
    try:
        fd = os.open(path, os.O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link; vlastore opens only regular files in a store") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFileError(
            f"{path} is not a regular file (a {_kind(st.st_mode)}); the store is damaged or was tampered with"
        )
    return fd


def _pread_span(fd: int, start: int, end: int | None) -> bytes:
    """Bytes ``[start, end)`` of an open file, clipped to its size (``start < 0``, no ``end``: the last ``-start``)."""
    size = os.fstat(fd).st_size
    if start < 0:
        start, end = max(0, size + start), size
    end = size if end is None else min(end, size)
    if end <= start:
        return b""
    parts = []
    while start < end:  # pread may return less than asked for (large reads, signals)
        part = os.pread(fd, end - start, start)
        if not part:
            break
        parts.append(part)
        start += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _version_of(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def host_tag() -> str:
    """This host's name as it appears in temporary file names."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _as_bytes_view(data: Buffer) -> memoryview:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    return memoryview(data).cast("B")


class _FolderLock:
    """An exclusive ``flock`` on a folder (no lock file in the store); a no-op where folders cannot be locked."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd = -1

    def __enter__(self) -> _FolderLock:
        try:
            self.fd = os.open(self.folder, os.O_RDONLY | O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)


# ------------------------------------------------------------------- storage


class LocalStorage(Storage):
    """Files under one folder (the root): the storage of a local store.

    Args:
        root: the folder (need not exist yet: the first write creates it).
        fsync: fsync every file and its folder before a write returns (see :meth:`durable`).
    """

    is_local = True

    def __init__(self, root: str | os.PathLike[str], fsync: bool = False) -> None:
        self.root = Path(os.fspath(root)).expanduser().absolute()
        self.location = str(self.root)
        self.fsync = fsync
        self._zarr: SafeLocalStore | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalStorage, (str(self.root), self.fsync))

    @property
    def root_real(self) -> str:
        """The root with every symlink resolved (paths must stay inside it)."""
        return os.path.realpath(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def where(self, key: str) -> str:
        return str(self.root / key) if key else self.location

    def durable(self) -> LocalStorage:
        if self.fsync:
            return self
        return LocalStorage(self.root, fsync=True)

    # ------------------------------------------------------------------ reads

    def _open(self, key: str) -> int | None:
        return open_regular(self._path(key), self.root_real)

    def get(self, key: str) -> bytes | None:
        return self.get_range(key, 0)

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        fd = self._open(key)
        if fd is None:
            return None
        try:
            return _pread_span(fd, start, end)
        finally:
            os.close(fd)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        ranges = [(int(a), int(b)) for a, b in ranges]
        runs = coalesce_ranges(ranges)
        fd = self._open(key)
        if fd is None:
            raise FileNotFoundError(f"{self.where(key)}: no such file")
        out = [b""] * len(ranges)
        try:
            for run_start, run_end, members in runs:  # one read per run of touching ranges
                view = memoryview(_pread_span(fd, run_start, run_end))
                for i in members:
                    start, end = ranges[i]
                    out[i] = bytes(view[start - run_start : end - run_start])
        finally:
            os.close(fd)
        return out

    def size(self, key: str) -> int | None:
        try:
            st = os.lstat(self._path(key))
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Files under ``prefix`` (temporaries skipped; symlinked folders are not entered)."""
        prefix = check_prefix(prefix).rstrip("/")
        top = self.root / prefix if prefix else self.root
        if top.is_symlink() or not top.is_dir():  # never list (or later open) what a link out of the store holds
            return
        for dirpath, _dirs, files in os.walk(top):  # os.walk does not descend into symlinked folders
            for name in files:
                if name.endswith(".partial"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:  # removed since listed
                    continue
                yield os.path.relpath(path, self.root).replace(os.sep, "/"), size

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        fd = self._open(key)
        if fd is None:
            return None
        try:
            version = _version_of(os.fstat(fd))
            return _pread_span(fd, 0, None), version
        finally:
            os.close(fd)

    def version(self, key: str) -> str | None:
        """``inode:size:mtime`` of the entry at ``key`` (whatever it is: a damaged entry can be replaced too)."""
        try:
            return _version_of(os.lstat(self._path(key)))
        except FileNotFoundError:
            return None

    # ----------------------------------------------------------------- writes

    def _temp_path(self, path: Path) -> Path:
        # host and pid in the name: a resuming writer removes only temporaries of dead processes
        return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.{uuid.uuid4().hex}.partial")

    def _write_temp(self, path: Path, data: Buffer) -> Path:
        root_real = self.root_real
        check_inside(path.parent, root_real)
        path.parent.mkdir(parents=True, exist_ok=True)
        check_inside(path.parent, root_real)
        tmp = self._temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(_as_bytes_view(data))
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # disk full, file size limit, ...: no partial file stays behind
            raise
        return tmp

    def put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:
            raise TemporaryFileLost(
                f"the temporary file {tmp} of {path} was removed by another process while this one wrote it"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync_dir(path.parent)

    def put_if_absent(self, key: str, data: Buffer) -> None:
        """Write a temporary file and hard-link it into place: fails atomically if another writer got there first.

        Raises:
            AlreadyExistsError: ``key`` exists.
            TemporaryFileLost: the temporary file was removed by another process meanwhile.
        """
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            self._link_new(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _link_new(self, tmp: Path, path: Path) -> None:
        """Hard-link a written temporary file to ``path`` unless something is there (the caller removes ``tmp``)."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExistsError(f"{path} exists (another writer wrote it)") from None
        except FileNotFoundError:
            raise TemporaryFileLost(
                f"the temporary file {tmp} of {path} was removed by another process while this one wrote "
                "it (a second writer for the same shards, or a cleanup of the folder)"
            ) from None
        except OSError:  # filesystems without hard links: check, then rename
            if os.path.lexists(path):
                raise AlreadyExistsError(f"{path} exists (another writer wrote it)") from None
            os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(path.parent)

    def begin_put(self, key: str) -> _LocalFileInProgress:
        """A temporary file beside ``key`` (named like :meth:`put_if_absent`'s, so :meth:`cleanup` removes it
        once its process is dead), filled with ``pwritev`` and hard-linked into place on commit."""
        path = self._path(key)
        root_real = self.root_real
        check_inside(path.parent, root_real)
        path.parent.mkdir(parents=True, exist_ok=True)
        check_inside(path.parent, root_real)
        tmp = self._temp_path(path)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        return _LocalFileInProgress(self, path, tmp, fd)

    def put_if_version(self, key: str, data: Buffer, version: str) -> str:
        """Replace the file if it still has ``version`` (``inode:size:mtime``); readers see the old or the new file.

        Raises:
            VersionMismatchError: the file changed or vanished since ``version`` was read.
            TemporaryFileLost: the temporary file was removed by another process meanwhile.
        """
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            new_version = _version_of(os.lstat(tmp))
            with _FolderLock(path.parent):  # check-then-replace is one step for every CAS writer of the folder
                if self.version(key) != version:
                    raise VersionMismatchError(f"{path} changed since it was read (another writer replaced it)")
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:
                    raise TemporaryFileLost(
                        f"the temporary file {tmp} of {path} was removed by another process while this one wrote it"
                    ) from None
            if self.fsync:
                _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return new_version

    def delete(self, key: str) -> None:
        path = self._path(key)
        check_inside(path.parent, self.root_real)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return  # a folder is not an object (delete_prefix removes folders)
            path.unlink()
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        """Remove the folder ``prefix`` and everything in it (never the root, never through a link).

        Raises:
            UnsafeFileError: the folder is the root, a symbolic link, or lies under one leading out of the store.
        """
        stem = check_prefix(prefix).rstrip("/")
        path = self.root / stem if stem else self.root
        if not stem or os.path.realpath(path) == self.root_real:
            raise UnsafeFileError(f"refusing to delete the store's root {self.location} through delete_prefix()")
        check_inside(path, self.root_real)
        if path.is_symlink():
            raise UnsafeFileError(f"{path} is a symbolic link; vlastore deletes only the store's own folders")
        if path.is_dir():
            shutil.rmtree(path)

    def cleanup(self, key: str, max_age_s: float = PARTIAL_MAX_AGE_S) -> int:
        """Delete temporary files that killed writers of ``key`` left behind; returns how many.

        Only temporaries of dead processes of this host are removed, and those of
        other hosts (or of older vlastore versions) once older than ``max_age_s``:
        a live writer's temporary file is never touched.
        """
        path = self._path(key)
        if not path.parent.is_dir():
            return 0
        check_inside(path.parent, self.root_real)
        host, now, removed = host_tag(), time.time(), 0
        with os.scandir(path.parent) as entries:
            for entry in entries:
                match = PARTIAL_NAME.match(entry.name)
                if match is None or match.group("name") != path.name or not entry.is_file(follow_symlinks=False):
                    continue
                pid = match.group("pid")
                if match.group("host") == host and pid is not None:
                    stale = int(pid) != os.getpid() and not _pid_alive(int(pid))
                else:
                    try:
                        stale = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
                    except FileNotFoundError:
                        continue
                if stale:
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    def unsafe_entries(self) -> Iterator[tuple[str, str]]:
        """``(key, why)`` of every entry under the root that is a symbolic link, or neither a regular file nor a
        folder (a FIFO, socket or device): what verify reports, and what reads refuse."""
        for dirpath, dirs, files in os.walk(self.root):
            for name in [*dirs, *files]:
                path = os.path.join(dirpath, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    yield key, "a symbolic link: vlastore does not follow links in a store; remove it"
                elif not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
                    yield key, "not a regular file (a FIFO, socket or device)"

    # -------------------------------------------------------- local fast path

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        check_inside(path.parent, self.root_real)
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except OSError:
            return None

    def open_fd(self, key: str) -> int:
        fd = self._open(key)
        if fd is None:
            raise FileNotFoundError(f"{self.where(key)}: no such file")
        return fd

    def open_map(self, key: str) -> np.ndarray:
        """A copy-on-write map: pages are shared with the page cache, arrays over it are writable (so
        ``torch.from_numpy`` needs no copy) and a write never reaches the file."""
        fd = self.open_fd(key)
        try:
            if os.fstat(fd).st_size == 0:
                return np.zeros(0, dtype=np.uint8)
            return np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ zarr

    def zarr_store(self) -> SafeLocalStore:
        if self._zarr is None:
            self._zarr = SafeLocalStore(self.root)
        return self._zarr


_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024


class _LocalFileInProgress(FileInProgress):
    """A temporary file of a :class:`LocalStorage`, written with ``pwritev`` and linked into place on commit."""

    def __init__(self, storage: LocalStorage, path: Path, tmp: Path, fd: int) -> None:
        self.storage = storage
        self.path = path
        self.tmp = tmp
        self.fd = fd

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> None:
        # the writer hands over byte memoryviews and bytes (one pair per row): no conversion per buffer then
        views = [b if isinstance(b, (memoryview, bytes)) else _as_bytes_view(b) for b in buffers]
        for lo in range(0, len(views), _IOV_MAX):
            part = views[lo : lo + _IOV_MAX]
            want = sum(map(len, part))
            done = os.pwritev(self.fd, part, offset)
            if done < want:  # a short write (signals, huge requests): the rest one buffer at a time
                rest = memoryview(b"".join(part))[done:]
                while rest:
                    n = os.pwrite(self.fd, rest, offset + done)
                    rest, done = rest[n:], done + n
            offset += want

    def read_at(self, offset: int, out: np.ndarray) -> None:
        view = _as_bytes_view(out)
        done = 0
        while done < view.nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:  # past the end: never written
                view[done:] = bytes(view.nbytes - done)
                break
            done += n

    def commit_if_absent(self) -> None:
        try:
            if self.storage.fsync:
                os.fsync(self.fd)
            self.storage._link_new(self.tmp, self.path)
        finally:
            self.discard()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- zarr-python


def _safe_get(
    path: Path, root_real: str, prototype: BufferPrototype, byte_range: ByteRequest | None
) -> ZarrBuffer | None:
    fd = open_regular(path, root_real)
    if fd is None:
        return None
    try:
        if byte_range is None:
            data = _pread_span(fd, 0, None)
        elif isinstance(byte_range, RangeByteRequest):
            data = _pread_span(fd, byte_range.start, byte_range.end)
        elif isinstance(byte_range, OffsetByteRequest):
            data = _pread_span(fd, byte_range.offset, None)
        elif isinstance(byte_range, SuffixByteRequest):
            data = _pread_span(fd, -byte_range.suffix, None) if byte_range.suffix else b""
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
    finally:
        os.close(fd)
    return prototype.buffer.from_bytes(data)


class SafeLocalStore(LocalStore):
    """zarr-python's ``LocalStore`` that reads only regular files inside its root and writes nowhere else.

    zarr reads a store's metadata and small arrays through it: a FIFO in place of
    a ``zarr.json`` or a chunk is refused (:class:`UnsafeFileError`) instead of
    blocking, and a symlink out of the store is neither read, written nor deleted.
    """

    @property
    def root_real(self) -> str:
        return os.path.realpath(self.root)

    def with_read_only(self, read_only: bool = False) -> SafeLocalStore:
        return SafeLocalStore(self.root, read_only=read_only)

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> ZarrBuffer | None:
        if prototype is None:
            prototype = default_buffer_prototype()
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(_safe_get, self.root / key, self.root_real, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[ZarrBuffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _set(self, key: str, value: ZarrBuffer, exclusive: bool = False) -> None:
        check_inside(self.root / key, self.root_real)
        await super()._set(key, value, exclusive=exclusive)

    async def delete(self, key: str) -> None:
        check_inside(self.root / key, self.root_real)
        await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        path = self.root / prefix
        check_inside(path, self.root_real)
        if path.is_symlink():
            raise UnsafeFileError(f"{path} is a symbolic link; vlastore deletes only the store's own folders")
        await super().delete_dir(prefix)

    async def exists(self, key: str) -> bool:
        path = self.root / key
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False


# --------------------------------------------------------------- whole stores


def _is_store_file(root: Path, parts: list[str]) -> bool:
    """Whether a file at ``parts`` (relative to a store root) is one vlastore or zarr writes."""
    name = parts[-1]
    if name == META_NAME:
        return True
    if name.endswith(".partial") and (PARTIAL_NAME.match(name) or re.match(r"^zarr\.[0-9a-f]+\.partial$", name)):
        return True
    array = chunk_array_parts(parts)  # chunk files only under an array node
    return array is not None and (root.joinpath(*array) / META_NAME).is_file()


def remove_store_files(root: Path) -> int:
    """Delete a local store's folder: its files only, and only if it holds nothing else. Returns files removed.

    The caller checked that ``root`` holds a vlastore store.

    Raises:
        UnsafeFileError: the folder holds anything a store does not (another file,
            a symlink, a FIFO): nothing is deleted, the message names a few.
    """
    if root.is_symlink():
        raise UnsafeFileError(f"{root} is a symbolic link; refusing to delete what it points to")
    files: list[Path] = []
    dirs: list[Path] = []
    foreign: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath) / name
            (foreign.append(str(path.relative_to(root))) if path.is_symlink() else dirs.append(path))
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if stat.S_ISREG(os.lstat(path).st_mode) and _is_store_file(root, list(rel.parts)):
                files.append(path)
            else:
                foreign.append(str(rel))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UnsafeFileError(
            f"{root} holds files that are not part of a vlastore store ({shown}); nothing was "
            "deleted. Move them away, or choose another path"
        )
    for path in files:
        path.unlink()
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        path.rmdir()  # empty by now; a file added meanwhile makes this fail instead of deleting it
    root.rmdir()
    return len(files)
