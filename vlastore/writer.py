"""Parallel, lock-free, resumable writes of feature rows.

Every shard of a family has exactly one owner: rank ``shard % world_size``. A
writer buffers the rows of the shards it owns and writes each shard once,
complete, atomically, as soon as all its planned rows have arrived (or at
:meth:`FamilyWriter.close`). "The shard file exists" therefore means "these rows
are done": a rerun after a crash skips those shards and writes the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .format import FormatError
from .shardcodec import RawShardBuilder, encode_shard

if TYPE_CHECKING:
    from .store import VLAStore

__all__ = ["FamilyWriter", "OwnershipError", "as_storage_array"]

log = logging.getLogger(__name__)


class OwnershipError(RuntimeError):
    """A writer touched a shard it does not own, or two writers wrote one shard."""


def as_storage_array(value: Any, true_dtype: str) -> np.ndarray:
    """``value`` (numpy array or torch tensor) as a numpy array of the storage dtype.

    bfloat16 is accepted as a torch bfloat16 tensor, an ``ml_dtypes`` bfloat16
    array, or uint16 raw bits. Other dtypes must match exactly: nothing is cast.

    Raises:
        FormatError: the dtype does not match ``true_dtype``.
    """
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        name = str(tensor.dtype).removeprefix("torch.")
        if name != true_dtype:
            raise FormatError(f"got a torch.{name} tensor for a {true_dtype} family; convert it first (.to(torch.{true_dtype}))")
        if name == "bfloat16":
            return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        return tensor.contiguous().numpy()
    array = np.asarray(value)
    name = array.dtype.name
    if true_dtype == "bfloat16" and name in ("uint16", "bfloat16"):
        return array.view(np.uint16)
    if name != true_dtype:
        raise FormatError(f"got a {name} array for a {true_dtype} family; convert it first (astype)")
    return array


def _nonfinite(array: np.ndarray, true_dtype: str) -> np.ndarray:
    """Bool mask of NaN/Inf elements (bfloat16 given as its uint16 bits)."""
    if true_dtype == "bfloat16":
        return (array & 0x7F80) == 0x7F80
    return ~np.isfinite(array)


class _Pending:
    """Rows of one shard received so far, written straight into the shard's bytes."""

    __slots__ = ("builder", "received", "first_row", "compressed_rows")

    def __init__(self, builder: RawShardBuilder | None, n_rows: int, first_row: int, n_chunks: int, row_bytes: int) -> None:
        self.builder = builder
        self.received = np.zeros(n_rows, dtype=bool)
        self.first_row = first_row
        # compressed families keep rows until the shard is encoded
        self.compressed_rows: np.ndarray | None = (
            None if builder is not None else np.zeros((n_chunks, row_bytes), dtype=np.uint8)
        )

    def payload(self) -> np.ndarray:
        return self.builder.payload if self.builder is not None else self.compressed_rows  # type: ignore[return-value]


class FamilyWriter:
    """Writes the rows of the shards owned by one rank of ``world_size`` writers.

    Use it as a context manager, or call :meth:`close`. Create through
    :meth:`VLAStore.writer` or :meth:`FamilyWriter.open`::

        with store.writer("qwen_vl", rank=rank, world_size=world) as w:
            for row in w.pending_rows():
                w.write_rows([row], compute(row))
    """

    def __init__(
        self,
        store: VLAStore,
        family: str,
        rank: int = 0,
        world_size: int = 1,
        generation: int | None = None,
        fsync: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if not store.writable:
            raise PermissionError(f"{store.location} is open read-only; open it with writable=True to write rows")
        self.store = store
        self.family = family
        self.info = store.generation(family, generation)
        self.generation = self.info.generation
        self.spec = self.info.spec
        self.layout = store.layout(family, self.generation)
        self.rank = rank
        self.world_size = world_size
        self.fsync = fsync
        self.owned = np.arange(rank, self.layout.n_shards, world_size, dtype=np.int64)
        done = np.intersect1d(store.written_shards(family, self.generation), self.owned)
        self._done: set[int] = set(done.tolist())
        self._pending: dict[int, _Pending] = {}
        self.rows_written = 0
        self.rows_skipped = 0
        self.shards_written = 0
        self._closed = False

    @classmethod
    def open(
        cls, location: Any, family: str, rank: int | None = None, world_size: int | None = None, **kwargs: Any
    ) -> FamilyWriter:
        """Open a store and a writer; rank/world_size default to torch.distributed's when initialised."""
        from .store import VLAStore

        if rank is None or world_size is None:
            rank, world_size = _dist_rank()
        return cls(VLAStore.open(location, writable=True), family, rank=rank, world_size=world_size, **kwargs)

    # ------------------------------------------------------------------ plan

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    def pending_shards(self) -> np.ndarray:
        """Owned shards not written yet (those a resumed run still has to do)."""
        return np.array([s for s in self.owned.tolist() if s not in self._done], dtype=np.int64)

    def pending_rows(self) -> np.ndarray:
        """Rows of :meth:`pending_shards`, ascending: what this rank still has to write."""
        parts = [self.layout.shard_rows(s) for s in self.pending_shards().tolist()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def owned_rows(self) -> np.ndarray:
        parts = [self.layout.shard_rows(s) for s in self.owned.tolist()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ----------------------------------------------------------------- writes

    def write(self, dataset: str | int, index: int, value: Any) -> None:
        """Write the row of ``(dataset, index)`` (``index`` is e.g. ``vlm_idx``)."""
        self.write_rows([self.store.row(self.family, dataset, index, self.generation)], [value])

    def write_rows(self, rows: Sequence[int] | np.ndarray, values: Any) -> None:
        """Write rows by number.

        Args:
            rows: row numbers, each in a shard this rank owns.
            values: fixed families: one array ``[len(rows), *row_shape]`` or a
                sequence of ``row_shape`` arrays; ragged families: a sequence of
                ``[length, *row_shape]`` arrays. numpy or torch.

        Rows in shards finished by an earlier run are skipped (resume).

        Raises:
            OwnershipError: a row in a shard of another rank.
            FormatError: wrong shape or dtype, NaN/Inf in a family that forbids them.
        """
        self._require_open()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.layout.rows):
            bad = int(rows[(rows < 0) | (rows >= self.layout.rows)][0])
            raise IndexError(f"row {bad} out of range: family {self.family!r} has {self.layout.rows} rows")
        if self.spec.ragged:
            if len(values) != len(rows):
                raise FormatError(f"{len(values)} values for {len(rows)} rows")
            for row, value in zip(rows.tolist(), values):
                self._put(row, self._check(row, as_storage_array(value, self.spec.dtype)))
            return
        if isinstance(values, (list, tuple)):
            if len(values) != len(rows):
                raise FormatError(f"{len(values)} values for {len(rows)} rows")
            for row, value in zip(rows.tolist(), values):
                self._put(row, self._check(row, as_storage_array(value, self.spec.dtype)))
            return
        batch = as_storage_array(values, self.spec.dtype)
        if batch.shape != (len(rows), *self.spec.row_shape):
            raise FormatError(
                f"family {self.family!r}: values of shape {tuple(batch.shape)} for {len(rows)} rows; "
                f"expected {(len(rows), *self.spec.row_shape)}"
            )
        self._check_finite(rows, batch)
        shards = self.layout.row_shards[rows]
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            self._put_many(shard, rows[sel], batch[sel])

    def _check(self, row: int, value: np.ndarray) -> np.ndarray:
        expected = (
            (int(self.layout.lengths[row]), *self.spec.row_shape) if self.spec.ragged else self.spec.row_shape
        )
        if value.shape != expected:
            what = "planned length and row shape" if self.spec.ragged else "row_shape"
            raise FormatError(
                f"family {self.family!r}: row {self._describe(row)} has shape {tuple(value.shape)}; "
                f"the family's {what} says {expected}"
            )
        self._check_finite(np.asarray([row]), value[None])
        return value

    def _check_finite(self, rows: np.ndarray, batch: np.ndarray) -> None:
        if self.spec.allow_nonfinite:
            return
        bad = _nonfinite(batch, self.spec.dtype).reshape(len(rows), -1).any(axis=1)
        if bad.any():
            row = int(rows[np.flatnonzero(bad)[0]])
            raise FormatError(
                f"family {self.family!r}: row {self._describe(row)} holds NaN or Inf; fix the source, or "
                "create the family with allow_nonfinite=True"
            )

    def _describe(self, row: int) -> str:
        e, item = self.layout.address(row)
        return f"({self.store.catalog.names[e]!r}, {self.spec.index_name}={item})"

    def _pending_for(self, shard: int) -> _Pending | None:
        if not self.owns(shard):
            raise OwnershipError(
                f"rank {self.rank} of {self.world_size} does not own shard {shard} of family {self.family!r} "
                f"(it belongs to rank {shard % self.world_size}); write only rows from pending_rows()"
            )
        if shard in self._done:
            return None
        pending = self._pending.get(shard)
        if pending is None:
            rows = self.layout.shard_rows(shard)
            n_chunks = self.layout.shard_nrows(shard)
            builder = None
            if self.spec.compression is None:
                builder = RawShardBuilder(self.layout.rows_per_shard, n_chunks, self.spec.row_nbytes)
            pending = _Pending(builder, len(rows), int(rows[0]) if len(rows) else 0, n_chunks, self.spec.row_nbytes)
            self._pending[shard] = pending
        return pending

    def _put(self, row: int, value: np.ndarray) -> None:
        shard = int(self.layout.row_shards[row])
        pending = self._pending_for(shard)
        if pending is None:
            self.rows_skipped += 1
            return
        k = row - pending.first_row
        if pending.received[k]:
            raise FormatError(f"family {self.family!r}: row {self._describe(row)} was given twice")
        first = int(self.layout.starts[row]) - shard * self.layout.rows_per_shard
        n = int(self.layout.lengths[row])
        pending.payload()[first : first + n] = np.ascontiguousarray(value).view(np.uint8).reshape(n, -1)
        pending.received[k] = True
        self.rows_written += 1
        if pending.received.all():
            self._flush(shard)

    def _put_many(self, shard: int, rows: np.ndarray, batch: np.ndarray) -> None:
        pending = self._pending_for(shard)
        if pending is None:
            self.rows_skipped += len(rows)
            return
        k = rows - pending.first_row
        if pending.received[k].any() or len(np.unique(k)) != len(k):
            dup = int(rows[pending.received[k]][0]) if pending.received[k].any() else int(rows[0])
            raise FormatError(f"family {self.family!r}: row {self._describe(dup)} was given twice")
        chunks = rows - shard * self.layout.rows_per_shard
        pending.payload()[chunks] = np.ascontiguousarray(batch).view(np.uint8).reshape(len(rows), -1)
        pending.received[k] = True
        self.rows_written += len(rows)
        if pending.received.all():
            self._flush(shard)

    def _flush(self, shard: int) -> None:
        pending = self._pending.pop(shard)
        rows = self.layout.shard_rows(shard)[pending.received]
        present = np.zeros(self.layout.shard_nrows(shard), dtype=bool)
        base = shard * self.layout.rows_per_shard
        for start, length in zip(self.layout.starts[rows].tolist(), self.layout.lengths[rows].tolist()):
            present[start - base : start - base + length] = True
        if pending.builder is not None:
            data = pending.builder.finish(present)
        else:
            chunks = np.flatnonzero(present)
            data = encode_shard(pending.payload()[chunks], chunks, self.layout.rows_per_shard, self.spec.compression)
        key = self.store.shard_key(self.family, shard, self.generation)
        try:
            self.store.storage.write_once(key, data, fsync=self.fsync)
        except FileExistsError:
            raise OwnershipError(
                f"shard {shard} of family {self.family!r} (generation {self.generation}) was written by another "
                f"writer while rank {self.rank}/{self.world_size} was filling it: two writers own the same shard. "
                "Give every process a distinct rank and the same world_size. Nothing was overwritten."
            ) from None
        self._done.add(shard)
        self.shards_written += 1

    def finish_shard(self, shard: int) -> None:
        """Write shard ``shard`` now with the rows received so far; rows never given stay missing.

        For callers that know some planned rows will never arrive (an ingestion
        skipping bad source files), so a shard need not wait for :meth:`close`.
        A shard already written (by this or an earlier run) is left alone.
        """
        self._require_open()
        if self._pending_for(int(shard)) is not None:
            self._flush(int(shard))

    # ---------------------------------------------------------------- closing

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FamilyWriter is closed; open a new one with store.writer(...)")

    def close(self) -> None:
        """Write every shard that received rows; rows never given are recorded as missing."""
        if self._closed:
            return
        for shard in list(self._pending):
            self._flush(shard)
        self._closed = True

    def abort(self) -> None:
        """Drop buffered rows without writing them (they stay pending for a rerun)."""
        self._pending.clear()
        self._closed = True

    def __enter__(self) -> FamilyWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # on an error, half-filled shards are not written: a rerun must redo them
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _dist_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
