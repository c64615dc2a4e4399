"""The seam and zarr-python's ``Store``, both ways.

- :class:`SeamStore`: zarr-python over any :class:`~vlastore.storage.base.Storage`.
  zarr-python reads and writes metadata and small arrays; vlastore moves the
  bytes. One transport per store (its retries, checks and conditional writes)
  instead of a second client stack: zarr's own ``FsspecStore`` would need s3fs,
  whose fsspec and aiobotocore pins made ``pip install vlastore[dev]``
  unresolvable next to the CPU torch wheel. The blocking Storage calls run in
  zarr's event loop through ``asyncio.to_thread``.
- :class:`ZarrStoreStorage`: the seam over any zarr ``Store`` a user hands in
  (e.g. ``MemoryStore``): best effort, since a zarr ``Store`` has no
  conditional writes (they are made atomic within this process by a lock).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync

from .base import (
    AlreadyExistsError,
    Storage,
    VersionMismatchError,
    check_key,
    check_prefix,
    coalesce_ranges,
    under_prefix,
)
from .base import Buffer as Data

__all__ = ["SeamStore", "ZarrStoreStorage"]


class SeamStore(Store):
    """A zarr ``Store`` whose keys are the Storage's keys (the store root is the Storage root)."""

    supports_writes = True
    supports_deletes = True
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, storage: Storage, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self.storage = storage

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeamStore) and other.storage is self.storage and other.read_only == self.read_only

    def __repr__(self) -> str:
        return f"SeamStore({self.storage.location!r})"

    def with_read_only(self, read_only: bool = False) -> SeamStore:
        return SeamStore(self.storage, read_only=read_only)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        if byte_range is None:
            return self.storage.get(key)
        if isinstance(byte_range, RangeByteRequest):
            return self.storage.get_range(key, byte_range.start, byte_range.end)
        if isinstance(byte_range, OffsetByteRequest):
            return self.storage.get_range(key, byte_range.offset)
        if isinstance(byte_range, SuffixByteRequest):
            return self.storage.get_range(key, -byte_range.suffix)
        raise TypeError(f"unexpected byte range {byte_range!r}")

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.storage.size, key) is not None

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()
        await asyncio.to_thread(self.storage.put, key, value.to_bytes())

    async def delete(self, key: str) -> None:
        self._check_writable()
        await asyncio.to_thread(self.storage.delete, key)

    async def delete_dir(self, prefix: str) -> None:
        self._check_writable()
        await asyncio.to_thread(self.storage.delete_prefix, prefix.rstrip("/"))

    async def list(self) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, ""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        base = prefix.rstrip("/")
        children: set[str] = set()
        for key in await asyncio.to_thread(self._keys, base):
            rest = key[len(base) + 1 :] if base else key
            if rest:
                children.add(rest.split("/", 1)[0])
        for child in sorted(children):
            yield child

    def _keys(self, prefix: str) -> builtins.list[str]:
        # zarr's prefixes are plain string prefixes; Storage lists folders: list the enclosing one, then filter
        folder = prefix.rstrip("/") if prefix.endswith("/") else prefix.rpartition("/")[0]
        return [key for key, _size in self.storage.list(folder) if key.startswith(prefix)]

    async def getsize(self, key: str) -> int:
        size = await asyncio.to_thread(self.storage.size, key)
        if size is None:
            raise FileNotFoundError(key)
        return size

    def _check_writable(self) -> None:
        if self.read_only:
            raise ValueError(f"{self.storage.location} is open read-only")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("SeamStore cannot be pickled; open the store again in the other process")


def _content_version(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _bytes_of(data: Data) -> bytes:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return bytes(data)


class ZarrStoreStorage(Storage):
    """The storage seam over a zarr ``Store`` (``MemoryStore``, ``FsspecStore``, ...).

    Versions are content hashes; ``put_if_absent`` and ``put_if_version`` are
    atomic among the threads of this process only (a zarr ``Store`` has no
    conditional writes): enough for a ``MemoryStore``, best effort elsewhere.
    """

    is_local = False

    def __init__(self, store: Store) -> None:
        self.store = store
        self.location = repr(store)
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (ZarrStoreStorage, (self.store,))

    def _fetch(self, key: str, request: ByteRequest | None) -> bytes | None:
        check_key(key)
        buf = sync(self.store.get(key, prototype=default_buffer_prototype(), byte_range=request))
        return None if buf is None else buf.to_bytes()

    def get(self, key: str) -> bytes | None:
        return self._fetch(key, None)

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        if start < 0 and end is None:
            size = self.size(key)
            if size is None:
                return None
            start = max(0, size + start)  # SuffixByteRequest past the start is not clipped by every store
        elif end is not None and end <= start:
            return b"" if self.size(key) is not None else None
        size = self.size(key)
        if size is None:
            return None
        end = size if end is None else min(end, size)
        if start >= end:
            return b""
        return self._fetch(key, RangeByteRequest(start, end))

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        ranges = [(int(a), int(b)) for a, b in ranges]
        runs = coalesce_ranges(ranges)
        if self.size(key) is None:
            raise FileNotFoundError(f"{self.where(key)}: no such object")
        out = [b""] * len(ranges)
        for run_start, run_end, members in runs:
            data = self.get_range(key, run_start, run_end)
            if data is None:
                raise FileNotFoundError(f"{self.where(key)}: no such object")
            view = memoryview(data)
            for i in members:
                start, end = ranges[i]
                out[i] = bytes(view[start - run_start : end - run_start])
        return out

    def size(self, key: str) -> int | None:
        check_key(key)
        if not sync(self.store.exists(key)):
            return None
        try:
            return int(sync(self.store.getsize(key)))
        except FileNotFoundError:
            return None

    def _keys(self, prefix: str) -> list[str]:
        stem = check_prefix(prefix).rstrip("/")

        async def collect() -> list[str]:
            return [k async for k in self.store.list_prefix(f"{stem}/" if stem else "")]

        return [k for k in sync(collect()) if under_prefix(k, stem)]

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        for key in self._keys(prefix):
            size = self.size(key)
            if size is not None:
                yield key, size

    def put(self, key: str, data: Data) -> None:
        from zarr.core.buffer import cpu

        check_key(key)
        sync(self.store.set(key, cpu.Buffer.from_bytes(_bytes_of(data))))

    def put_if_absent(self, key: str, data: Data) -> None:
        with self._lock:
            if self.size(key) is not None:
                raise AlreadyExistsError(f"{self.where(key)} exists (another writer wrote it)")
            self.put(key, data)

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        data = self.get(key)
        return None if data is None else (data, _content_version(data))

    def put_if_version(self, key: str, data: Data, version: str) -> str:
        body = _bytes_of(data)
        with self._lock:
            if self.version(key) != version:
                raise VersionMismatchError(f"{self.where(key)} changed since it was read")
            self.put(key, body)
        return _content_version(body)

    def delete(self, key: str) -> None:
        check_key(key)
        sync(self.store.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        for key in self._keys(prefix):
            sync(self.store.delete(key))

    def zarr_store(self) -> Store:
        return self.store
