"""Where every row of a feature family lives: pure functions, no I/O.

A family's rows are numbered episode by episode: rows of episode ``e`` are
``episode_rows[e]:episode_rows[e + 1]``, and row ``episode_rows[e] + i`` holds
item ``i`` (``vlm_idx`` or image number) of that episode.

Axis 0 of ``values`` is cut into shards of ``rows_per_shard`` stored rows. For
fixed families stored row ``r`` is row ``r``. For ragged families a row is
``length`` consecutive token rows starting at ``start``; rows are packed so that
none crosses a shard boundary, which lets a writer own whole rows by owning
whole shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .format import MAX_ROWS, FamilySpec, FormatError

__all__ = ["FamilyLayout", "pack_ragged", "vlm_items", "as_row_numbers", "packing_ok"]


def as_row_numbers(rows: Sequence[int] | np.ndarray | int) -> np.ndarray:
    """``rows`` as a 1-D int64 array, refusing what is not a whole number (no silent truncation of 1.5).

    Range checks (including the rule that negative row numbers raise IndexError) are the caller's.

    Raises:
        TypeError: floats, bools or other non-integers given as row numbers.
    """
    if type(rows) is np.ndarray and rows.dtype == np.int64 and rows.ndim == 1:
        return rows
    arr = np.asarray(rows)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"row numbers must be integers, got {arr.dtype} values (e.g. {arr.reshape(-1)[0]!r})")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > np.iinfo(np.int64).max:
        raise IndexError(f"row {int(arr.max())} out of range")
    return arr.astype(np.int64, copy=False).reshape(-1)


def vlm_items(steps: np.ndarray | Sequence[int], vlm_reuse_count: int) -> np.ndarray:
    """Rows per episode when one row serves ``vlm_reuse_count`` consecutive steps."""
    steps = np.asarray(steps, dtype=np.int64)
    return (steps + vlm_reuse_count - 1) // vlm_reuse_count


def pack_ragged(lengths: np.ndarray, shard_capacity: int) -> np.ndarray:
    """Start of each ragged row in ``values``, packing rows into shards in order.

    A row that does not fit in the rest of the current shard starts the next
    shard. Returns int64 starts.

    Raises:
        FormatError: when a row is longer than a whole shard.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise FormatError(f"ragged row #{int(np.argmin(lengths))} has length {lengths.min()}; lengths must be >= 1")
    if lengths.size and lengths.max() > shard_capacity:
        raise FormatError(
            f"ragged row #{int(np.argmax(lengths))} has {lengths.max()} token rows, more than a shard "
            f"holds ({shard_capacity}); create the family with rows_per_shard >= {lengths.max()}"
        )
    starts = np.empty_like(lengths)
    pos = 0
    for i, n in enumerate(lengths.tolist()):
        if pos // shard_capacity != (pos + n - 1) // shard_capacity:
            pos = (pos // shard_capacity + 1) * shard_capacity
        starts[i] = pos
        pos += n
    return starts


def packing_ok(starts: np.ndarray, lengths: np.ndarray, shard_capacity: int) -> bool:
    """Whether ``starts`` is exactly what :func:`pack_ragged` makes of ``lengths`` (vectorised, no loop)."""
    if starts.shape != lengths.shape:
        return False
    if not starts.size:
        return True
    if lengths.min() < 1 or lengths.max() > shard_capacity:
        return False
    prev_end = np.empty_like(starts)
    prev_end[0] = 0
    np.add(starts[:-1], lengths[:-1], out=prev_end[1:])
    crosses = prev_end // shard_capacity != (prev_end + lengths - 1) // shard_capacity
    expected = np.where(crosses, (prev_end // shard_capacity + 1) * shard_capacity, prev_end)
    return bool(np.array_equal(starts, expected))


class FamilyLayout:
    """Row numbering and shard geometry of one generation of a family.

    Built from arrays read from a store, so it checks them: ``episode_rows``
    starts at 0 and never decreases; ragged ``starts`` are exactly the packing of
    ``lengths``. Fixed families hold no per-row arrays (``starts``, ``row_shards``
    are made on first use), so opening a family costs O(episodes), not O(rows).

    Raises:
        FormatError: the arrays break these rules (``where`` names their source).
    """

    def __init__(
        self,
        spec: FamilySpec,
        episode_rows: np.ndarray,
        starts: np.ndarray | None = None,
        lengths: np.ndarray | None = None,
        where: str = "layout",
    ) -> None:
        self.spec = spec
        self.episode_rows = np.asarray(episode_rows)
        if self.episode_rows.ndim != 1 or self.episode_rows.size < 1 or self.episode_rows.dtype.kind not in "iu":
            raise FormatError(f"{where}: episode_rows must be a 1-D integer array of episodes + 1 entries")
        self.episode_rows = self.episode_rows.astype(np.int64, copy=False)
        if self.episode_rows[0] != 0 or (self.episode_rows.size > 1 and np.diff(self.episode_rows).min() < 0):
            raise FormatError(
                f"{where}: episode_rows must start at 0 and never decrease "
                f"(got {self.episode_rows[:4].tolist()}...); the array is damaged"
            )
        self.rows = int(self.episode_rows[-1])
        if self.rows > MAX_ROWS:
            raise FormatError(
                f"{where}: episode_rows declares {self.rows:,} rows, more than vlastore supports "
                f"({MAX_ROWS:,}); the array is damaged"
            )
        self.rows_per_shard = spec.rows_per_shard
        self._starts: np.ndarray | None = None
        self._row_shards: np.ndarray | None = None
        self._shard_row_offsets: np.ndarray | None = None
        if spec.ragged:
            if starts is None or lengths is None:
                raise FormatError("a ragged family needs starts and lengths")
            starts_arr, lengths_arr = np.asarray(starts), np.asarray(lengths)
            if (
                starts_arr.shape != (self.rows,)
                or lengths_arr.shape != (self.rows,)
                or starts_arr.dtype.kind not in "iu"
                or lengths_arr.dtype.kind not in "iu"
            ):
                raise FormatError(
                    f"{where}: starts {starts_arr.shape} and lengths {lengths_arr.shape} must be "
                    f"integers, one per row ({self.rows}); the arrays are damaged"
                )
            self._starts = starts_arr.astype(np.int64, copy=False)
            self.lengths = lengths_arr.astype(np.int64, copy=False)
            if not packing_ok(self._starts, self.lengths, self.rows_per_shard):
                raise FormatError(
                    f"{where}: starts/lengths are not the packing of the rows' lengths into shards "
                    f"of {self.rows_per_shard} token rows; the arrays are damaged"
                )
            self.capacity = int(self._starts[-1] + self.lengths[-1]) if self.rows else 0
            if self.capacity > MAX_ROWS:
                raise FormatError(f"{where}: {self.capacity:,} token rows, more than vlastore supports ({MAX_ROWS:,})")
        else:
            if starts is not None or lengths is not None:
                raise FormatError("starts and lengths are only for ragged families")
            # every row is one stored row: lengths are ones (a read-only view, no memory per row)
            self.lengths = np.broadcast_to(np.int64(1), (self.rows,))
            self.capacity = self.rows
        self.n_shards = -(-self.capacity // self.rows_per_shard)

    @property
    def starts(self) -> np.ndarray:
        """First stored (token) row of every row."""
        if self._starts is None:
            self._starts = np.arange(self.rows, dtype=np.int64)
        return self._starts

    @property
    def row_shards(self) -> np.ndarray:
        """Shard of every row."""
        if self._row_shards is None:
            self._row_shards = self.starts // self.rows_per_shard
        return self._row_shards

    @property
    def shard_row_offsets(self) -> np.ndarray:
        """Rows of shard ``s`` are ``shard_row_offsets[s]:shard_row_offsets[s + 1]`` (rows ascend)."""
        if self._shard_row_offsets is None:
            if self.spec.ragged:
                counts = np.bincount(self.row_shards, minlength=self.n_shards)
                self._shard_row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            else:
                edges = np.arange(self.n_shards + 1, dtype=np.int64) * self.rows_per_shard
                self._shard_row_offsets = np.minimum(edges, self.rows)
        return self._shard_row_offsets

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """Shard of each of ``rows`` (checked row numbers)."""
        if not self.spec.ragged:
            shards: np.ndarray = np.asarray(rows, dtype=np.int64) // self.rows_per_shard
        else:
            shards = self.row_shards[rows]
        return shards

    def start_of(self, rows: np.ndarray) -> np.ndarray:
        """First stored (token) row of each of ``rows`` (checked row numbers)."""
        if not self.spec.ragged:
            starts: np.ndarray = np.asarray(rows, dtype=np.int64)
        else:
            starts = self.starts[rows]
        return starts

    @classmethod
    def plan(
        cls,
        spec: FamilySpec,
        items_per_episode: Sequence[int] | np.ndarray,
        lengths: Sequence[int] | np.ndarray | None = None,
    ) -> FamilyLayout:
        """Lay out a new family: ``items_per_episode[e]`` rows for episode ``e``.

        Ragged families need ``lengths``, one per row in row order.
        """
        items = np.asarray(items_per_episode, dtype=np.int64)
        if items.ndim != 1 or (items.size and items.min() < 0):
            raise FormatError("items_per_episode must be one count >= 0 per episode")
        episode_rows = np.concatenate([[0], np.cumsum(items)]).astype(np.int64)
        rows = int(episode_rows[-1])
        if spec.ragged:
            if lengths is None:
                raise FormatError("a ragged family needs the length of every row at planning time")
            lengths_arr = np.asarray(lengths, dtype=np.int64)
            if lengths_arr.shape != (rows,):
                raise FormatError(f"got {lengths_arr.size} lengths for {rows} rows; give one per row")
            return cls(spec, episode_rows, pack_ragged(lengths_arr, spec.rows_per_shard), lengths_arr)
        if lengths is not None:
            raise FormatError("lengths are only for ragged families (FamilySpec(ragged=True))")
        return cls(spec, episode_rows)

    # ------------------------------------------------------------- addressing

    def row(self, episode: int, item: int) -> int:
        """Row of item ``item`` (e.g. ``vlm_idx``) of episode position ``episode``.

        Raises:
            IndexError: ``episode`` or ``item`` out of range (negative ones included: they are identifiers).
        """
        if not 0 <= episode < len(self.episode_rows) - 1:
            raise IndexError(f"episode #{episode} out of range: the family has {len(self.episode_rows) - 1} episodes")
        first, stop = int(self.episode_rows[episode]), int(self.episode_rows[episode + 1])
        n = stop - first
        if not 0 <= item < n:
            raise IndexError(
                f"{self.spec.index_name}={item} out of range for this episode: it has {n} rows "
                f"({self.spec.index_name} 0..{n - 1})"
            )
        return first + item

    def episode_of_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.episode_rows, rows, side="right") - 1

    def address(self, row: int) -> tuple[int, int]:
        """``(episode position, item)`` of a row."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range: the family has {self.rows} rows")
        e = int(self.episode_of_rows(np.asarray([row]))[0])
        return e, int(row - self.episode_rows[e])

    def shard_rows(self, shard: int) -> np.ndarray:
        """Rows stored in shard ``shard``, ascending."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range: the family has {self.n_shards} shards")
        if not self.spec.ragged:
            lo = shard * self.rows_per_shard
            return np.arange(lo, min(lo + self.rows_per_shard, self.rows), dtype=np.int64)
        lo, hi = self.shard_row_offsets[shard], self.shard_row_offsets[shard + 1]
        # rows are numbered in storage order, so a shard's rows are a contiguous range
        return np.arange(lo, hi, dtype=np.int64)

    def shard_nrows(self, shard: int) -> int:
        """Stored (token) rows the shard spans, counting the short last shard."""
        return min(self.rows_per_shard, self.capacity - shard * self.rows_per_shard)

    def rows_of_chunks(self, shard: int, chunks: np.ndarray) -> np.ndarray:
        """Rows owning the given inner-chunk numbers of a shard (-1 for padding)."""
        stored = shard * self.rows_per_shard + np.asarray(chunks, dtype=np.int64)
        if not self.spec.ragged:
            return stored
        r = np.searchsorted(self.starts, stored, side="right") - 1
        inside = (r >= 0) & (stored < self.starts[np.maximum(r, 0)] + self.lengths[np.maximum(r, 0)])
        return np.where(inside, r, -1)
