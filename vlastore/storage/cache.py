"""A node-local cache of whole shard files, shared by every process on the node.

Training from object storage cannot read rows one request at a time (a ranged GET
costs milliseconds, a memory-mapped row microseconds), so whole shard objects are
downloaded into a cache folder on local disk, once per node, and then served by
the same memory-mapped fast path as a local store.

Why not a library. fsspec's ``simplecache``/``filecache`` download straight into
the final file name (``fs.get_file(path, fn)``) and treat "the file exists" as
"cached" (``SimpleCacheFileSystem._check_file`` is ``os.path.exists``): a process
killed mid-download leaves a half-written file that every later process serves
as the object. They take no lock between processes (four ranks download the same
shard four times), verify nothing, and have no size limit, only an expiry time
(``blockcache`` keeps a JSON of blocks that concurrent processes overwrite).
obstore has no local cache. mosaicml/streaming does what is needed but for its
own shard format and with its own sampler. So this module does it, with the
kernel's file locks (released when a process dies, so a crash never blocks):

- **once per node**: a per-key lock file (``flock``): the first process downloads,
  the others wait for the lock and then find the file in place.
- **never half a shard**: downloads go to ``tmp/``, are verified (the caller's
  ``verify(key, array)``; by default the size, and the crc32c the object store
  wrote), and only then renamed into ``objects/``. A SIGKILLed download leaves a
  temp file nobody holds a lock on; the next reservation removes it.
- **pinned while mapped**: every map holds a shared ``flock`` on its file; the
  evictor removes only files it can lock exclusively without waiting, least
  recently used first, so a mapped shard is never evicted.
- **size limit**: a download first reserves its full size (``posix_fallocate`` of
  the temp file, under one cache-wide lock), evicting as needed. When nothing
  evictable frees enough room (or the disk is full), ``open_map`` returns None
  and reads go to the object store as ranged reads (``on_full="ranged"``, the
  default), or :class:`CacheFullError` says what to do (``on_full="error"``).
  Never a wrong value.
- **prefetch**: ``prefetch(keys)`` downloads shards in background threads; a
  shard another process is already downloading is skipped.
- **stale copies**: cached files are named by key and object version (ETag), so a
  store rewritten at the same URL never serves old bytes. A shard with no copy on
  the node costs one GET (its headers give size and version); a process that
  finds a copy asks once per key whether it is still current (one HEAD). After a
  machine crash (a new boot id) the files, written without fsync, are dropped.

Layout of the cache folder (one folder may serve many stores; the size limit is
for the whole folder)::

    <cache_dir>/evict.lock                     one reservation/eviction at a time
    <cache_dir>/<store id>/location            the store's URL, for people
    <cache_dir>/<store id>/boot_id             boot the files were written in
    <cache_dir>/<store id>/objects/<key hash>-<version hash>
    <cache_dir>/<store id>/tmp/<random>.part   downloads in progress
    <cache_dir>/<store id>/locks/<key hash>.lock
    <cache_dir>/<store id>/verified/<key hash>-<version hash>   stamp: passed the verify on arrival

- **checked once per node**: a download that passed the caller's verify gets a stamp naming the file's
  inode, size and mtime (written atomically after the rename). A process that maps the file and finds the
  stamp matching (:meth:`CachedStorage.verified_on_arrival`) skips its own per-row crc32c check; a file
  replaced or written again in place (a new inode or mtime) no longer matches, and is checked as it is read.
  Last use, for LRU eviction, is kept in the atime, so the mtime stays the one the stamp names.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np

from .base import Buffer, Storage, StorageError, VersionMismatchError, check_key

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = ["CachedStorage", "CacheFullError", "Verify"]

log = logging.getLogger(__name__)

Verify = Callable[[str, np.ndarray], None]
"""``verify(key, data)`` raises if the downloaded object (a read-only uint8 array) is corrupt."""

_T = TypeVar("_T")
_R = TypeVar("_R")

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class CacheFullError(StorageError):
    """The cache folder has no room for an object and nothing in it can be evicted."""


class _NoRoom(Exception):
    """Raised inside a download when no room can be reserved (the message says why)."""


@dataclass(frozen=True)
class _Entry:
    size: int
    version: str | None
    crc32c: int | None


class _PinnedMap(mmap.mmap):
    """A private map whose file stays share-locked (pinned against eviction) while the map lives."""

    verified = False
    """The file is the one verified on arrival, unchanged since (see :meth:`CachedStorage.verified_on_arrival`)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _stamp_path(path: Path) -> Path:
    """``<store id>/verified/<name>`` for the cached file ``<store id>/objects/<name>``."""
    return path.parent.parent / "verified" / path.name


def _digest(text: str, n: int = 32) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _touch(fd: int, st: os.stat_result) -> None:
    """Mark the file used now, for LRU eviction: in its atime, so that its mtime stays the one its verified
    stamp names (a file written again in place gets a new mtime, and its stamp no longer holds)."""
    os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))


def _stamp_text(st: os.stat_result) -> str:
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}\n"


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class CachedStorage(Storage):
    """A remote :class:`Storage` with a node-local cache of whole objects (shard files).

    Args:
        remote: the object storage (an :class:`~vlastore.storage.objects.ObjectStorage`;
            any Storage works, using ``head``/``download`` where it has them).
        cache_dir: a folder on local disk shared by the node's processes (created if missing).
        max_bytes: size limit of the whole folder.
        verify: ``verify(key, data)`` raising on a corrupt download; the reader passes one that
            checks the crc32c of the shard index and every chunk. Default: the size (and the
            crc32c stored with the object, which the download already checks).
        prefetch_threads: background download threads of :meth:`prefetch` per process.
        on_full: ``"ranged"``: :meth:`open_map` returns None when the cache has no room (the
            reader falls back to ranged reads); ``"error"``: raise :class:`CacheFullError`.
        lock_timeout_s: how long to wait for another process's download of the same object.
    """

    is_local = False
    serves_local_files = True
    """Shard objects come back as local files (:meth:`open_fd`, :meth:`open_map`): the reader's fast paths apply."""

    def __init__(
        self,
        remote: Storage,
        cache_dir: str | os.PathLike[str],
        max_bytes: int,
        *,
        verify: Verify | None = None,
        prefetch_threads: int = 2,
        on_full: str = "ranged",
        lock_timeout_s: float = 900.0,
    ) -> None:
        if on_full not in ("ranged", "error"):
            raise ValueError(f"on_full={on_full!r} must be 'ranged' or 'error'")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes} must be positive (the cache folder's size limit in bytes)")
        self.remote = remote
        self.location = remote.location
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.max_bytes = int(max_bytes)
        self.verify = verify
        self.prefetch_threads = max(1, int(prefetch_threads))
        self.on_full = on_full
        self.lock_timeout_s = float(lock_timeout_s)
        endpoint = getattr(getattr(remote, "settings", None), "endpoint", None) or ""
        self.root = self.cache_dir / _digest(f"{remote.location}|{endpoint}", 24)
        for sub in ("objects", "tmp", "locks", "verified"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        location_file = self.root / "location"
        if not location_file.exists():
            location_file.write_text(f"{remote.location} {endpoint}\n")
        self._entries: dict[str, _Entry] = {}
        self._pid = os.getpid()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[Any]] = {}
        self._guard = threading.Lock()
        self._warned_full = False
        self._verifiers: dict[str, Verify] = {}
        self._pins: dict[str, int] = {}  # key -> a share-locked descriptor held while this process lives
        self._drop_files_of_another_boot()

    def add_verify(self, prefix: str, verify: Verify) -> None:
        """Check downloads of keys under ``prefix`` with ``verify`` (the reader registers a shard check per
        family generation: index and every chunk's crc32c); the longest matching prefix wins."""
        check_key(prefix.rstrip("/"))
        self._verifiers[prefix.rstrip("/") + "/"] = verify

    def _verify_for(self, key: str) -> Verify | None:
        best = ""
        for prefix in self._verifiers:
            if key.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return self._verifiers[best] if best else self.verify

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                self.remote,
                str(self.cache_dir),
                self.max_bytes,
                self.verify,
                self.prefetch_threads,
                self.on_full,
                self.lock_timeout_s,
            ),
        )

    # ------------------------------------------------------------- per process

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads and lock are not ours
            self._pid = os.getpid()
            self._executor = None
            self._pending = {}
            self._guard = threading.Lock()
            self._pins = {}  # the parent's descriptors (and their locks) stay the parent's

    def close(self) -> None:
        """Stop the prefetch threads (downloads under way finish first)."""
        self._check_pid()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ paths

    def _entry(self, key: str) -> _Entry | None:
        """Size and version of the remote object: one HEAD per key per process."""
        check_key(key)
        entry = self._entries.get(key)
        if entry is None:
            head = getattr(self.remote, "head", None)
            if head is not None:
                info = head(key)
                if info is None:
                    return None
                entry = _Entry(info.size, info.version, info.crc32c)
            else:
                size = self.remote.size(key)
                if size is None:
                    return None
                entry = _Entry(size, None, None)
            self._entries[key] = entry
        return entry

    def _object_path(self, key: str, entry: _Entry) -> Path:
        return self.root / "objects" / f"{_digest(key)}-{_digest(entry.version or 'unversioned', 16)}"

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{_digest(key)}.lock"

    # ----------------------------------------------------------- local access

    def local_path(self, key: str) -> Path | None:
        """Path of the cached, verified file (downloaded now if needed); None when the cache is full.

        Only :meth:`open_map` pins the file against eviction; a caller of this should open it
        at once (an evicted file stays readable through an open descriptor).
        """
        path, _ = self._ensure(key)
        return path

    def open_map(self, key: str) -> np.ndarray | None:
        """A private (copy-on-write) uint8 map of the cached object, pinned while the array lives.

        Raises:
            FileNotFoundError: the object does not exist.
            CacheFullError: no room and ``on_full="error"``.
        """
        for _ in range(5):
            path, entry = self._ensure(key)
            if path is None or entry is None:
                return None
            mapped = self._map_pinned(path, entry.size)
            if mapped is not None:
                return mapped
            # evicted between download and map: the cache is under pressure; try again
        self._full_fallback(key, "it was evicted again each time before it could be mapped")
        return None

    def open_fd(self, key: str) -> int | None:
        """A read-only descriptor of the cached, verified file (downloaded now if needed; the caller closes it);
        None when the cache has no room. The file stays pinned against eviction while this process lives
        (the reader maps it into its shard arena, which outlives the descriptor).

        Raises:
            FileNotFoundError: the object does not exist.
            CacheFullError: no room and ``on_full="error"``.
        """
        self._check_pid()
        for _ in range(5):
            path, entry = self._ensure(key)
            if path is None or entry is None:
                return None
            fd = self._pinned_fd(path, entry.size)
            if fd is not None:
                with self._guard:
                    old = self._pins.pop(key, None)
                    self._pins[key] = fd
                if old is not None:
                    os.close(old)
                return os.dup(fd)
        self._full_fallback(key, "it was evicted again each time before it could be opened")
        return None

    def _pinned_fd(self, path: Path, size: int) -> int | None:
        """A descriptor of ``path`` holding a shared lock (the eviction pin), or None if it was evicted."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise StorageError(f"cache file {path} is not a regular file of {size} bytes; remove it")
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an evictor that holds it for an instant
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                os.close(fd)  # evicted while we waited: this inode is on its way out
                return None
            _touch(fd, st)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def unpin(self) -> None:
        """Release the pins :meth:`open_fd` holds in this process (maps made from them keep their pages)."""
        self._check_pid()
        with self._guard:
            pins, self._pins = self._pins, {}
        for fd in pins.values():
            os.close(fd)

    def _map_pinned(self, path: Path, size: int) -> np.ndarray | None:
        fd = self._pinned_fd(path, size)
        if fd is None:
            return None
        try:
            if size == 0:
                os.close(fd)
                return np.empty(0, dtype=np.uint8)
            mapped = _PinnedMap(fd, size, access=mmap.ACCESS_COPY)
            mapped.verified = self._stamped(path, fd)
        except BaseException:
            os.close(fd)
            raise
        weakref.finalize(mapped, os.close, fd)  # the shared lock goes with the descriptor
        return np.frombuffer(mapped, dtype=np.uint8)

    def _full_fallback(self, key: str, why: str) -> None:
        """No room for ``key``: raise (on_full="error") or warn once and let the caller return None."""
        message = (
            f"node cache {self.cache_dir} ({self.max_bytes} bytes) has no room for {self.location}/{key}: {why}; "
            "raise max_bytes, free the disk, or map fewer shards at once"
        )
        if self.on_full == "error":
            raise CacheFullError(message)
        if not self._warned_full:
            self._warned_full = True
            log.warning("%s (reading with ranged requests instead)", message)
        return None

    # --------------------------------------------------------------- download

    def _ensure(self, key: str, wait: bool = True) -> tuple[Path | None, _Entry | None]:
        """The cached file of ``key``, downloading it if needed (None, when full or, with wait=False, busy)."""
        self._check_pid()
        try:
            return self._ensure_version(key, wait)
        except VersionMismatchError:  # replaced between our HEAD and GET: take the new version once
            self._entries.pop(key, None)
            return self._ensure_version(key, wait)

    def _ensure_version(self, key: str, wait: bool) -> tuple[Path | None, _Entry | None]:
        entry = self._entries.get(key)
        if entry is None and hasattr(self.remote, "download") and not self._local_versions(key):
            # cold: no copy on this node, so no HEAD either; the GET's headers tell size and version
            lock_fd = self._lock(key, wait)
            if lock_fd is None:
                return None, None
            try:
                if not self._local_versions(key):  # nobody finished it while we waited
                    return self._fetch(key, None)
            finally:
                os.close(lock_fd)
        entry = self._entry(key)  # a copy is here: is it the current version? (one HEAD per key per process)
        if entry is None:
            raise FileNotFoundError(f"{self.location}/{key}: no such object")
        final = self._object_path(key, entry)
        if final.exists():
            return final, entry
        lock_fd = self._lock(key, wait)
        if lock_fd is None:
            return None, entry
        try:
            if final.exists():  # another process finished it while we waited
                return final, entry
            return self._fetch(key, entry)
        finally:
            os.close(lock_fd)

    def _local_versions(self, key: str) -> list[str]:
        stem = f"{_digest(key)}-"
        with os.scandir(self.root / "objects") as it:
            return [item.name for item in it if item.name.startswith(stem)]

    def _lock(self, key: str, wait: bool) -> int | None:
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        while not _try_lock(fd, fcntl.LOCK_EX):
            if not wait or time.monotonic() > deadline:
                os.close(fd)
                if not wait:
                    return None
                raise StorageError(
                    f"another process has been downloading {self.location}/{key} into {self.cache_dir} for "
                    f"{self.lock_timeout_s:.0f} s; if it hangs, stop it (its lock goes with it) and rerun"
                )
            time.sleep(delay)
            delay = min(0.02, delay * 2)  # short: a reader waiting for a prefetch should not oversleep it
        return fd

    def _fetch(self, key: str, known: _Entry | None) -> tuple[Path | None, _Entry | None]:
        """Under the key's lock: download into a reserved temp file, verify, rename into place.

        ``known`` is the object's entry from a HEAD, or None to learn it from the GET's headers.
        Returns (None, entry) when the cache has no room (after the fallback warning or error).
        """
        slot: dict[str, Any] = {}

        def out_for(info: Any) -> IO[bytes]:
            entry = known or _Entry(int(info.size), info.version, info.crc32c)
            slot["entry"] = entry
            reserved = self._reserve_room(entry.size)
            if isinstance(reserved, str):
                raise _NoRoom(reserved)
            slot["fd"], slot["tmp"] = reserved
            slot["file"] = os.fdopen(os.dup(reserved[0]), "r+b")
            return slot["file"]

        try:
            download = getattr(self.remote, "download", None)
            if download is not None:
                info = download(key, out_for, known.version if known else None)
                # the final answer's size, version and crc (a first answer that lied was retried)
                entry = known or _Entry(int(info.size), info.version, info.crc32c)
            else:
                data = self.remote.get(key)
                if data is None:
                    raise FileNotFoundError(f"{self.location}/{key}: no such object")
                entry = _Entry(len(data), None, None)
                out_for(entry).write(data)
            slot["file"].truncate()
            slot["file"].close()
            slot["entry"] = entry
            checked = self._verify_file(key, slot["fd"], entry)
            final = self._object_path(key, entry)
            os.rename(slot["tmp"], final)
            st = os.fstat(slot["fd"])  # the same inode, now under its final name
            _touch(slot["fd"], st)
            if checked:
                self._write_stamp(final, st)
            self._entries[key] = entry
            return final, entry
        except _NoRoom as full:
            self._full_fallback(key, str(full))
            return None, slot.get("entry")
        except BaseException:
            if "tmp" in slot:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(slot["tmp"])
            raise
        finally:
            if "file" in slot:
                slot["file"].close()
            if "fd" in slot:
                os.close(slot["fd"])  # releases the exclusive lock that marked the temp file as live

    def _reserve_room(self, size: int) -> tuple[int, str] | str:
        """A reserved temp file, or why there is none."""
        try:
            reserved = self._reserve(size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._evict(need=size, evict_all=True)  # the disk is fuller than our limit: drop all we can
            try:
                reserved = self._reserve(size)
            except OSError as again:
                if again.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                return f"the disk is full ({again.strerror})"
        return reserved if reserved is not None else "everything in it is in use (mapped)"

    def _verify_file(self, key: str, fd: int, entry: _Entry) -> bool:
        """Raise unless the download is whole and passes the key's verify; whether a verify ran."""
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise StorageError(
                f"download of {self.location}/{key} gave {size} bytes, the object has {entry.size}; rerun to retry"
            )
        verify = self._verify_for(key)
        if verify is None or size == 0:
            return False
        view = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        data = np.frombuffer(view, dtype=np.uint8)
        data.flags.writeable = False
        try:
            verify(key, data)
        except Exception as exc:
            exc.add_note(f"downloaded from {self.location}/{key} into {self.cache_dir}; the copy was discarded")
            raise
        finally:
            del data
            with contextlib.suppress(BufferError):  # a traceback may still hold the array: the GC unmaps it then
                view.close()
        return True

    # ------------------------------------------------------- verified stamps

    def _write_stamp(self, final: Path, st: os.stat_result) -> None:
        """Record that the file ``final`` (inode, size, mtime as ``st``) passed the verify on arrival, so no
        process of the node checks it again; written after the rename, atomically (a process killed before
        leaves no stamp, and the file is then checked as it is read)."""
        stamp = _stamp_path(final)
        tmp = stamp.with_name(f".{stamp.name}.{uuid.uuid4().hex}")
        try:
            tmp.write_text(_stamp_text(st))
            os.replace(tmp, stamp)
        except OSError as exc:  # no stamp: readers check the rows themselves
            log.debug("no verified stamp for %s: %s", final, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _stamped(self, path: Path, fd: int) -> bool:
        """Whether the open file ``fd`` (the cached copy at ``path``) is the very file verified on arrival:
        the stamp names its inode, size and mtime, so a file replaced or written again does not match."""
        try:
            sfd = os.open(_stamp_path(path), _OPEN_FLAGS)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):
                return False
            text = os.read(sfd, 128).decode("ascii", "replace")
        finally:
            os.close(sfd)
        return text == _stamp_text(os.fstat(fd))

    def verified_on_arrival(self, key: str, fd: int) -> bool:
        """Whether ``fd`` (from :meth:`open_fd`) is the cached copy of ``key`` that was verified whole when it
        arrived (a shard's index and every chunk's crc32c), unchanged since: its reader need not check its
        rows again. False when unsure (no stamp, another file, another version)."""
        entry = self._entries.get(key)
        return entry is not None and self._stamped(self._object_path(key, entry), fd)

    # --------------------------------------------------------------- eviction

    def _reserve(self, size: int) -> tuple[int, str] | None:
        """A locked temp file holding ``size`` bytes of disk, evicting to make room (None if impossible)."""
        with self._evict_lock():
            if not self._make_room(size, evict_all=False):
                return None
            tmp = str(self.root / "tmp" / f"{uuid.uuid4().hex}.part")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # live download: the cleaner leaves it alone
                if size:
                    os.posix_fallocate(fd, 0, size)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            return fd, tmp

    def _evict(self, need: int, evict_all: bool) -> bool:
        with self._evict_lock():
            return self._make_room(need, evict_all)

    def _evict_lock(self) -> _FileLock:
        return _FileLock(self.cache_dir / "evict.lock")

    def _files(self) -> Iterator[tuple[Path, os.stat_result, bool]]:
        """Every cached or in-progress file of every store in the folder: (path, stat, is_temp)."""
        for store_dir in self.cache_dir.iterdir():
            for sub, is_temp in (("objects", False), ("tmp", True)):
                folder = store_dir / sub
                if not folder.is_dir() or folder.is_symlink():
                    continue
                with os.scandir(folder) as it:
                    for item in it:
                        try:
                            st = item.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            yield Path(item.path), st, is_temp

    def _make_room(self, need: int, evict_all: bool) -> bool:
        """Under the evict lock: drop dead temp files, then LRU unpinned objects until ``need`` fits."""
        need = -(-need // 4096) * 4096  # whole blocks, as the files already there are counted
        total = 0
        candidates: list[tuple[float, Path, int]] = []
        for path, st, is_temp in self._files():
            used = max(st.st_size, st.st_blocks * 512)
            if is_temp:
                if self._remove_if_unlocked(path):  # its downloader died
                    continue
            else:
                candidates.append((st.st_atime, path, used))  # last use (see _touch)
            total += used
        if total + need <= self.max_bytes and not evict_all:
            return True
        candidates.sort()
        for _, path, used in candidates:
            if total + need <= self.max_bytes and not evict_all:
                break
            if self._remove_if_unlocked(path):
                total -= used
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_stamp_path(path))
        return total + need <= self.max_bytes

    @staticmethod
    def _remove_if_unlocked(path: Path) -> bool:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return False
        try:
            if not _try_lock(fd, fcntl.LOCK_EX):
                return False  # mapped by some process, or a download under way
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def _drop_files_of_another_boot(self) -> None:
        """Files written before a machine crash may be torn (no fsync): drop them once per boot."""
        marker = self.root / "boot_id"
        boot = _boot_id()
        try:
            if marker.read_text().strip() == boot:
                return
        except FileNotFoundError:
            pass
        with self._evict_lock():
            try:
                if marker.read_text().strip() == boot:
                    return
                stale = True
            except FileNotFoundError:
                stale = any((self.root / "objects").iterdir())
            if stale:
                for sub in ("objects", "tmp", "verified"):
                    for path in (self.root / sub).iterdir():
                        self._remove_if_unlocked(path)
            tmp_marker = self.root / f"boot_id.{uuid.uuid4().hex}"
            tmp_marker.write_text(boot + "\n")
            os.replace(tmp_marker, marker)

    def cached_bytes(self) -> int:
        """Bytes the cache folder holds now (cached objects and downloads under way)."""
        return sum(max(st.st_size, st.st_blocks * 512) for _, st, _ in self._files())

    # --------------------------------------------------------------- prefetch

    def prefetch(self, keys: Iterable[str]) -> list[Future[Any]]:
        """Download ``keys`` in the background (bounded threads), so they are local when asked for.

        Keys already cached, already queued, or being downloaded by another process are skipped.
        Errors are logged, not raised: the foreground read of the same key retries and reports.
        """
        self._check_pid()
        futures = []
        with self._guard:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="vlastore-prefetch")
            for key in keys:
                check_key(key)
                if key in self._pending:
                    continue
                future = self._executor.submit(self._prefetch_one, key)
                self._pending[key] = future
                future.add_done_callback(partial(self._done, key))
                futures.append(future)
        return futures

    def _done(self, key: str, _future: Future[Any]) -> None:
        self._pending.pop(key, None)

    def _prefetch_one(self, key: str) -> bool:
        try:
            path, _ = self._ensure(key, wait=False)
            return path is not None
        except Exception as exc:  # the foreground read retries and raises with context
            log.warning("prefetch of %s/%s failed: %s", self.location, key, exc)
            return False

    # --------------------------------------------------- everything else: remote

    def _local_copy(self, key: str) -> Path | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        path = self._object_path(key, entry)
        return path if path.exists() else None

    def _read_local(self, key: str, start: int, end: int | None) -> bytes | None:
        path = self._local_copy(key)
        if path is None:
            return None
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if start < 0:
                start, end = max(0, size + start), size
            end = size if end is None else min(end, size)
            return os.pread(fd, max(0, end - start), start) if end > start else b""
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes | None:
        local = self._read_local(key, 0, None)
        return local if local is not None else self.remote.get(key)

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        local = self._read_local(key, start, end)
        return local if local is not None else self.remote.get_range(key, start, end)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if self._local_copy(key) is not None:
            out = [self._read_local(key, a, b) for a, b in ranges]
            if all(part is not None for part in out):
                return out  # type: ignore[return-value]
        return self.remote.get_ranges(key, ranges)

    def parallel_map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> builtins.list[_R]:
        return self.remote.parallel_map(fn, items)

    def size(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return entry.size if entry is not None else self.remote.size(key)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.remote.list(prefix)

    def put(self, key: str, data: Buffer) -> None:
        self._entries.pop(key, None)
        self.remote.put(key, data)

    def put_if_absent(self, key: str, data: Buffer) -> None:
        self._entries.pop(key, None)
        self.remote.put_if_absent(key, data)

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        return self.remote.get_versioned(key)

    def version(self, key: str) -> str | None:
        return self.remote.version(key)

    def put_if_version(self, key: str, data: Buffer, version: str) -> str:
        self._entries.pop(key, None)
        return self.remote.put_if_version(key, data, version)

    def delete(self, key: str) -> None:
        self._entries.pop(key, None)
        self.remote.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        stem = prefix.rstrip("/")
        for key in [k for k in self._entries if not stem or k == stem or k.startswith(stem + "/")]:
            self._entries.pop(key, None)
        self.remote.delete_prefix(prefix)

    def forget(self) -> None:
        """Forget the object versions this process has seen (the next access asks the remote again)."""
        self._entries.clear()

    def zarr_store(self) -> Store:
        return self.remote.zarr_store()


class _FileLock:
    """An exclusive flock on a file, as a context manager (released by the kernel if we die)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _rebuild(
    remote: Storage,
    cache_dir: str,
    max_bytes: int,
    verify: Verify | None,
    prefetch_threads: int,
    on_full: str,
    lock_timeout_s: float,
) -> CachedStorage:
    return CachedStorage(
        remote,
        cache_dir,
        max_bytes,
        verify=verify,
        prefetch_threads=prefetch_threads,
        on_full=on_full,
        lock_timeout_s=lock_timeout_s,
    )
