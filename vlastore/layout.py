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

from .format import FamilySpec, FormatError

__all__ = ["FamilyLayout", "pack_ragged", "vlm_items"]


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


class FamilyLayout:
    """Row numbering and shard geometry of one generation of a family."""

    def __init__(
        self,
        spec: FamilySpec,
        episode_rows: np.ndarray,
        starts: np.ndarray | None = None,
        lengths: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        self.episode_rows = np.asarray(episode_rows, dtype=np.int64)
        self.rows = int(self.episode_rows[-1])
        self.rows_per_shard = spec.rows_per_shard
        if spec.ragged:
            if starts is None or lengths is None:
                raise FormatError("a ragged family needs starts and lengths")
            self.starts = np.asarray(starts, dtype=np.int64)
            self.lengths = np.asarray(lengths, dtype=np.int64)
            self.capacity = int(self.starts[-1] + self.lengths[-1]) if self.rows else 0
            self.row_shards = self.starts // self.rows_per_shard
        else:
            self.starts = np.arange(self.rows, dtype=np.int64)
            self.lengths = np.ones(self.rows, dtype=np.int64)
            self.capacity = self.rows
            self.row_shards = self.starts // self.rows_per_shard
        self.n_shards = -(-self.capacity // self.rows_per_shard)
        # rows of shard s are shard_rows[shard_row_offsets[s]:shard_row_offsets[s+1]] (rows ascend)
        counts = np.bincount(self.row_shards, minlength=self.n_shards)
        self.shard_row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

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
        """Row of item ``item`` (e.g. ``vlm_idx``) of episode position ``episode``."""
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
        e = int(self.episode_of_rows(np.asarray([row]))[0])
        return e, int(row - self.episode_rows[e])

    def shard_rows(self, shard: int) -> np.ndarray:
        """Rows stored in shard ``shard``, ascending."""
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
