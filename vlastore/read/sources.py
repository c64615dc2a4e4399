"""Where the bytes of a generation's shards come from.

A *source* opens one shard at a time and hands back a :class:`Shard`: the
parsed index and a way to its chunks. Three sources, tried in this order by
the reader (:mod:`.reader`), each saying None when it cannot serve a shard:

* :class:`ArenaSource`: every shard of the family mapped side by side into one
  address range (:mod:`.arena`), for raw families on a storage that hands out
  file descriptors (local files). A batch of rows is then one fancy index.
* :class:`MapSource`: one private memory map per shard, on any storage whose
  ``open_map`` returns one (local files, the node-local cache of an object store).
* :class:`RangedSource`: ranged reads (``Storage.get_ranges``): the index once
  per shard with a suffix read, then the chunks of each run of adjacent rows in
  one request. Nothing else of the shard is held in memory.

A mapped raw shard as vlastore writes it (every chunk one row plus its crc32c,
back to back from offset 0) is a :class:`StridedShard`: its chunk area seen as
a ``(n_chunks, stride)`` uint8 matrix, so a row is a view and a batch a fancy
index. Anything else (compressed families, shards written by other tools,
ranged reads) is an :class:`IndexedShard`, read chunk by chunk through the index.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence

import numpy as np

from ..family import FamilyHandle
from ..shardcodec import (
    CRC_BYTES,
    ChecksumError,
    ShardIndex,
    crc_mismatch,
    crc_ok,
    decode_index,
    index_nbytes,
    row_crcs,
    run_intact,
)
from . import arena as _arena

__all__ = [
    "Shard",
    "StridedShard",
    "IndexedShard",
    "ShardSource",
    "ArenaSource",
    "MapSource",
    "RangedSource",
    "shard_verifier",
    "register_verifier",
]


class Shard:
    """One opened shard: its index, where it is (for messages), and which chunks this process checked."""

    __slots__ = ("index", "where", "verified")

    def __init__(self, index: ShardIndex, where: str) -> None:
        self.index = index
        self.where = where
        # checked and intact, for verify="once": per position on the strided path, else per chunk
        self.verified = np.zeros(len(index.present), dtype=bool)


_WHOLE_BATCH = 8
"""verify="once": when more than 1/8 of a batch's rows are unchecked, the whole batch is checked as gathered
(one crc32c call per 64 rows); fewer are checked one by one."""


def first_corrupt(
    payload: np.ndarray, crcs: np.ndarray, positions: np.ndarray, todo: np.ndarray | None, gathered: np.ndarray | None
) -> tuple[int | None, bool]:
    """Check the rows at ``positions[todo]`` of ``payload`` (a ``(records, row_nbytes)`` uint8 matrix) against
    ``crcs``; ``todo`` None: all of them. ``gathered``: the rows at ``positions`` as already copied out
    (C-contiguous), or None.

    Returns:
        The index into ``positions`` of the first corrupt row checked (None when all are intact), and whether
        every row of ``positions`` was checked (the whole batch, as gathered) rather than only ``todo``.
    """
    n = len(positions)
    if gathered is not None and (todo is None or todo.size * _WHOLE_BATCH > n):
        stored = crcs[positions]
        if row_crcs(payload.shape[1]).all_match(gathered, stored):
            return None, True
        # locate the corrupt row in what was gathered (what the caller would hand out), in batch order
        bad = crc_mismatch(gathered.reshape(-1).view(np.uint8).reshape(n, -1), stored, np.arange(n))
        assert bad is not None, "rows that each match their crc match together"
        return bad, True
    if todo is None:
        return crc_mismatch(payload, crcs, positions), True
    bad = crc_mismatch(payload, crcs, positions[todo])
    return (None if bad is None else int(todo[bad])), False


class StridedShard(Shard):
    """A mapped raw shard whose chunks sit back to back: payload views and one-copy batches."""

    __slots__ = ("payload", "records", "crcs", "pos", "body", "stride")

    def __init__(self, index: ShardIndex, where: str, buf: np.ndarray) -> None:
        super().__init__(index, where)
        stride = index.stride
        n = int(index.present.sum())
        body = buf[: n * stride].reshape(n, stride)
        self.body = body
        self.stride = stride
        self.payload = body[:, : stride - CRC_BYTES]
        self.crcs = body[:, stride - CRC_BYTES :].view("<u4")[:, 0]
        # each payload as one opaque element: numpy gathers those with one memcpy per row
        self.records = np.ndarray((n,), dtype=np.dtype((np.void, stride - CRC_BYTES)), buffer=buf, strides=(stride,))
        # present chunks sit back to back in chunk order, so a chunk's position is offset // stride
        pos = np.full(len(index.present), -1, dtype=np.int64)
        pos[index.present] = (index.offsets[index.present] // np.uint64(stride)).astype(np.int64)
        self.pos = pos

    def first_bad(self, positions: np.ndarray, verify: str, gathered: np.ndarray | None = None) -> int | None:
        """Check the crc32c of the chunks at ``positions`` (``verify`` mode); the index into ``positions`` of
        the first corrupt one, or None when all are intact.

        ``gathered``: their payloads as already copied out (C-contiguous); checked there, hot in the CPU's
        cache, with one crc32c call per 64 rows instead of one per row.
        """
        if verify == "never":
            return None
        todo = None
        if verify == "once":
            ok = self.verified[positions]
            checked = int(np.count_nonzero(ok))
            if checked == len(positions):
                return None
            if gathered is None or (len(positions) - checked) * _WHOLE_BATCH <= len(positions):
                todo = np.flatnonzero(~ok)
        bad, whole = first_corrupt(self.payload, self.crcs, positions, todo, gathered)
        if bad is None:
            self.verified[positions if whole else positions[todo]] = True
        return bad

    def run_ok(self, first: int, length: int, verify: str) -> bool:
        """Whether the ``length`` adjacent chunks from position ``first`` (one ragged row) are intact
        (``verify`` mode), checked with one crc32c call over them, crcs included."""
        if verify == "never" or (verify == "once" and self.verified[first : first + length].all()):
            return True
        if not run_intact(self.body[first : first + length], self.stride):
            return False
        self.verified[first : first + length] = True
        return True


class IndexedShard(Shard):
    """A shard read chunk by chunk through its index, from a map or with ranged reads."""

    __slots__ = ("fetch",)

    def __init__(
        self, index: ShardIndex, where: str, fetch: Callable[[Sequence[tuple[int, int]]], list[np.ndarray]]
    ) -> None:
        super().__init__(index, where)
        self.fetch = fetch
        """``fetch(ranges)``: the bytes of each ``[start, end)`` as uint8 (one request per run of adjacent ranges)."""

    def raw_chunks(self, chunks: Sequence[int]) -> list[np.ndarray]:
        """Each chunk's stored bytes (payload and crc32c), unchecked."""
        offsets, nbytes = self.index.offsets, self.index.nbytes
        return self.fetch([(int(offsets[c]), int(offsets[c]) + int(nbytes[c])) for c in chunks])


def shard_verifier(handle: FamilyHandle) -> Callable[[str, np.ndarray], None]:
    """``verify(key, data)`` for a downloaded shard of ``handle``'s family: its index and the crc32c of every
    chunk it holds; raises ChecksumError naming the key."""
    rps = handle.layout.rows_per_shard
    n_index = index_nbytes(rps)

    def verify(key: str, data: np.ndarray) -> None:
        where = handle.storage.where(key)
        if data.size < n_index:
            raise ChecksumError(f"{where}: {data.size} bytes, too short for the index of {n_index} bytes")
        try:
            index = decode_index(data[-n_index:], rps, data.size - n_index)
        except ChecksumError as exc:
            raise ChecksumError(f"{where}: {exc}") from None
        if index.stride:  # chunks back to back from offset 0 (as vlastore writes): one crc32c call over them all
            n = int(np.count_nonzero(index.present))
            if run_intact(data[: n * index.stride], index.stride):
                return
        offsets, nbytes = index.offsets, index.nbytes
        for chunk in np.flatnonzero(index.present).tolist():  # one by one: which chunk is damaged
            start = int(offsets[chunk])
            if not crc_ok(data[start : start + int(nbytes[chunk])]):
                raise ChecksumError(f"{where}: chunk {chunk} fails its crc32c")

    return verify


def register_verifier(handle: FamilyHandle) -> None:
    """On a node cache (a storage with ``add_verify``): check each shard of ``handle`` downloaded from now on
    in this process with :func:`shard_verifier`. Nothing on other storages."""
    add_verify = getattr(handle.storage, "add_verify", None)
    if add_verify is not None:
        check = shard_verifier(handle)
        for segment in handle.segments:
            add_verify(segment.path, check)


class ShardSource(abc.ABC):
    """Opens the shards of one generation in one way."""

    def __init__(self, handle: FamilyHandle) -> None:
        self.handle = handle
        self.rows_per_shard = handle.layout.rows_per_shard
        self.n_index = index_nbytes(self.rows_per_shard)
        self.stride = handle.spec.row_nbytes + CRC_BYTES

    @abc.abstractmethod
    def open(self, shard: int) -> Shard | None:
        """The shard opened; None when this source cannot serve it (the reader tries the next one).

        Raises:
            FileNotFoundError: the shard file does not exist.
            ChecksumError: its index is corrupt (the message names the file).
        """

    def _decode(self, tail: np.ndarray, where: str, data_nbytes: int | None) -> ShardIndex:
        try:
            return decode_index(tail, self.rows_per_shard, data_nbytes)
        except ChecksumError as exc:
            raise ChecksumError(f"{where}: {exc}; the shard is corrupt, rewrite it") from None

    def _check_size(self, size: int, where: str) -> None:
        if size < self.n_index:
            raise ChecksumError(
                f"{where}: {size} bytes, too short for the index of {self.n_index} bytes; the "
                "shard is corrupt, rewrite it"
            )

    def _mapped(self, buf: np.ndarray, where: str) -> Shard:
        """A shard over its mapped bytes: strided when it is raw and laid out as vlastore writes it."""
        index = self._decode(buf[-self.n_index :], where, buf.size - self.n_index)
        if index.stride == self.stride and self.handle.spec.compression is None:
            return StridedShard(index, where, buf)
        return IndexedShard(index, where, lambda ranges: [buf[a:b] for a, b in ranges])


class MapSource(ShardSource):
    """One private memory map per shard (``Storage.open_map``: local files, a node-local cache).

    On a node cache (a storage with ``add_verify``), every shard downloaded is checked whole before it is
    renamed into the cache (:func:`shard_verifier`), so no process of the node ever maps a damaged copy.
    """

    def __init__(self, handle: FamilyHandle) -> None:
        super().__init__(handle)
        register_verifier(handle)

    def open(self, shard: int) -> Shard | None:
        key = self.handle.shard_key(shard)
        buf = self.handle.storage.open_map(key)
        if buf is None:
            return None
        where = self.handle.storage.where(key)
        self._check_size(buf.size, where)
        entry = self._mapped(buf, where)
        mapped = getattr(buf.base, "obj", buf.base)  # np.frombuffer holds a memoryview of the map
        if getattr(mapped, "verified", False):  # a node-cache copy checked whole on arrival: not again
            entry.verified[:] = True
        return entry


class RangedSource(ShardSource):
    """Ranged reads: the index once per shard, then one request per run of adjacent chunks."""

    def open(self, shard: int) -> Shard:
        key = self.handle.shard_key(shard)
        storage = self.handle.storage
        where = storage.where(key)
        data = storage.get_range(key, -self.n_index)
        if data is None:
            raise FileNotFoundError(where)
        index = self._decode(np.frombuffer(data, dtype=np.uint8), where, None)

        def fetch(ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
            # bytearray: writable, so torch.from_numpy takes the rows as they are
            return [np.frombuffer(bytearray(part), dtype=np.uint8) for part in storage.get_ranges(key, ranges)]

        return IndexedShard(index, where, fetch)


class ArenaSource(ShardSource):
    """Every shard of a raw family mapped into one reserved address range (see :mod:`.arena`).

    For fixed families it also keeps, per row, the record the row sits at in the
    range (``gpos``; one past the last record while the row's shard is not mapped,
    or the row is missing), so a batch of mapped rows is ``records[gpos[rows]]``.
    """

    def __init__(self, handle: FamilyHandle) -> None:
        super().__init__(handle)
        rps = self.rows_per_shard
        self.arena = _arena.ShardArena(handle.layout.n_shards, rps * self.stride + self.n_index, self.stride)
        self.gpos: np.ndarray | None = None
        self.row_ok: np.ndarray | None = None
        self.records: np.ndarray | None = None
        self.record_crcs: np.ndarray | None = None
        self.record_payload: np.ndarray | None = None
        if not handle.spec.ragged:
            nbytes = handle.spec.row_nbytes
            self.records = self.arena.records(nbytes)
            self.gpos = np.full(handle.layout.rows, len(self.records), dtype=np.int64)
            self.row_ok = np.zeros(handle.layout.rows, dtype=bool)
            self.record_crcs = self.arena.crcs(nbytes)
            self.record_payload = self.arena.record_bytes(nbytes)

    def open(self, shard: int) -> Shard | None:
        storage = self.handle.storage
        key = self.handle.shard_key(shard)
        fd = storage.open_fd(key)  # a regular file inside the store, or UnsafeFileError (never blocks)
        if fd is None:
            return None
        where = storage.where(key)
        try:
            size = os.fstat(fd).st_size
            self._check_size(size, where)
            try:
                buf = self.arena.map(shard, fd, size, where)
            except (OSError, ValueError):  # e.g. a shard not written by vlastore: mapped on its own instead
                return None
            # a node-cache copy checked whole on arrival (index and every chunk's crc32c): not again per row
            checked = getattr(storage, "verified_on_arrival", None)
            trusted = bool(checked is not None and checked(key, fd))
        finally:
            os.close(fd)
        entry = self._mapped(buf, where)
        if trusted:
            entry.verified[:] = True
        if isinstance(entry, StridedShard) and self.gpos is not None:
            assert self.records is not None
            layout = self.handle.layout
            rows = layout.shard_rows(shard)
            pos = entry.pos[layout.start_of(rows) - shard * self.rows_per_shard]
            self.gpos[rows] = np.where(pos >= 0, shard * self.arena.records_per_slot + pos, len(self.records))
            if trusted and self.row_ok is not None:
                self.row_ok[rows[pos >= 0]] = True
        return entry

    def first_bad(
        self, rows: np.ndarray, records: np.ndarray, verify: str, gathered: np.ndarray | None = None
    ) -> int | None:
        """crc32c of the arena records of ``rows`` (verify="once": only rows this process has not checked yet);
        the index into ``rows`` of the first corrupt one, or None. ``gathered``: as :meth:`StridedShard.first_bad`."""
        payload, crcs, row_ok = self.record_payload, self.record_crcs, self.row_ok
        assert payload is not None and crcs is not None and row_ok is not None
        todo = None
        if verify == "once":
            ok = row_ok[rows]
            checked = int(np.count_nonzero(ok))
            if checked == len(rows):
                return None
            if gathered is None or (len(rows) - checked) * _WHOLE_BATCH <= len(rows):
                todo = np.flatnonzero(~ok)
        bad, whole = first_corrupt(payload, crcs, records, todo, gathered)
        if bad is None and verify == "once":
            row_ok[rows if whole else rows[todo]] = True
        return bad
