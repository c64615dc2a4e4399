"""Reading feature rows: memory-mapped shards for local stores, ranged reads otherwise.

Rows come back as numpy arrays of the storage dtype (``uint16`` bits for
bfloat16) and as torch tensors of the true dtype through :func:`to_tensor`.

Three paths, picked per shard:

* **fast** (local store, raw family, a shard as vlastore writes it): the shard
  file is memory-mapped once, its index parsed once, and the chunk area is seen
  as a ``(n_chunks, stride)`` uint8 matrix (each row = payload + crc32c). One
  row is a view into the page cache (no copy); a batch is one numpy fancy index
  per shard.
* **general local** (compressed families, shards written by other tools):
  memory-mapped, one chunk at a time through the index, decompressed if needed.
* **remote** (any store that is not local files, e.g. S3 or a ``MemoryStore``):
  the index is fetched once per shard with a suffix read, each chunk with one
  ranged read; nothing else of the shard is held in memory.

Checksums: every chunk carries a crc32c. ``verify="always"`` checks it on every
read, ``"once"`` (the default) the first time this process reads the chunk,
``"never"`` not at all. On the machines measured a crc32c costs about as much as
copying the row (see docs/reading.md), which is why "always" is not the default.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arena as _arena
from .format import generation_path
from .layout import as_row_numbers
from .shardcodec import ChecksumError, ShardIndex, crc32c, decode_index, index_nbytes, zstd_decode_exact

if TYPE_CHECKING:
    import torch

    from .store import VLAStore

__all__ = ["FeatureReader", "MissingRowError", "StaleGenerationError", "VERIFY_MODES", "ARENA_MAX_ROWS", "to_tensor"]

VERIFY_MODES = ("always", "once", "never")
_FORKS = [0]
"""Bumped in every forked child: a reader made before the fork sees it and drops its maps.
(Cheaper than comparing ``os.getpid()`` on every read, which is a system call.)"""


def _forked() -> None:
    _FORKS[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

ARENA_MAX_ROWS = 1 << 27
"""Fixed families with more rows read shard by shard: the shared range's row map costs 9 bytes per row."""

_PROCESS_LOCAL = ("_shards", "_arena", "_gpos", "_row_ok", "_records", "_record_crcs", "_record_mv")
_CRC_BYTES = 4


class MissingRowError(KeyError):
    """A planned row has not been written (its shard is missing or the row was skipped)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class StaleGenerationError(RuntimeError):
    """The generation this reader was opened on has been deleted; reload the store and read the current one."""


def to_tensor(array: np.ndarray, true_dtype: str) -> torch.Tensor:
    """A torch tensor sharing memory with ``array``, reinterpreted as ``true_dtype``."""
    import torch

    if not array.flags.writeable:  # decompressed or fetched bytes: torch wants writable memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    if true_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


class _Shard:
    """One opened shard: its index and the way to reach its chunks."""

    __slots__ = ("index", "buf", "payload", "records", "crcs", "pos", "verified", "where")

    def __init__(self, index: ShardIndex, buf: np.ndarray | None, where: str) -> None:
        self.index = index
        self.buf = buf  # the mapped file (local) or None (remote: ranged reads)
        self.where = where
        # checked and intact, for verify="once": per position on the strided path, else per chunk
        self.verified = np.zeros(len(index.present), dtype=bool)
        self.payload: np.ndarray | None = None
        self.records: np.ndarray | None = None
        self.crcs: np.ndarray | None = None
        self.pos: np.ndarray | None = None

    def make_strided(self) -> None:
        """Expose the chunk area as a ``(n_chunks, stride)`` matrix (raw shards as vlastore writes them)."""
        assert self.buf is not None
        stride = self.index.stride
        n = int(self.index.present.sum())
        body = self.buf[: n * stride].reshape(n, stride)
        self.payload = body[:, : stride - _CRC_BYTES]
        self.crcs = body[:, stride - _CRC_BYTES :].view("<u4")[:, 0]
        # each payload as one opaque element: numpy gathers those with one memcpy per row
        self.records = np.ndarray((n,), dtype=np.dtype((np.void, stride - _CRC_BYTES)), buffer=self.buf,
                                  strides=(stride,))
        # present chunks sit back to back in chunk order, so a chunk's position is offset // stride
        pos = np.full(len(self.index.present), -1, dtype=np.int64)
        pos[self.index.present] = (self.index.offsets[self.index.present] // np.uint64(stride)).astype(np.int64)
        self.pos = pos


class FeatureReader:
    """Rows of one generation of one family.

    Picklable: a copy (e.g. in a DataLoader worker) reopens shards lazily in its
    own process, and a forked child drops its parent's maps on first use, so no
    memory map or file handle crosses a ``fork``/``spawn``.

    Args:
        store: the open store.
        family: feature family name.
        generation: which generation (the current one by default).
        verify: when to check crc32c: ``"always"``, ``"once"`` per chunk and
            process (default), or ``"never"``.
    """

    def __init__(self, store: VLAStore, family: str, generation: int | None = None, verify: str = "once") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: use one of {VERIFY_MODES}")
        self.store = store
        self.family = family
        self.info = store.generation(family, generation)
        self.generation = self.info.generation
        self.spec = self.info.spec
        self.layout = store.layout(family, self.generation)
        self.row_shape = self.spec.row_shape
        self.dtype = self.spec.storage_dtype
        self.row_nbytes = self.spec.row_nbytes
        self.verify = verify
        self.local = store.storage.local_root is not None
        self.stride = self.row_nbytes + _CRC_BYTES
        # local raw families map all their shards into one address range (see arena.py); its row map is
        # O(rows), so a family with more rows than ARENA_MAX_ROWS (or a store claiming so) reads shard by shard
        self.use_arena = (self.local and self.spec.compression is None and _arena.available()
                          and (self.spec.ragged or self.layout.rows <= ARENA_MAX_ROWS))
        self._reset()

    def _reset(self) -> None:
        self._shards: dict[int, _Shard] = {}
        self._arena: _arena.ShardArena | None = None
        self._arena_failed = False
        self._gpos: np.ndarray | None = None  # fixed families: row -> record in the arena (past the end: unmapped)
        self._row_ok: np.ndarray | None = None  # fixed families in the arena, verify="once": checked rows
        self._records: np.ndarray | None = None
        self._record_crcs: np.ndarray | None = None
        self._record_mv: memoryview | None = None
        self._pid = os.getpid()
        self._fork = _FORKS[0]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in _PROCESS_LOCAL:  # maps and views of them belong to this process only
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        path = "mmap" if self.local and self.spec.compression is None else "general"
        return (f"FeatureReader({self.family!r}, generation {self.generation}, {self.layout.rows} rows, "
                f"{path} path, verify={self.verify!r})")

    def close(self) -> None:
        """Drop the maps of this reader (views handed out keep theirs alive)."""
        self._reset()

    def _check_pid(self) -> None:
        if self._fork != _FORKS[0] or self._pid != os.getpid():  # forked: the parent's maps are not ours
            self._reset()

    def _get_arena(self) -> _arena.ShardArena | None:
        if self._arena is None and self.use_arena and not self._arena_failed:
            rps = self.layout.rows_per_shard
            try:
                self._arena = _arena.ShardArena(self.layout.n_shards, rps * self.stride + index_nbytes(rps),
                                                self.stride)
            except OSError:
                self._arena_failed = True
                return None
            if not self.spec.ragged:
                self._records = self._arena.records(self.row_nbytes)
                self._gpos = np.full(self.layout.rows, len(self._records), dtype=np.int64)
                self._row_ok = np.zeros(self.layout.rows, dtype=bool)
                self._record_crcs = self._arena.crcs(self.row_nbytes)
                self._record_mv = self._arena.buf.data
        return self._arena

    # ------------------------------------------------------------------ shards

    def _shard(self, shard: int) -> _Shard:
        self._check_pid()
        cached = self._shards.get(shard)
        if cached is not None:
            return cached
        entry = self._open_shard(shard)
        self._shards[shard] = entry
        return entry

    def _open_shard(self, shard: int) -> _Shard:
        key = self.store.shard_key(self.family, shard, self.generation)
        storage = self.store.storage
        n_index = index_nbytes(self.layout.rows_per_shard)
        buf: np.ndarray | None = None
        in_arena = False
        data_nbytes: int | None = None
        where = storage.where(key)
        if storage.file_path(key) is not None:
            fd = storage.open_file(key)  # a regular file inside the store, or UnsafeFileError (never blocks)
            if fd is None:
                raise self._shard_gone(shard)
            try:
                size = os.fstat(fd).st_size
                if size < n_index:
                    raise ChecksumError(f"{where}: {size} bytes, too short for the index of {n_index} bytes; the "
                                        "shard is corrupt, rewrite it")
                data_nbytes = size - n_index
                arena = self._get_arena()
                if arena is not None:
                    try:
                        buf = arena.map(shard, fd, size, where)
                        in_arena = True
                    except (OSError, ValueError):  # e.g. a shard not written by vlastore: map it on its own
                        buf = None
                if buf is None:
                    # copy-on-write map: pages are shared with the page cache, arrays are writable
                    # (torch.from_numpy needs no copy) and a write never reaches the file
                    buf = np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
            finally:
                os.close(fd)
            tail = buf[-n_index:]
        else:
            data = storage.read_range(key, -n_index)
            if data is None:
                raise self._shard_gone(shard)
            tail = np.frombuffer(data, dtype=np.uint8)
        try:
            index = decode_index(tail, self.layout.rows_per_shard, data_nbytes)
        except ChecksumError as exc:
            raise ChecksumError(f"{where}: {exc}; the shard is corrupt, rewrite it") from None
        entry = _Shard(index, buf, where)
        # the strided fast path only for chunks of exactly one raw row each (else: per chunk, sizes checked)
        if buf is not None and index.stride == self.stride and self.spec.compression is None:
            entry.make_strided()
            if in_arena and self._gpos is not None:
                arena = self._arena
                assert arena is not None and entry.pos is not None and self._records is not None
                rows = self.layout.shard_rows(shard)
                pos = entry.pos[rows - shard * self.layout.rows_per_shard]
                self._gpos[rows] = np.where(pos >= 0, shard * arena.records_per_slot + pos, len(self._records))
        return entry

    def _shard_gone(self, shard: int) -> Exception:
        """The error for an absent shard file: not written yet, or its generation was deleted meanwhile."""
        if not self.store.storage.exists(generation_path(self.family, self.generation)):
            return StaleGenerationError(
                f"family {self.family!r} generation {self.generation} was deleted (a newer generation was switched "
                "in and this one was not kept); this reader was opened before. Call store.reload() and "
                "store.reader(family) again, or VLADataset.refresh() at the epoch boundary, then read again"
            )
        return MissingRowError(
            f"family {self.family!r} generation {self.generation}: shard {shard} is not written "
            f"(rows {self._describe_shard(shard)}); run the writer/ingestion again to finish it"
        )

    def _describe_shard(self, shard: int) -> str:
        rows = self.layout.shard_rows(shard)
        if rows.size == 0:
            return "none"
        return f"{self.describe(int(rows[0]))} .. {self.describe(int(rows[-1]))}"

    def describe(self, row: int) -> str:
        """``('episode_name', vlm_idx=3)`` for a row number."""
        e, item = self.layout.address(row)
        return f"({self.store.catalog.names[e]!r}, {self.spec.index_name}={item})"

    # ---------------------------------------------------------------- checks

    def _missing(self, row: int, shard: int) -> MissingRowError:
        return MissingRowError(
            f"family {self.family!r} generation {self.generation}: row {self.describe(row)} was not written "
            f"(shard {shard} holds no data for it); it was skipped at ingestion or the writer never got it. "
            "Finish writing it, or read with on_missing='skip'"
        )

    def _corrupt(self, row: int, entry: _Shard) -> ChecksumError:
        return ChecksumError(
            f"family {self.family!r}: row {self.describe(row)} is corrupt (crc32c mismatch in {entry.where}); "
            "run `vlastore verify` and rewrite the affected rows"
        )

    def _check_range(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= self.layout.rows):
            bad = int(rows[(rows < 0) | (rows >= self.layout.rows)][0])
            raise IndexError(f"row {bad} out of range: family {self.family!r} has {self.layout.rows} rows")

    def _verify_positions(self, entry: _Shard, positions: np.ndarray, rows_of: np.ndarray) -> None:
        """crc32c of strided chunks at ``positions`` (``rows_of``: the row each belongs to, for errors)."""
        if self.verify == "never":
            return
        assert entry.payload is not None and entry.crcs is not None and entry.pos is not None
        if self.verify == "once":
            todo = np.flatnonzero(~entry.verified[positions])
            if todo.size == 0:
                return
        else:
            todo = np.arange(len(positions))
        payload, crcs = entry.payload, entry.crcs
        for i in todo.tolist():
            p = int(positions[i])
            if crc32c(payload[p]) != int(crcs[p]):
                raise self._corrupt(int(rows_of[i]), entry)
        entry.verified[positions[todo]] = True

    # -------------------------------------------------------------------- rows

    def _locate(self, row: int) -> tuple[_Shard, int, int, int]:
        if self.spec.ragged:
            start, length = int(self.layout.starts[row]), int(self.layout.lengths[row])
        else:  # stored row == row: no per-row table needed
            start, length = row, 1
        shard = start // self.layout.rows_per_shard
        return self._shard(shard), shard, start - shard * self.layout.rows_per_shard, length

    def _row_bytes(self, row: int) -> np.ndarray:
        """One row as uint8 ``(length, row_nbytes)`` (a view on the fast path)."""
        entry, shard, first, length = self._locate(row)
        if entry.pos is not None:
            assert entry.payload is not None
            # present chunks are packed in chunk order: the row is whole iff its first and last
            # chunks are present and exactly length - 1 positions apart
            p0, p_last = int(entry.pos[first]), int(entry.pos[first + length - 1])
            if p0 < 0 or p_last - p0 != length - 1:
                raise self._missing(row, shard)
            if self.verify == "always" or (self.verify == "once" and not entry.verified[p0 : p0 + length].all()):
                self._verify_positions(entry, np.arange(p0, p0 + length), np.full(length, row))
            return entry.payload[p0 : p0 + length]
        if not entry.index.present[first : first + length].all():
            raise self._missing(row, shard)
        parts = [self._chunk(entry, c, row) for c in range(first, first + length)]
        return np.stack(parts) if length > 1 else parts[0][None]

    def _chunk(self, entry: _Shard, chunk: int, row: int) -> np.ndarray:
        """One chunk's payload through the index (general and remote paths)."""
        off, nb = int(entry.index.offsets[chunk]), int(entry.index.nbytes[chunk])
        expected = self.row_nbytes + _CRC_BYTES if self.spec.compression is None else None
        if expected is not None and nb != expected:  # a raw chunk is exactly one row and its crc
            raise self._corrupt(row, entry)
        if entry.buf is not None:
            raw = entry.buf[off : off + nb]
        else:
            shard = int(self.layout.shard_of(np.asarray([row]))[0])
            key = self.store.shard_key(self.family, shard, self.generation)
            data = self.store.storage.read_range(key, off, nb)
            if data is None:  # the shard vanished since its index was read (generation removed)
                raise self._shard_gone(shard)
            raw = np.frombuffer(bytearray(data), dtype=np.uint8)  # writable, so torch.from_numpy takes it as is
        body = raw[:-_CRC_BYTES]
        if raw.size != nb or nb < _CRC_BYTES:
            raise self._corrupt(row, entry)
        if self.verify == "always" or (self.verify == "once" and not entry.verified[chunk]):
            if crc32c(np.ascontiguousarray(body)) != int.from_bytes(raw[-_CRC_BYTES:].tobytes(), "little"):
                raise self._corrupt(row, entry)
            entry.verified[chunk] = True
        if self.spec.compression is not None:
            try:  # the frame's declared size is checked before anything is allocated
                body = zstd_decode_exact(body.tobytes(), self.row_nbytes)
            except ChecksumError:
                raise self._corrupt(row, entry) from None
        if body.size != self.row_nbytes:
            raise self._corrupt(row, entry)
        return body

    def row(self, row: int) -> np.ndarray:
        """One row as a numpy array of the storage dtype.

        On the fast path it is a view into the mapped shard (no copy); a ragged
        row ``[L, *row_shape]`` is then a strided view (token rows with a crc
        between them).

        Raises:
            IndexError: no such row. MissingRowError: not written.
            ChecksumError: the stored bytes are corrupt.
        """
        if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
            raise TypeError(f"a row number must be an integer, got {type(row).__name__} {row!r}")
        row = int(row)
        if not 0 <= row < self.layout.rows:
            raise IndexError(f"row {row} out of range: family {self.family!r} has {self.layout.rows} rows")
        data = self._row_bytes(row)
        if self.spec.ragged:
            return data.view(self.dtype).reshape(len(data), *self.row_shape)
        return data[0].view(self.dtype).reshape(self.row_shape)

    def rows(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Several rows (each as :meth:`row`), read in shard order."""
        rows = as_row_numbers(rows)
        self._check_range(rows)
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        for i in np.argsort(rows, kind="stable").tolist():
            out[i] = self.row(int(rows[i]))
        return out

    def gather(self, rows: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of a fixed-shape family stacked as ``[len(rows), *row_shape]`` (storage dtype).

        On the fast path (local raw store, Linux) all shards are mapped into one
        address range and the batch is one numpy fancy index, the only copy
        made; otherwise rows are grouped by shard. Row numbers are identifiers:
        a negative one raises IndexError, as in :meth:`row` (never counted from the end).

        Raises:
            ValueError: the family is ragged (use :meth:`gather_padded`).
            IndexError, MissingRowError, ChecksumError: as :meth:`row`.
            TypeError: row numbers that are not integers.
        """
        if type(rows) is not np.ndarray or rows.dtype != np.int64 or rows.ndim != 1:
            rows = as_row_numbers(rows)
        # numpy would count negative indices from the end on the fast path: refuse them first
        if out is None and len(rows) and self._fork == _FORKS[0] and rows.min() >= 0:
            hot = self._gather_mapped(rows)
            if hot is not None:
                return hot
        if self.spec.ragged:
            raise ValueError(f"family {self.family!r} is ragged; use gather_padded(rows)")
        self._check_range(rows)
        n = len(rows)
        if n == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype) if out is None else out
        self._check_pid()
        if self._get_arena() is not None and self._gpos is not None:
            mapped = self._gather_arena(rows)
            if mapped is not None:
                result = mapped.view(self.dtype).reshape(n, *self.row_shape)
                if out is None:
                    return result
                out[...] = result
                return out
        rps = self.layout.rows_per_shard
        shards = rows // rps  # fixed families: stored row == row
        chunks = rows - shards * rps
        if shards[0] == shards[-1] and (shards == shards[0]).all():
            groups: list[tuple[int, np.ndarray]] = [(int(shards[0]), np.arange(n))]
        else:
            order = np.argsort(shards, kind="stable")
            cuts = np.flatnonzero(np.diff(shards[order])) + 1
            groups = [(int(shards[g[0]]), g) for g in np.split(order, cuts)]
        record = np.dtype((np.void, self.row_nbytes))
        records: np.ndarray | None = None
        if out is not None:
            records = out.reshape(n, -1).view(np.uint8).view(record).reshape(n)
        for shard, sel in groups:
            entry = self._shard(shard)
            if entry.records is None:
                if records is None:
                    records = np.empty(n, dtype=record)
                for i in sel.tolist():
                    records[i] = self._row_bytes(int(rows[i]))[0].view(record)[0]
                continue
            positions = entry.pos[chunks[sel]]  # type: ignore[index]
            if (positions < 0).any():
                raise self._missing(int(rows[sel[np.argmax(positions < 0)]]), shard)
            self._verify_positions(entry, positions, rows[sel])
            if records is None and len(sel) == n:
                records = entry.records[positions]  # the one copy, already in order
            else:
                if records is None:
                    records = np.empty(n, dtype=record)
                records[sel] = entry.records[positions]
        assert records is not None
        return out if out is not None else records.view(self.dtype).reshape(n, *self.row_shape)

    def _gather_mapped(self, rows: np.ndarray) -> np.ndarray | None:
        """The hot path once the rows' shards are in the arena: a handful of numpy calls, whatever the shards.

        Rows not mapped (yet), missing or corrupt point one past the last record, so the
        fancy index raises IndexError (None: take the slow path) and needs no extra check.
        """
        gpos, records_view = self._gpos, self._records
        if gpos is None or records_view is None:
            return None
        try:
            records = gpos[rows]
            result = records_view[records]
        except IndexError:
            return None
        if self.verify != "never":
            self._verify_records(rows, records)
        return result.view(self.dtype).reshape(len(rows), *self.row_shape)

    def _gather_arena(self, rows: np.ndarray) -> np.ndarray | None:
        """Rows as void records in one fancy index over the arena; None when a row is not mapped there."""
        assert self._gpos is not None and self._records is not None
        records = self._gpos[rows]
        unmapped = len(self._records)
        if records.max() >= unmapped:
            rps = self.layout.rows_per_shard
            for shard in np.unique(rows[records >= unmapped] // rps).tolist():
                self._shard(shard)
            records = self._gpos[rows]
            if records.max() >= unmapped:  # missing rows or shards outside the arena: the per-shard path reports
                return None
        if self.verify != "never":
            self._verify_records(rows, records)
        return self._records[records]

    def _verify_records(self, rows: np.ndarray, records: np.ndarray) -> None:
        """crc32c of arena records (verify="once": only rows this process has not checked yet)."""
        mv, crcs, nb, stride = self._record_mv, self._record_crcs, self.row_nbytes, self.stride
        assert mv is not None and crcs is not None and self._row_ok is not None
        todo: Any = range(len(rows))
        if self.verify == "once":
            ok = self._row_ok[rows]
            if ok.all():
                return
            todo = np.flatnonzero(~ok).tolist()
        for i in todo:
            g = int(records[i])
            if crc32c(mv[g * stride : g * stride + nb]) != int(crcs[g]):
                row = int(rows[i])
                raise self._corrupt(row, self._shard(row // self.layout.rows_per_shard))
        if self.verify == "once":
            self._row_ok[rows[todo]] = True

    def gather_padded(self, rows: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ragged rows zero-padded to the longest: ``([len(rows), L_max, *row_shape], lengths)``."""
        if not self.spec.ragged:
            raise ValueError(f"family {self.family!r} has fixed-shape rows; use gather(rows)")
        rows = as_row_numbers(rows)
        self._check_range(rows)
        lengths = self.layout.lengths[rows]
        longest = int(lengths.max()) if len(rows) else 0
        out = np.zeros((len(rows), longest, *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), longest, -1).view(np.uint8)
        for i in np.argsort(rows, kind="stable").tolist():
            flat[i, : lengths[i]] = self._row_bytes(int(rows[i]))
        return out, lengths.copy()

    def tensor(self, row: int) -> torch.Tensor:
        """One row as a torch tensor of the family's true dtype."""
        return to_tensor(self.row(row), self.spec.dtype)
