"""Parallel, lock-free, resumable writes of feature rows.

Every shard of a family has exactly one owner: rank ``shard % world_size``. A
writer buffers the rows of the shards it owns and writes each shard once,
complete, atomically, as soon as all its planned rows have arrived (or at
:meth:`FamilyWriter.close`). "The shard file exists" therefore means "these rows
are done": a rerun after a crash skips those shards and writes the rest.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .format import FormatError
from .shardcodec import RawShardBuilder, encode_shard

if TYPE_CHECKING:
    from .store import VLAStore

__all__ = ["FamilyWriter", "OwnershipError", "as_storage_array"]

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT = 2


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
            raise FormatError(
                f"got a torch.{name} tensor for a {true_dtype} family; convert it first (.to(torch.{true_dtype}))"
            )
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

    def __init__(
        self, builder: RawShardBuilder | None, n_rows: int, first_row: int, n_chunks: int, row_bytes: int
    ) -> None:
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

    Args:
        store: a store opened with ``writable=True``.
        family: the family to write (planned with :meth:`VLAStore.add_family`).
        rank, world_size: this writer owns shards ``s % world_size == rank``;
            both default to torch.distributed's when a process group is
            initialised, else to 0 and 1.
        generation: the generation to write (default: the current one).
        fsync: fsync every shard file before linking it into place.
        write_behind: checksum and write complete shards in a background
            thread (the default: it overlaps the file write with the next
            rows, 0.41 vs 0.27 of ``np.save``'s speed in tools/bench_write.py);
            errors (e.g. :class:`OwnershipError`) then surface at the next
            call, :meth:`wait` or :meth:`close`, and again at every call after.
    """

    def __init__(
        self,
        store: VLAStore,
        family: str,
        rank: int | None = None,
        world_size: int | None = None,
        generation: int | None = None,
        fsync: bool = False,
        write_behind: bool = True,
    ) -> None:
        if rank is None or world_size is None:
            # every process of a torchrun job can call store.writer(family) unchanged
            dist_rank, dist_world = _dist_rank()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
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
        # write-behind: a complete shard is checksummed and written by one background thread while the
        # caller fills the next one; at most _MAX_IN_FLIGHT shards wait (tools/bench_write.py measures it)
        self.write_behind = write_behind
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: deque[tuple[int, Future[None], _Pending]] = deque()
        self.owned = np.arange(rank, self.layout.n_shards, world_size, dtype=np.int64)
        done = np.intersect1d(store.written_shards(family, self.generation), self.owned)
        self._done: set[int] = set(done.tolist())
        # temporary files of shards this rank owns can only be left over from a killed run of this rank
        for shard in self.pending_shards().tolist():
            store.storage.remove_partials(store.shard_key(family, shard, self.generation))
        self._pending: dict[int, _Pending] = {}
        self.rows_written = 0
        self.rows_skipped = 0
        self.shards_written = 0
        self._closed = False
        self._failed: BaseException | None = None
        self._spare_buffers: list[np.ndarray] = []  # shard buffers whose file is written, for reuse

    @classmethod
    def open(
        cls, location: Any, family: str, rank: int | None = None, world_size: int | None = None, **kwargs: Any
    ) -> FamilyWriter:
        """Open a store and a writer; rank/world_size default to torch.distributed's when initialised."""
        from .store import VLAStore

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
        if self.spec.ragged or isinstance(values, (list, tuple)):
            if len(values) != len(rows):
                raise FormatError(f"{len(values)} values for {len(rows)} rows")
            # check every value and every owner before buffering any, so a bad batch leaves no trace
            checked = [self._check(row, as_storage_array(value, self.spec.dtype))
                       for row, value in zip(rows.tolist(), values, strict=False)]
            self._check_rows(rows)
            for row, value in zip(rows.tolist(), checked, strict=False):
                self._put(row, value)
            return
        batch = as_storage_array(values, self.spec.dtype)
        if batch.shape != (len(rows), *self.spec.row_shape):
            raise FormatError(
                f"family {self.family!r}: values of shape {tuple(batch.shape)} for {len(rows)} rows; "
                f"expected {(len(rows), *self.spec.row_shape)}"
            )
        self._check_finite(rows, batch)
        ascending = self._check_rows(rows)
        shards = self.layout.row_shards[rows]
        if not len(rows):
            return
        if ascending:  # the usual case: each shard's rows are one slice of the batch
            cuts = np.flatnonzero(np.diff(shards)) + 1
            for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)], strict=False):
                self._put_many(int(shards[lo]), rows[lo:hi], batch[lo:hi])
            return
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            self._put_many(shard, rows[sel], batch[sel])

    def _check_rows(self, rows: np.ndarray) -> bool:
        """Raise before anything is buffered: rows of another rank, or a row given twice.

        Returns whether ``rows`` strictly ascend (then no row can repeat within them).
        """
        shards = self.layout.row_shards[rows]
        foreign = shards[shards % self.world_size != self.rank]
        if foreign.size:
            self._pending_for(int(foreign[0]))  # raises OwnershipError naming the shard
        ascending = bool((np.diff(rows) > 0).all())
        if not ascending:
            uniq, counts = np.unique(rows, return_counts=True)
            if (counts > 1).any():
                dup = int(uniq[counts > 1][0])
                raise FormatError(f"family {self.family!r}: row {self._describe(dup)} was given twice")
        return ascending

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
        if self.spec.allow_nonfinite or not len(rows):  # a rank may own no rows at all
            return
        # one fast pass over the batch; the per-row search below runs only when something is wrong
        if self.spec.dtype == "bfloat16":
            # bfloat16 bits with all exponent bits set (NaN/Inf) are exactly those >= 0xFF80 as uint16
            # (negative) or >= 0x7F80 as int16 (positive): two read-only max passes, no temporary
            if int(batch.max()) < 0xFF80 and int(batch.view(np.int16).max()) < 0x7F80:
                return
        elif np.isfinite(batch).all():
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
                spare = self._spare_buffers.pop() if self._spare_buffers else None
                builder = RawShardBuilder(self.layout.rows_per_shard, n_chunks, self.spec.row_nbytes, spare)
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
        # rows were checked for repeats within the batch (_check_rows); here: against earlier batches
        if pending.received[k].any():
            dup = int(rows[pending.received[k]][0])
            raise FormatError(f"family {self.family!r}: row {self._describe(dup)} was given twice")
        chunks = rows - shard * self.layout.rows_per_shard
        data = np.ascontiguousarray(batch).view(np.uint8).reshape(len(rows), -1)
        first, last = int(chunks[0]), int(chunks[-1])
        if last - first + 1 == len(chunks) and (len(chunks) == 1 or chunks[1] > chunks[0]):
            pending.payload()[first : last + 1] = data  # consecutive rows: one block copy
            pending.received[k[0] : k[0] + len(k)] = True
        else:
            pending.payload()[chunks] = data
            pending.received[k] = True
        self.rows_written += len(rows)
        if pending.received.all():
            self._flush(shard)

    def _flush(self, shard: int) -> None:
        pending = self._pending.pop(shard)
        rows = self.layout.shard_rows(shard)[pending.received]
        present = np.zeros(self.layout.shard_nrows(shard), dtype=bool)
        base = shard * self.layout.rows_per_shard
        if not self.spec.ragged:
            present[rows - base] = True
        else:
            starts, lengths = self.layout.starts[rows].tolist(), self.layout.lengths[rows].tolist()
            for start, length in zip(starts, lengths, strict=True):
                present[start - base : start - base + length] = True
        # counted as done from here on: pending_rows() leaves it out and rows given again are skipped;
        # should its write fail, the error is sticky (see wait())
        self._done.add(shard)
        if not self.write_behind:
            self._encode_and_write(shard, pending, present)
            self._recycle(pending)
            self.shards_written += 1
            return
        while len(self._in_flight) >= _MAX_IN_FLIGHT:
            self._wait_oldest()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlastore-writer")
        future = self._executor.submit(self._encode_and_write, shard, pending, present)
        self._in_flight.append((shard, future, pending))

    def _recycle(self, pending: _Pending) -> None:
        if pending.builder is not None and len(self._spare_buffers) <= _MAX_IN_FLIGHT:
            self._spare_buffers.append(pending.builder.buffer)

    def _encode_and_write(self, shard: int, pending: _Pending, present: np.ndarray) -> None:
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

    def _wait_oldest(self) -> None:
        shard, future, pending = self._in_flight.popleft()
        try:
            future.result()
        except BaseException as exc:
            self._failed = exc  # every later call re-raises it: no write is silently lost
            raise
        self._recycle(pending)
        self.shards_written += 1

    def wait(self) -> None:
        """Block until every complete shard handed to the background thread is on disk.

        Raises:
            OwnershipError: a shard was written by another writer meanwhile (or an
                ``OSError`` from the write): the same error is raised again by every
                later call, so it cannot go unnoticed.
        """
        if self._failed is not None:
            raise self._failed
        while self._in_flight:
            self._wait_oldest()

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
        if self._failed is not None:
            raise self._failed
        while self._in_flight and self._in_flight[0][1].done():  # surface a background error early
            self._wait_oldest()

    def close(self) -> None:
        """Write every shard that received rows and wait until all are on disk.

        Rows never given are recorded as missing (see :meth:`VLAStore.coverage`).

        Raises:
            OwnershipError: another writer wrote one of this writer's shards.
        """
        if self._closed:
            return
        try:
            if self._failed is None:
                for shard in list(self._pending):
                    self._flush(shard)
            self.wait()
        finally:
            self._closed = True
            self._shutdown()

    def abort(self) -> None:
        """Drop buffered rows without writing them (they stay pending for a rerun).

        Complete shards already handed to the background thread are still written.
        """
        self._pending.clear()
        try:
            self.wait()
        except BaseException as exc:  # abort runs while another error propagates: do not mask it
            log.error("family %r: a background shard write failed during abort: %s", self.family, exc)
        finally:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> FamilyWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # on an error, half-filled shards are not written: a rerun must redo them
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _dist_rank() -> tuple[int, int]:
    # a process that never imported torch.distributed has no process group: skip the costly import
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
