"""Local files of a store opened safely: regular files inside the store's root only, never through a link.

A store may come from someone else. Every file of a local store is opened with
``O_NONBLOCK | O_NOFOLLOW`` and checked with ``fstat`` (:func:`open_regular`), so a
FIFO never blocks and a symlink is never followed; paths are resolved and must
stay inside the root (:func:`check_inside`) before anything is written or
deleted. zarr-python reads a local store through :class:`SafeLocalStore`, which
applies the same rules. :mod:`vlastore.storage` is the only user.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from .format import FormatError

__all__ = ["UnsafeFileError", "SafeLocalStore", "check_inside", "open_regular", "read_fd", "host_tag",
           "PARTIAL_NAME", "pid_alive", "is_store_file", "fsync_dir", "near_miss", "O_NOFOLLOW", "O_NONBLOCK",
           "O_CLOEXEC"]

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafeFileError(FormatError):
    """A file of the store is not a regular file inside the store (a symlink, FIFO, device, or a path leading out)."""


def _within(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
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
    if not _within(real, root_real):
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
        raise UnsafeFileError(f"{path} is not a regular file (a {_kind(st.st_mode)}); the store is damaged or "
                              "was tampered with")
    return fd


def read_fd(fd: int, start: int = 0, length: int | None = None) -> bytes:
    """Bytes of an open file: ``length`` from ``start`` (``start < 0``: the last ``-start``); closes ``fd``."""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if start < 0:
            f.seek(max(0, size + start))
            return f.read()
        f.seek(min(start, size))
        return f.read(-1 if length is None else max(0, length))


def _safe_get(path: Path, root_real: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
    fd = open_regular(path, root_real)
    if fd is None:
        return None
    if byte_range is None:
        data = read_fd(fd)
    elif isinstance(byte_range, RangeByteRequest):
        data = read_fd(fd, byte_range.start, byte_range.end - byte_range.start)
    elif isinstance(byte_range, OffsetByteRequest):
        data = read_fd(fd, byte_range.offset)
    elif isinstance(byte_range, SuffixByteRequest):
        data = read_fd(fd, -byte_range.suffix) if byte_range.suffix else read_fd(fd, 0, 0)
    else:
        os.close(fd)
        raise TypeError(f"unexpected byte range {byte_range!r}")
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

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if prototype is None:
            prototype = default_buffer_prototype()
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(_safe_get, self.root / key, self.root_real, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
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


def near_miss(key: object, target: str) -> bool:
    """``key`` is ``target`` or differs from it in one character (a flipped bit in the name)."""
    return isinstance(key, str) and len(key) == len(target) and sum(a != b for a, b in zip(key, target)) <= 1


def host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


PARTIAL_NAME = re.compile(r"^\.(?P<name>[^.]+)\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[0-9a-f]+\.partial$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


_CHUNK_PART = re.compile(r"^\d{1,18}$")


def is_store_file(root: Path, parts: list[str]) -> bool:
    """Whether a file at ``parts`` (relative to a store root) is one vlastore or zarr writes."""
    name = parts[-1]
    if name == "zarr.json":
        return True
    if name.endswith(".partial") and (PARTIAL_NAME.match(name) or re.match(r"^zarr\.[0-9a-f]+\.partial$", name)):
        return True
    for i in range(len(parts) - 1, -1, -1):  # chunk files: <array>/c/<digits>/.../<digits> under an array node
        if parts[i] == "c":
            chunk = parts[i + 1 :]
            return bool(chunk) and all(_CHUNK_PART.match(p) for p in chunk) and \
                (root.joinpath(*parts[:i]) / "zarr.json").is_file()
    return False


def fsync_dir(path: Path) -> None:
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
