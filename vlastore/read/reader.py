"""Reading feature rows: :class:`FeatureReader`.

Rows come back as numpy arrays of the storage dtype (``uint16`` bits for
bfloat16) and as torch tensors of the true dtype through :func:`to_tensor`.
Where the bytes come from is the business of the shard sources (:mod:`.sources`),
picked per shard: the shared address range of every shard (raw families on local
files), one memory map per shard (any storage that maps), or ranged reads (one
request per run of adjacent rows).

Checksums: every chunk carries a crc32c. ``verify="always"`` checks it on every
read, ``"once"`` (the default) the first time this process reads the chunk,
``"never"`` not at all. A batch is checked without a Python call per row (one crc32c
call per 64 gathered rows, see :class:`vlastore.shardcodec.RowCrcs`), yet the crc32c
still costs a good part of the copy (see docs/reading.md), which is why "always" is
not the default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import to_tensor
from ..family import FamilyHandle, HandleSource, StaleGenerationError, resolve_handle
from ..layout import as_row_numbers
from ..shardcodec import CRC_BYTES, ChecksumError, crc_ok, zstd_decode_exact
from . import arena as _arena
from .sources import ArenaSource, IndexedShard, MapSource, RangedSource, Shard, ShardSource, StridedShard

if TYPE_CHECKING:
    import torch

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

_PROCESS_LOCAL = ("_shards", "_arena", "_sources")


class MissingRowError(KeyError):
    """A planned row has not been written (its shard is missing or the row was skipped)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class FeatureReader:
    """Rows of one generation of one family.

    Picklable: a copy (e.g. in a DataLoader worker) reopens shards lazily in its
    own process, and a forked child drops its parent's maps on first use, so no
    memory map or file handle crosses a ``fork``/``spawn``.

    Args:
        source: the generation's :class:`~vlastore.family.FamilyHandle`, or a
            store (anything with ``handle(family, generation)``, e.g. a ``VLAStore``).
        family: with a store: the feature family's name.
        generation: with a store: which generation (the current one by default).
        verify: when to check crc32c: ``"always"``, ``"once"`` per chunk and
            process (default), or ``"never"``.
    """

    def __init__(
        self,
        source: FamilyHandle | HandleSource,
        family: str | None = None,
        generation: int | None = None,
        verify: str = "once",
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: use one of {VERIFY_MODES}")
        self.handle = resolve_handle(source, family, generation)
        self.family = self.handle.family
        self.info = self.handle.info
        self.generation = self.info.generation
        self.spec = self.info.spec
        self.layout = self.handle.layout
        self.row_shape = self.spec.row_shape
        self.dtype = self.spec.storage_dtype
        self.row_nbytes = self.spec.row_nbytes
        self.verify = verify
        # local files, or a node cache that hands out local files of whole shards
        self.local = self.handle.storage.is_local or getattr(self.handle.storage, "serves_local_files", False)
        # raw families on local files map all their shards into one address range (see arena.py); its row
        # map is O(rows), so a family with more rows than ARENA_MAX_ROWS (or a store claiming so) reads
        # shard by shard
        self.use_arena = (
            self.local
            and self.spec.compression is None
            and _arena.available()
            and (self.spec.ragged or self.layout.rows <= ARENA_MAX_ROWS)
        )
        self._reset()

    def _reset(self) -> None:
        self._shards: dict[int, Shard] = {}
        self._arena: ArenaSource | None = None
        self._sources: list[ShardSource] | None = None
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
        return (
            f"FeatureReader({self.family!r}, generation {self.generation}, {self.layout.rows} rows, "
            f"{path} path, verify={self.verify!r})"
        )

    def close(self) -> None:
        """Drop the maps of this reader (views handed out keep theirs alive)."""
        self._reset()

    def _check_pid(self) -> None:
        if self._fork != _FORKS[0] or self._pid != os.getpid():  # forked: the parent's maps are not ours
            self._reset()

    # ------------------------------------------------------------------ shards

    def _source_chain(self) -> list[ShardSource]:
        """The sources to try for each shard, fastest first (made on first use, in this process)."""
        if self._sources is None:
            chain: list[ShardSource] = []
            if self.use_arena:
                try:
                    self._arena = ArenaSource(self.handle)
                    chain.append(self._arena)
                except OSError:  # no room in the address space for this family: map shard by shard
                    self._arena = None
            self._sources = [*chain, MapSource(self.handle), RangedSource(self.handle)]
        return self._sources

    def _shard(self, shard: int) -> Shard:
        self._check_pid()
        cached = self._shards.get(shard)
        if cached is not None:
            return cached
        entry = self._open_shard(shard)
        self._shards[shard] = entry
        return entry

    def _open_shard(self, shard: int) -> Shard:
        try:
            for source in self._source_chain():
                entry = source.open(shard)
                if entry is not None:
                    return entry
        except FileNotFoundError:
            raise self._shard_gone(shard) from None
        raise AssertionError("ranged reads serve every shard")  # pragma: no cover

    def _shard_gone(self, shard: int) -> Exception:
        """The error for an absent shard file: not written yet, or its generation was deleted meanwhile."""
        if self.handle.is_deleted():
            return self.handle.stale_error()
        return MissingRowError(
            f"family {self.family!r} generation {self.generation}: shard {shard} is not written "
            f"(rows {self.handle.describe_shard(shard)}); run the writer/ingestion again to finish it"
        )

    def describe(self, row: int) -> str:
        """``('episode_name', vlm_idx=3)`` for a row number."""
        return self.handle.describe(row)

    # ---------------------------------------------------------------- checks

    def _missing(self, row: int, shard: int) -> MissingRowError:
        return MissingRowError(
            f"family {self.family!r} generation {self.generation}: row {self.describe(row)} was not written "
            f"(shard {shard} holds no data for it); it was skipped at ingestion or the writer never got it. "
            "Finish writing it, or read with on_missing='skip'"
        )

    def _corrupt(self, row: int, entry: Shard) -> ChecksumError:
        return ChecksumError(
            f"family {self.family!r}: row {self.describe(row)} is corrupt (crc32c mismatch in {entry.where}); "
            "run `vlastore verify` and rewrite the affected rows"
        )

    def _check_range(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= self.layout.rows):
            bad = int(rows[(rows < 0) | (rows >= self.layout.rows)][0])
            raise IndexError(f"row {bad} out of range: family {self.family!r} has {self.layout.rows} rows")

    # -------------------------------------------------------------------- rows

    def _strided_row(self, entry: StridedShard, shard: int, first: int, length: int, row: int) -> np.ndarray:
        """One row of a strided shard as a uint8 ``(length, row_nbytes)`` view."""
        # present chunks are packed in chunk order: the row is whole iff its first and last
        # chunks are present and exactly length - 1 positions apart
        p0, p_last = int(entry.pos[first]), int(entry.pos[first + length - 1])
        if p0 < 0 or p_last - p0 != length - 1:
            raise self._missing(row, shard)
        if not entry.run_ok(p0, length, self.verify):
            raise self._corrupt(row, entry)
        return entry.payload[p0 : p0 + length]

    def _decode_chunk(self, entry: IndexedShard, chunk: int, raw: np.ndarray, row: int) -> np.ndarray:
        """One chunk's payload from its stored bytes: size, crc32c (per ``verify``) and decompression checked."""
        nb = int(entry.index.nbytes[chunk])
        if self.spec.compression is None and nb != self.row_nbytes + CRC_BYTES:  # a raw chunk: one row + its crc
            raise self._corrupt(row, entry)
        if raw.size != nb or nb < CRC_BYTES:
            raise self._corrupt(row, entry)
        if self.verify == "always" or (self.verify == "once" and not entry.verified[chunk]):
            if not crc_ok(raw):
                raise self._corrupt(row, entry)
            entry.verified[chunk] = True
        body = raw[:-CRC_BYTES]
        if self.spec.compression is not None:
            try:  # the frame's declared size is checked before anything is allocated
                body = zstd_decode_exact(body.tobytes(), self.row_nbytes)
            except ChecksumError:
                raise self._corrupt(row, entry) from None
        if body.size != self.row_nbytes:
            raise self._corrupt(row, entry)
        return body

    def _shard_rows(self, shard: int, rows: np.ndarray) -> list[np.ndarray]:
        """Rows of one shard, each as uint8 ``(length, row_nbytes)`` (views on the strided path).

        Through the index, the chunks of all ``rows`` are fetched in one call: one
        request per run of adjacent chunks with ranged reads.
        """
        entry = self._shard(shard)
        base = shard * self.layout.rows_per_shard
        firsts = (self.layout.start_of(rows) - base).tolist()
        lengths = self.layout.lengths[rows].tolist()
        if isinstance(entry, StridedShard):
            return [
                self._strided_row(entry, shard, f, n, r) for r, f, n in zip(rows.tolist(), firsts, lengths, strict=True)
            ]
        assert isinstance(entry, IndexedShard)
        present = entry.index.present
        # rows up to the first one with a chunk missing are read (and checked) before that one is reported
        stop = next(
            (k for k, (f, n) in enumerate(zip(firsts, lengths, strict=True)) if not present[f : f + n].all()),
            len(firsts),
        )
        chunks = [c for f, n in zip(firsts[:stop], lengths[:stop], strict=True) for c in range(f, f + n)]
        try:
            raws = entry.raw_chunks(chunks) if chunks else []
        except FileNotFoundError:  # the shard vanished since its index was read (generation removed)
            raise self._shard_gone(shard) from None
        out, i = [], 0
        for r, n in zip(rows[:stop].tolist(), lengths[:stop], strict=True):
            parts = [self._decode_chunk(entry, chunks[j], raws[j], r) for j in range(i, i + n)]
            out.append(np.stack(parts) if n > 1 else parts[0][None])
            i += n
        if stop < len(firsts):
            raise self._missing(int(rows[stop]), shard)
        return out

    def _row_bytes(self, row: int) -> np.ndarray:
        """One row as uint8 ``(length, row_nbytes)`` (a view on the fast path)."""
        shard = int(self.layout.shard_of(np.asarray([row]))[0])
        entry = self._shard(shard)
        if isinstance(entry, StridedShard):
            first = int(self.layout.start_of(np.asarray([row]))[0]) - shard * self.layout.rows_per_shard
            return self._strided_row(entry, shard, first, int(self.layout.lengths[row]), row)
        return self._shard_rows(shard, np.asarray([row], dtype=np.int64))[0]

    def _by_shard(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` (any order) read shard by shard, in row order; each as :meth:`_row_bytes` gives it."""
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        order = np.argsort(rows, kind="stable")
        shards = self.layout.shard_of(rows[order])
        cuts = (np.flatnonzero(np.diff(shards)) + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
            if hi > lo:
                sel = order[lo:hi]
                for i, data in zip(sel.tolist(), self._shard_rows(int(shards[lo]), rows[sel]), strict=True):
                    out[i] = data
        return out

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
        return self._as_row(self._row_bytes(row))

    def _as_row(self, data: np.ndarray) -> np.ndarray:
        if self.spec.ragged:
            return data.view(self.dtype).reshape(len(data), *self.row_shape)
        return data[0].view(self.dtype).reshape(self.row_shape)

    def rows(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Several rows (each as :meth:`row`), read in shard order."""
        rows = as_row_numbers(rows)
        self._check_range(rows)
        return [self._as_row(data) for data in self._by_shard(rows)]

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
        self._source_chain()
        records = self._gather_arena(rows) if self._arena is not None else None
        if records is None:
            records = self._gather_shards(rows, out)  # into out's memory when given
            if out is not None:
                return out
        result = records.view(self.dtype).reshape(n, *self.row_shape)
        if out is None:
            return result
        out[...] = result
        return out

    def _gather_mapped(self, rows: np.ndarray) -> np.ndarray | None:
        """The hot path once the rows' shards are in the arena: a handful of numpy calls, whatever the shards.

        Rows not mapped (yet), missing or corrupt point one past the last record, so the
        fancy index raises IndexError (None: take the slow path) and needs no extra check.
        """
        arena = self._arena
        if arena is None or arena.gpos is None or arena.records is None:
            return None
        try:
            records = arena.gpos[rows]
            result = arena.records[records]
        except IndexError:
            return None
        if self.verify != "never":
            self._verify_arena(rows, records, result)
        return result.view(self.dtype).reshape(len(rows), *self.row_shape)

    def _gather_arena(self, rows: np.ndarray) -> np.ndarray | None:
        """Rows as void records in one fancy index over the arena; None when a row is not mapped there."""
        arena = self._arena
        assert arena is not None
        if arena.gpos is None or arena.records is None:
            return None
        records = arena.gpos[rows]
        unmapped = len(arena.records)
        if records.max() >= unmapped:
            for shard in np.unique(self.layout.shard_of(rows[records >= unmapped])).tolist():
                self._shard(shard)
            records = arena.gpos[rows]
            if records.max() >= unmapped:  # missing rows or shards outside the arena: the per-shard path reports
                return None
        result = arena.records[records]
        if self.verify != "never":
            self._verify_arena(rows, records, result)
        return result

    def _verify_arena(self, rows: np.ndarray, records: np.ndarray, gathered: np.ndarray) -> None:
        assert self._arena is not None
        bad = self._arena.first_bad(rows, records, self.verify, gathered)
        if bad is not None:
            row = int(rows[bad])
            raise self._corrupt(row, self._shard(int(self.layout.shard_of(np.asarray([row]))[0])))

    def _gather_shards(self, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """Rows as void records, shard by shard (into ``out``'s memory when given)."""
        n = len(rows)
        record = np.dtype((np.void, self.row_nbytes))
        records = None if out is None else out.reshape(n, -1).view(np.uint8).view(record).reshape(n)
        rps = self.layout.rows_per_shard
        stored = self.layout.start_of(rows)  # fixed families: one stored row per row (format 1: the row itself)
        shards = stored // rps
        if shards[0] == shards[-1] and (shards == shards[0]).all():
            groups: list[tuple[int, np.ndarray]] = [(int(shards[0]), np.arange(n))]
        else:
            order = np.argsort(shards, kind="stable")
            cuts = np.flatnonzero(np.diff(shards[order])) + 1
            groups = [(int(shards[g[0]]), g) for g in np.split(order, cuts)]
        for shard, sel in groups:
            entry = self._shard(shard)
            if isinstance(entry, StridedShard):
                positions = entry.pos[stored[sel] - shard * rps]
                if (positions < 0).any():
                    raise self._missing(int(rows[sel[np.argmax(positions < 0)]]), shard)
                part = entry.records[positions]  # the one copy; checked there, hot in the CPU's cache
                bad = entry.first_bad(positions, self.verify, part)
                if bad is not None:
                    raise self._corrupt(int(rows[sel[bad]]), entry)
                if records is None and len(sel) == n:
                    records = part  # already in order
                    continue
            else:
                part = np.stack(self._shard_rows(shard, rows[sel]))[:, 0].view(record).reshape(len(sel))
            if records is None:
                records = np.empty(n, dtype=record)
            records[sel] = part
        assert records is not None
        return records

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
        for i, data in enumerate(self._by_shard(rows)):
            flat[i, : lengths[i]] = data
        return out, lengths.copy()

    def tensor(self, row: int) -> torch.Tensor:
        """One row as a torch tensor of the family's true dtype."""
        return to_tensor(self.row(row), self.spec.dtype)
