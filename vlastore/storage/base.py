"""The storage seam: bytes under one root.

Readers, writers and the store move bytes only through :class:`Storage`: whole
objects, byte ranges (coalesced into one request per run), memory maps where
the bytes are local files, put-if-absent and compare-and-swap. This module holds
the abstract class, its errors and the key rules; the implementations live
beside it: :mod:`.local` (files), :mod:`.zarrstore` (any zarr ``Store``),
:mod:`.objects` (S3-compatible object storage) and :mod:`.cache` (a node-local
cache of whole objects over a remote storage).
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = [
    "Storage",
    "FileInProgress",
    "Buffer",
    "StorageError",
    "AlreadyExistsError",
    "VersionMismatchError",
    "TemporaryFileLost",
    "StoreNotFoundError",
    "check_key",
    "check_prefix",
    "coalesce_ranges",
    "under_prefix",
]

Buffer: TypeAlias = bytes | bytearray | memoryview | np.ndarray
_T = TypeVar("_T")
_R = TypeVar("_R")
"""Bytes to write: anything with the buffer protocol (a C-contiguous numpy array is written as its bytes)."""


class StorageError(OSError):
    """A transfer failed after retries (network, server errors, truncated answers).

    The message says what failed, where, and that rerunning retries: nothing was
    half-written (every write is atomic), so a rerun picks up where this one stopped.
    """


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The bucket of an ``s3://`` location does not exist on the endpoint (a setup problem, not damage)."""


class AlreadyExistsError(FileExistsError):
    """``put_if_absent`` found the key already there (another writer was first)."""


class VersionMismatchError(RuntimeError):
    """``put_if_version`` found the object changed (or gone) since its version was read."""


class TemporaryFileLost(RuntimeError):
    """A write's temporary file vanished before it was linked into place (another process removed it)."""


class StoreNotFoundError(FileNotFoundError):
    """The location holds no vlastore store (nothing there, or something else)."""


def check_key(key: object) -> str:
    """Validate an object key: '/'-separated, relative, no empty, '.' or '..' parts.

    Raises:
        ValueError: the key could escape the root or is not a plain relative name.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} must be relative, '/'-separated, without backslashes or NUL")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"storage key {key!r} has an empty, '.' or '..' part; keys name objects under the root")
    return key


def check_prefix(prefix: object) -> str:
    """Validate a listing/deletion prefix: '' (everything) or a key, with an optional trailing '/'."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise ValueError(f"storage prefix must be a string, got {prefix!r}")
    return check_key(prefix.rstrip("/")) if prefix.rstrip("/") else check_key(prefix)


def under_prefix(key: str, prefix: str) -> bool:
    """Whether ``key`` lies under the folder-like ``prefix`` ('' holds everything)."""
    stem = prefix.rstrip("/")
    return not stem or key.startswith(stem + "/")


def coalesce_ranges(ranges: Sequence[tuple[int, int]], gap: int = 0) -> list[tuple[int, int, list[int]]]:
    """Merge ``[start, end)`` ranges that overlap or touch (or lie at most ``gap`` bytes apart).

    Returns:
        ``(start, end, members)`` per run, sorted by start, where ``members`` are the
        indices of the input ranges that the run covers. Empty ranges join no run.

    Raises:
        ValueError: a range with ``start < 0`` or ``end < start``.
    """
    order = []
    for i, (start, end) in enumerate(ranges):
        if start < 0 or end < start:
            raise ValueError(f"range {i} = [{start}, {end}) is not a forward byte range of an object")
        if end > start:
            order.append(i)
    order.sort(key=lambda i: ranges[i][0])
    runs: list[tuple[int, int, list[int]]] = []
    for i in order:
        start, end = ranges[i]
        if runs and start <= runs[-1][1] + gap:
            run_start, run_end, members = runs[-1]
            members.append(i)
            runs[-1] = (run_start, max(run_end, end), members)
        else:
            runs.append((start, end, [i]))
    return runs


class FileInProgress(abc.ABC):
    """A new object written in place, piece by piece, then put into place at once (:meth:`Storage.begin_put`).

    Until :meth:`commit_if_absent` nothing is visible under the key; :meth:`discard` removes what was written.
    """

    @abc.abstractmethod
    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Write ``buffers`` one after the other from byte ``offset`` (may run in another thread)."""

    @abc.abstractmethod
    def read_at(self, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous uint8) with the bytes from ``offset`` (zeros where nothing was written)."""

    @abc.abstractmethod
    def commit_if_absent(self) -> None:
        """Put the object in place, as :meth:`Storage.put_if_absent` would, and forget the temporary.

        Raises:
            AlreadyExistsError: the key exists (another writer was first).
            TemporaryFileLost: the temporary was removed by another process meanwhile.
        """

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop what was written (nothing appears under the key); a no-op after commit or discard."""


class Storage(abc.ABC):
    """Bytes under one root (a folder, or a bucket prefix).

    Keys are '/'-separated, relative to the root, validated (no '..', no leading
    '/', no empty parts). Every write is atomic: a reader sees the old object or
    the new one, never a mix.
    """

    location: str
    """For messages: a path or ``s3://bucket/prefix``."""
    is_local: bool
    """Files on a POSIX filesystem (memory maps possible)."""

    # ------------------------------------------------------------------ reads

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The whole object, or None if absent."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        """Bytes ``[start, end)`` (clipped to the object), or None if absent.

        ``start < 0`` with ``end=None`` reads the last ``-start`` bytes (a suffix read).
        """

    @abc.abstractmethod
    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Many ``[start, end)`` ranges of one object, in the order given.

        Adjacent or overlapping ranges are coalesced into one request per run.

        Raises:
            FileNotFoundError: the object is absent.
        """

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Object size in bytes, or None if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every object under ``prefix`` (a folder-like prefix), in any order."""

    # ----------------------------------------------------------------- writes

    @abc.abstractmethod
    def put(self, key: str, data: Buffer) -> None:
        """Create or replace the object."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: Buffer) -> None:
        """Create the object only if absent.

        Raises:
            AlreadyExistsError: the key exists (another writer was first).
        """

    @abc.abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version token (S3: the ETag), or None if absent."""

    @abc.abstractmethod
    def put_if_version(self, key: str, data: Buffer, version: str) -> str:
        """Compare-and-swap: replace the object only if it still has ``version``.

        Returns:
            The new version token.

        Raises:
            VersionMismatchError: the object changed or disappeared since ``version`` was read.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is fine."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix``."""

    # ---------------------------------------------------- built on the above

    def exists(self, key: str) -> bool:
        """Whether the object is there."""
        return self.size(key) is not None

    def version(self, key: str) -> str | None:
        """The object's version token (as :meth:`get_versioned` gives it) without its bytes where possible;
        None if absent. Implementations override this with a cheaper lookup (a file's stat, a HEAD)."""
        found = self.get_versioned(key)
        return None if found is None else found[1]

    def disk_usage(self, prefix: str = "") -> tuple[int, int]:
        """``(bytes, objects)`` under ``prefix`` (everything by default)."""
        total = count = 0
        for _key, size in self.list(prefix):
            total += size
            count += 1
        return total, count

    def parallel_map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> builtins.list[_R]:
        """``[fn(item) for item in items]``, with independent requests at once where that pays (object storage:
        up to ``max_connections`` in flight; a local disk: one after the other). ``fn`` makes a few small
        requests of its own (an index, a ``zarr.json``); the first exception it raises is raised here."""
        return [fn(item) for item in items]

    def where(self, key: str) -> str:
        """How to name ``key`` in a message (a file path for local storage)."""
        return f"{self.location}/{key}" if key else self.location

    def durable(self) -> Storage:
        """This storage with writes that are on stable storage when they return (local files: fsync'd file
        and folder). Object storage acknowledges only durable writes: itself."""
        return self

    def cleanup(self, key: str) -> int:
        """Remove what killed writers of ``key`` left behind (local files: temporaries of dead processes);
        returns how many. Nothing to do elsewhere."""
        return 0

    # -------------------------------------------------------- local fast path

    def local_path(self, key: str) -> Path | None:
        """A regular file holding the object, where there is one (None otherwise)."""
        return None

    def open_map(self, key: str) -> np.ndarray | None:
        """A private (copy-on-write) uint8 memory map of the object, where possible (None otherwise).

        Raises:
            FileNotFoundError: the object does not exist.
        """
        return None

    def open_fd(self, key: str) -> int | None:
        """A read-only descriptor of a regular file holding the object (the caller closes it), where there is
        one (None otherwise): for mapping many objects into one address range (the reader's shard arena).

        Raises:
            FileNotFoundError: the object does not exist.
        """
        return None

    def begin_put(self, key: str) -> FileInProgress | None:
        """A new object for ``key`` filled in place (local files: a temporary file written with ``pwritev``, so
        the bytes are copied once, straight from the caller's buffers into the page cache), where the storage
        has such files; None otherwise: the caller builds the bytes in memory and calls :meth:`put_if_absent`
        (object storage, which takes whole objects)."""
        return None

    # ------------------------------------------------------------------ zarr

    @abc.abstractmethod
    def zarr_store(self) -> Store:
        """A zarr-python store over the same root (metadata, small arrays, plain zarr compatibility)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # pragma: no cover - subclasses that pickle override this
        raise TypeError(f"{type(self).__name__} cannot be pickled; open it again in the other process")
