"""Parallel, lock-free, resumable writes of feature rows.

Every shard of a family has exactly one owner: rank ``shard % world_size``. A
writer buffers the rows of the shards it owns and writes each shard once,
complete, atomically, as soon as all its planned rows have arrived (or at
:meth:`FamilyWriter.close`, with the rows given so far). A rerun after a crash
skips the rows already on disk and writes the rest: shards not written yet, and
rows missing inside shards that were written with holes. Filling holes (or, with
``repair=True``, rewriting corrupt rows) replaces the shard file atomically with
one holding its intact old rows plus the new ones, after checking no other
process changed it meanwhile; a row that was there is never lost.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .dtypes import tensor_to_numpy
from .family import FamilyHandle, HandleSource, resolve_handle
from .format import FormatError
from .layout import as_row_numbers
from .ranks import resolve_rank
from .shardcodec import (
    CRC_BYTES,
    ChecksumError,
    RawShardBuilder,
    ShardIndex,
    decode_index,
    encode_shard,
    index_nbytes,
    raw_chunks,
    raw_index,
)
from .storage import AlreadyExistsError, TemporaryFileLost, UnsafeFileError, VersionMismatchError
from .storage.base import FileInProgress

__all__ = ["FamilyWriter", "OwnershipError", "as_storage_array"]

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT = 2
_FSYNC_IN_FLIGHT = 4
"""With fsync=True: shards written at once, by as many threads. Each fsync waits for the disk (a journal commit),
so one after the other their waits add up: 16 files of 16 MB took 3.1-3.5 s fsynced one by one and 0.5-1.0 s
from 6 threads in 2 of 3 rounds here (the disk is shared; tools/bench_write.py --fsync yes measures the writer)."""
_MAX_DIRECT = 64
"""Shards filled in place in their files at once (one open file each); further shards fill a buffer in memory."""
_COPY_BLOCK = 256
"""Rows per write into a shard file: with write_behind, one block's crc32c are computed while the file takes the
block before (the copy releases the GIL), so the two overlap on two cores."""


class OwnershipError(RuntimeError):
    """A writer touched a shard it does not own, or two writers wrote one shard."""


def as_storage_array(value: Any, true_dtype: str) -> np.ndarray:
    """``value`` (numpy array or torch tensor) as a numpy array of the storage dtype.

    bfloat16 is accepted as a torch bfloat16 tensor, an ``ml_dtypes`` bfloat16
    array, or uint16 raw bits. Other dtypes must match exactly: nothing is cast.
    Arrays in non-native byte order (e.g. ``'>f4'``, ``'>u2'`` bfloat16 bits) are
    accepted and converted to native order, so the stored values equal the input's.

    Raises:
        FormatError: the dtype does not match ``true_dtype``.
    """
    if type(value).__module__.startswith("torch"):
        name = str(value.dtype).removeprefix("torch.")
        if name != true_dtype:
            raise FormatError(
                f"got a torch.{name} tensor for a {true_dtype} family; convert it first (.to(torch.{true_dtype}))"
            )
        return tensor_to_numpy(value)
    array = np.asarray(value)
    name = array.dtype.name
    if not array.dtype.isnative:  # same values in this machine's byte order (stored bytes are little-endian)
        array = array.astype(array.dtype.newbyteorder("="))
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


class _Existing:
    """A shard file on disk that still lacks rows: which of its rows are intact, and the file's version."""

    __slots__ = ("rows_ok", "token")

    def __init__(self, rows_ok: np.ndarray, token: str | None) -> None:
        self.rows_ok = rows_ok
        """bool per row of the shard: present and (with repair=True) checked intact."""
        self.token = token
        """The shard's version when this writer looked at it (a local file's inode, size and mtime); the
        replace is a compare-and-swap against it."""


class _Pending:
    """Rows of one shard received so far: in its file being written (``direct``: raw shards on local files,
    each row copied once, from the caller's array into the file), else in the shard's bytes in memory."""

    __slots__ = ("builder", "received", "first_row", "compressed_rows", "existing", "new_rows", "direct")

    def __init__(
        self,
        builder: RawShardBuilder | None,
        n_rows: int,
        first_row: int,
        n_chunks: int,
        row_bytes: int,
        existing: _Existing | None = None,
        direct: FileInProgress | None = None,
    ) -> None:
        self.builder = builder
        self.direct = direct
        self.existing = existing
        # rows already intact in the shard file count as received: they are copied in when it is rewritten
        self.received = np.zeros(n_rows, dtype=bool) if existing is None else existing.rows_ok.copy()
        self.new_rows = 0
        self.first_row = first_row
        # compressed families keep rows until the shard is encoded
        self.compressed_rows: np.ndarray | None = (
            None if builder is not None or direct is not None else np.zeros((n_chunks, row_bytes), dtype=np.uint8)
        )

    def payload(self) -> np.ndarray:
        return self.builder.payload if self.builder is not None else self.compressed_rows  # type: ignore[return-value]


class FamilyWriter:
    """Writes the rows of the shards owned by one rank of ``world_size`` writers.

    Use it as a context manager, or call :meth:`close`. Create through
    :meth:`VLAStore.writer`::

        with store.writer("qwen_vl", rank=rank, world_size=world) as w:
            for row in w.pending_rows():
                w.write_rows([row], compute(row))

    Args:
        source: the generation's :class:`~vlastore.family.FamilyHandle` (of a store opened with
            ``writable=True``), or such a store (anything with ``handle(family, generation)``).
        family: with a store: the family to write (planned with :meth:`VLAStore.add_family`).
        rank, world_size: this writer owns shards ``s % world_size == rank``;
            both default to torch.distributed's when a process group is
            initialised, else to 0 and 1.
        generation: with a store: the generation to write (default: the current one).
        fsync: fsync every shard file before linking it into place (with ``write_behind``, up to
            ``_FSYNC_IN_FLIGHT`` shards are written and fsynced at once, so the waits for the disk overlap).
        write_behind: write rows into shard files from a background thread
            while the caller checksums the next block, and finish complete
            shards (index, fsync, link) in background threads (the default);
            errors (e.g. :class:`OwnershipError`) then surface at the next
            call, :meth:`wait` or :meth:`close`, and again at every call after.
        repair: also read every owned shard whole and check the crc32c of each
            chunk: corrupt rows (all rows of a shard whose index is corrupt or
            which cannot be read) become pending like missing ones, and writing
            them rewrites the shard atomically. Without it only the shard
            indexes are read (rows missing inside written shards are pending).

    Holes and repair: :meth:`pending_rows` lists every owned row not intact on
    disk, also rows missing inside shards written earlier with holes. Writing
    such rows replaces the shard file (temporary file + ``os.replace``) with one
    holding its old intact rows plus the new rows, once no other process changed
    the file since this writer read it (same inode, size and mtime; else
    :class:`OwnershipError`). Rows already intact on disk are skipped when given.
    """

    def __init__(
        self,
        source: FamilyHandle | HandleSource,
        family: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        generation: int | None = None,
        fsync: bool = False,
        write_behind: bool = True,
        repair: bool = False,
    ) -> None:
        # every process of a torchrun job can call store.writer(family) unchanged
        rank, world_size = resolve_rank(rank, world_size)
        handle = resolve_handle(source, family, generation)
        if not handle.writable:
            raise PermissionError(f"{handle.location} is open read-only; open it with writable=True to write rows")
        self.handle = handle
        self.storage = handle.storage.durable() if fsync else handle.storage
        self.family = handle.family
        self.info = handle.info
        self.generation = self.info.generation
        self.spec = self.info.spec
        self.layout = handle.layout
        self.rank = rank
        self.world_size = world_size
        self.fsync = fsync
        # write-behind: a complete shard is checksummed and written by one background thread while the
        # caller fills the next one; at most _MAX_IN_FLIGHT shards wait (tools/bench_write.py measures it)
        self.write_behind = write_behind
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: deque[tuple[int, Future[None], _Pending]] = deque()
        self.repair = repair
        self.owned = np.arange(rank, self.layout.n_shards, world_size, dtype=np.int64)
        self._done: set[int] = set()
        self._existing: dict[int, _Existing] = {}
        self.shards_unreadable: list[tuple[int, str]] = []
        """Owned shards whose index could not be read without repair=True (left alone), with why."""
        for shard in np.intersect1d(handle.written_shards(), self.owned).tolist():
            self._inspect(shard)
        # temporaries of dead writers of owned shards (a run killed before or just after linking a shard into
        # place): removed; a live writer's are left alone
        for shard in self.owned.tolist():
            self.storage.cleanup(handle.shard_key(shard))
        self._pending: dict[int, _Pending] = {}
        self.rows_written = 0
        self.rows_skipped = 0
        self.shards_written = 0
        self._closed = False
        self._failed: BaseException | None = None
        self._spare_buffers: list[np.ndarray] = []  # shard buffers whose file is written, for reuse
        self._copier: ThreadPoolExecutor | None = None  # with write_behind: writes rows into shard files

    def _inspect(self, shard: int) -> None:
        """Classify a written owned shard: complete (done), or holding rows still pending (holes, corruption)."""
        storage = self.storage
        key = self.handle.shard_key(shard)
        rows = self.layout.shard_rows(shard)
        rps = self.layout.rows_per_shard
        n_index = index_nbytes(rps)
        token: str | None
        try:
            if self.repair:
                got = storage.get_versioned(key)
                if got is None:  # removed since listed
                    return
                data, token = got
                buf = np.frombuffer(data, dtype=np.uint8)
                if buf.size < n_index:
                    raise ChecksumError(f"{buf.size} bytes, too short for a shard index")
                index = decode_index(buf[-n_index:], rps, buf.size - n_index)
                chunk_ok = self._chunks_intact(buf, index)
            else:
                token = storage.version(key)  # before the index is read: a replace after it is noticed
                tail = storage.get_range(key, -n_index)
                if tail is None:
                    return
                index = decode_index(tail, rps)
                chunk_ok = index.present
        except (ChecksumError, UnsafeFileError, OSError) as exc:
            if not self.repair:  # its rows cannot be known: left alone; verify reports it, repair rewrites it
                self._done.add(shard)
                self.shards_unreadable.append((shard, str(exc)))
                log.warning(
                    "family %r shard %d: %s; left alone (rerun with repair=True to rewrite it)", self.family, shard, exc
                )
                return
            self._existing[shard] = _Existing(np.zeros(len(rows), dtype=bool), storage.version(key))
            return
        first = self.layout.start_of(rows) - shard * rps
        if self.spec.ragged:  # a row is intact when every one of its chunks is
            lengths = self.layout.lengths[rows]
            ok_cum = np.concatenate([[0], np.cumsum(chunk_ok)])
            rows_ok = ok_cum[first + lengths] - ok_cum[first] == lengths
        else:
            rows_ok = chunk_ok[first]
        if rows_ok.all():
            self._done.add(shard)
        else:
            self._existing[shard] = _Existing(np.asarray(rows_ok, dtype=bool), token)

    def _chunks_intact(self, buf: np.ndarray, index: ShardIndex) -> np.ndarray:
        """bool per chunk: present, crc32c intact, and one row's size once decoded."""
        ok = np.zeros(len(index.present), dtype=bool)
        for chunk in np.flatnonzero(index.present).tolist():
            try:
                index.chunk_bytes(buf, chunk, self.spec.compression, self.spec.row_nbytes)
            except ChecksumError:
                continue
            ok[chunk] = True
        return ok

    # ------------------------------------------------------------------ plan

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    def pending_shards(self) -> np.ndarray:
        """Owned shards with rows still to write: not written yet, or written with holes (or, with
        ``repair=True``, with corrupt rows)."""
        return np.array([s for s in self.owned.tolist() if s not in self._done], dtype=np.int64)

    def pending_rows(self) -> np.ndarray:
        """Owned rows not intact on disk, ascending: what this rank still has to write.

        Includes rows missing inside shards that exist (holes) and, with
        ``repair=True``, corrupt rows.
        """
        parts = []
        for shard in self.pending_shards().tolist():
            rows = self.layout.shard_rows(shard)
            existing = self._existing.get(shard)
            parts.append(rows if existing is None else rows[~existing.rows_ok])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def owned_rows(self) -> np.ndarray:
        parts = [self.layout.shard_rows(s) for s in self.owned.tolist()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ----------------------------------------------------------------- writes

    def write(self, dataset: str | int, index: int, value: Any) -> None:
        """Write the row of ``(dataset, index)`` (``index`` is e.g. ``vlm_idx``)."""
        self.write_rows([self.handle.row(dataset, index)], [value])

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
        rows = as_row_numbers(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.layout.rows):
            bad = int(rows[(rows < 0) | (rows >= self.layout.rows)][0])
            raise IndexError(f"row {bad} out of range: family {self.family!r} has {self.layout.rows} rows")
        if self.spec.ragged or isinstance(values, (list, tuple)):
            if len(values) != len(rows):
                raise FormatError(f"{len(values)} values for {len(rows)} rows")
            # check every value and every owner before buffering any, so a bad batch leaves no trace
            checked = [
                self._check(row, as_storage_array(value, self.spec.dtype))
                for row, value in zip(rows.tolist(), values, strict=False)
            ]
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
        if not len(rows):
            return
        if not self._check_rows(rows):
            # _put_many needs strictly ascending rows (its block copy relies on it): sort them, with their values
            order = np.argsort(rows, kind="stable")
            rows, batch = rows[order], batch[order]
        shards = self.layout.shard_of(rows)
        cuts = np.flatnonzero(np.diff(shards)) + 1  # each shard's rows are one slice of the sorted batch
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)], strict=False):
            self._put_many(int(shards[lo]), rows[lo:hi], batch[lo:hi])

    def _check_rows(self, rows: np.ndarray) -> bool:
        """Raise before anything is buffered: rows of another rank, or a row given twice.

        Returns whether ``rows`` strictly ascend (then no row can repeat within them).
        """
        shards = self.layout.shard_of(rows)
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
        expected = (int(self.layout.lengths[row]), *self.spec.row_shape) if self.spec.ragged else self.spec.row_shape
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
        return self.handle.describe(row)

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
            builder = direct = None
            existing = self._existing.get(shard)
            if self.spec.compression is None and existing is None and self._direct_count() < _MAX_DIRECT:
                direct = self.storage.begin_put(self.handle.shard_key(shard))
            if self.spec.compression is None and direct is None:
                spare = self._spare_buffers.pop() if self._spare_buffers else None
                builder = RawShardBuilder(self.layout.rows_per_shard, n_chunks, self.spec.row_nbytes, spare)
            pending = _Pending(
                builder,
                len(rows),
                int(rows[0]) if len(rows) else 0,
                n_chunks,
                self.spec.row_nbytes,
                existing,
                direct,
            )
            self._pending[shard] = pending
        return pending

    def _put(self, row: int, value: np.ndarray) -> None:
        shard = int(self.layout.shard_of(np.asarray([row]))[0])
        pending = self._pending_for(shard)
        if pending is None:
            self.rows_skipped += 1
            return
        k = row - pending.first_row
        if pending.existing is not None and pending.existing.rows_ok[k]:  # intact on disk already
            self.rows_skipped += 1
            return
        if pending.received[k]:
            raise FormatError(f"family {self.family!r}: row {self._describe(row)} was given twice")
        first = int(self.layout.start_of(np.asarray([row]))[0]) - shard * self.layout.rows_per_shard
        n = int(self.layout.lengths[row])
        self._store(pending, first, None, np.ascontiguousarray(value).view(np.uint8).reshape(n, -1))
        pending.received[k] = True
        pending.new_rows += 1
        self.rows_written += 1
        if pending.received.all():
            self._flush(shard)

    def _put_many(self, shard: int, rows: np.ndarray, batch: np.ndarray) -> None:
        """Rows of one shard of a fixed family; ``rows`` strictly ascend (write_rows sorts them)."""
        pending = self._pending_for(shard)
        if pending is None:
            self.rows_skipped += len(rows)
            return
        k = rows - pending.first_row
        if pending.existing is not None:
            on_disk = pending.existing.rows_ok[k]
            if on_disk.any():  # rows intact on disk already: skipped, like rows of finished shards
                self.rows_skipped += int(on_disk.sum())
                rows, batch, k = rows[~on_disk], batch[~on_disk], k[~on_disk]
                if not len(rows):
                    return
        # rows were checked for repeats within the batch (_check_rows); here: against earlier batches
        if pending.received[k].any():
            dup = int(rows[pending.received[k]][0])
            raise FormatError(f"family {self.family!r}: row {self._describe(dup)} was given twice")
        chunks = self.layout.start_of(rows) - shard * self.layout.rows_per_shard  # format 2: rows may skip stored rows
        data = np.ascontiguousarray(batch).view(np.uint8).reshape(len(rows), -1)
        first, last = int(chunks[0]), int(chunks[-1])
        if last - first + 1 == len(chunks):  # strictly ascending and spanning len(chunks): consecutive
            self._store(pending, first, None, data)  # one block copy
            pending.received[k[0] : k[0] + len(k)] = True
        else:
            self._store(pending, first, chunks, data)
            pending.received[k] = True
        pending.new_rows += len(rows)
        self.rows_written += len(rows)
        if pending.received.all():
            self._flush(shard)

    def _direct_count(self) -> int:
        return sum(1 for p in self._pending.values() if p.direct is not None)

    def _store(self, pending: _Pending, first: int, chunks: np.ndarray | None, data: np.ndarray) -> None:
        """Put the chunks ``data`` (uint8, one per row, C-contiguous) at chunks ``first, first + 1, ...`` (``chunks``
        None) or at ``chunks`` (ascending) of the shard; returns once they are copied (the caller may reuse
        ``data``)."""
        if pending.direct is None:
            if chunks is None:
                pending.payload()[first : first + len(data)] = data
            else:
                pending.payload()[chunks] = data
            return
        runs = [(first, 0, len(data))]
        if chunks is not None:  # runs of adjacent chunks: one write each
            cuts = (np.flatnonzero(np.diff(chunks) != 1) + 1).tolist()
            runs = [(int(chunks[lo]), lo, hi) for lo, hi in zip([0, *cuts], [*cuts, len(chunks)], strict=True)]
        stride = self.spec.row_nbytes + CRC_BYTES
        write = pending.direct.write_at
        if not self.write_behind:
            for chunk, lo, hi in runs:
                write(chunk * stride, raw_chunks(data[lo:hi]))
            return
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlastore-copy")
        futures = [
            self._copier.submit(write, (chunk + a - lo) * stride, raw_chunks(data[a : min(hi, a + _COPY_BLOCK)]))
            for chunk, lo, hi in runs
            for a in range(lo, hi, _COPY_BLOCK)
        ]
        errors = [f.exception() for f in futures]  # every write done (or failed) before data is let go
        for error in errors:
            if error is not None:
                raise error

    def _flush(self, shard: int) -> None:
        pending = self._pending.pop(shard)
        rows = self.layout.shard_rows(shard)[pending.received]
        present = np.zeros(self.layout.shard_nrows(shard), dtype=bool)
        base = shard * self.layout.rows_per_shard
        if not self.spec.ragged:
            present[self.layout.start_of(rows) - base] = True
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
        in_flight = _FSYNC_IN_FLIGHT if self.fsync else _MAX_IN_FLIGHT
        while len(self._in_flight) >= in_flight:
            self._wait_oldest()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1 if not self.fsync else _FSYNC_IN_FLIGHT, thread_name_prefix="vlastore-writer"
            )
        future = self._executor.submit(self._encode_and_write, shard, pending, present)
        self._in_flight.append((shard, future, pending))

    def _recycle(self, pending: _Pending) -> None:
        if pending.builder is not None and len(self._spare_buffers) <= (
            _FSYNC_IN_FLIGHT if self.fsync else _MAX_IN_FLIGHT
        ):
            self._spare_buffers.append(pending.builder.buffer)

    def _encode_and_write(self, shard: int, pending: _Pending, present: np.ndarray) -> None:
        try:
            self._encode_and_write_now(shard, pending, present)
        finally:
            if pending.direct is not None:
                pending.direct.discard()  # after a commit: nothing; after an error: the temporary file goes

    def _finish_direct(self, pending: _Pending, present: np.ndarray) -> np.ndarray | None:
        """A shard filled in its file: the index appended (None: the file is complete, to be committed), or,
        with rows missing (present chunks must be compacted to the front), the shard's bytes built in memory."""
        direct = pending.direct
        assert direct is not None
        rps, stride = self.layout.rows_per_shard, self.spec.row_nbytes + CRC_BYTES
        if present.all():
            direct.write_at(len(present) * stride, [raw_index(rps, np.arange(len(present)), stride)])
            return None
        builder = RawShardBuilder(rps, len(present), self.spec.row_nbytes)
        direct.read_at(0, builder.buffer[: len(present) * stride])
        direct.discard()
        return builder.finish(present)

    def _encode_and_write_now(self, shard: int, pending: _Pending, present: np.ndarray) -> None:
        key = self.handle.shard_key(shard)
        version = None
        data = None
        if pending.existing is not None:
            version = self._copy_existing(shard, key, pending)
        if pending.direct is not None:
            data = self._finish_direct(pending, present)
        elif pending.builder is not None:
            data = pending.builder.finish(present)
        else:
            chunks = np.flatnonzero(present)
            data = encode_shard(pending.payload()[chunks], chunks, self.layout.rows_per_shard, self.spec.compression)
        try:
            if data is None:
                assert pending.direct is not None
                pending.direct.commit_if_absent()
            elif version is None:
                self.storage.put_if_absent(key, data)
            else:
                self.storage.put_if_version(key, data, version)
        except (AlreadyExistsError, VersionMismatchError):
            raise OwnershipError(
                f"shard {shard} of family {self.family!r} (generation {self.generation}) was written by another "
                f"writer while rank {self.rank}/{self.world_size} was filling it: two writers own the same shard. "
                "Give every process a distinct rank and the same world_size. Nothing was overwritten."
            ) from None
        except TemporaryFileLost as exc:
            raise OwnershipError(
                f"shard {shard} of family {self.family!r} (generation {self.generation}): {exc}. Nothing was "
                "written; run only one writer per rank (and world_size) at a time, then rerun"
            ) from None

    def _copy_existing(self, shard: int, key: str, pending: _Pending) -> str | None:
        """Copy the intact old rows of a shard being rewritten into its new bytes; the version to replace."""
        existing = pending.existing
        assert existing is not None
        storage = self.storage
        changed = OwnershipError(
            f"shard {shard} of family {self.family!r} (generation {self.generation}) changed on disk since rank "
            f"{self.rank}/{self.world_size} opened it: another writer is filling the same shard. Nothing was "
            "overwritten; run one writer per rank, then rerun"
        )
        if not existing.rows_ok.any():  # nothing to keep (an unreadable shard being repaired): only its identity
            if storage.version(key) != existing.token:
                raise changed
            return existing.token  # None: the file is gone, so it is written afresh (put-if-absent)
        got = storage.get_versioned(key)
        rps = self.layout.rows_per_shard
        n_index = index_nbytes(rps)
        if got is None or got[1] != existing.token:
            raise changed
        data, version = got
        buf = np.frombuffer(data, dtype=np.uint8)
        index = decode_index(buf[-n_index:], rps, buf.size - n_index)
        rows = self.layout.shard_rows(shard)[existing.rows_ok]
        starts = self.layout.start_of(rows) - shard * rps
        lengths = self.layout.lengths[rows]
        payload = pending.payload()
        for first, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            for chunk in range(first, first + n):
                try:
                    # crc checked before the bytes move: a new crc is never computed over corrupt bytes
                    payload[chunk] = index.chunk_bytes(buf, chunk, self.spec.compression, self.spec.row_nbytes)
                except (ChecksumError, KeyError) as exc:
                    raise ChecksumError(
                        f"{storage.where(key)}: chunk {chunk} of a row kept from the old shard is corrupt ({exc}); "
                        "rerun the writer with repair=True (`vlastore build-features --repair`, "
                        "`vlastore ingest ... --repair`) to rewrite corrupt rows"
                    ) from None
        return version

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
        A shard already complete is left alone; a shard written earlier with holes
        is rewritten only if rows arrived for it (they stay pending for a rerun).
        """
        self._require_open()
        pending = self._pending_for(int(shard))
        if pending is None:
            return
        if pending.existing is not None and pending.new_rows == 0:  # nothing new: keep the file as it is
            self._pending.pop(int(shard))
            self._done.add(int(shard))
            return
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
                for shard, pending in list(self._pending.items()):
                    if pending.existing is not None and pending.new_rows == 0:  # only rows already on disk came
                        del self._pending[shard]
                        continue
                    self._flush(shard)
            self.wait()
        finally:
            self._closed = True
            self._drop_pending()
            self._shutdown()

    def _drop_pending(self) -> None:
        """Forget the rows of shards not written (their temporary files go)."""
        for pending in self._pending.values():
            if pending.direct is not None:
                pending.direct.discard()
        self._pending.clear()

    def abort(self) -> None:
        """Drop buffered rows without writing them (they stay pending for a rerun).

        Complete shards already handed to the background thread are still written.
        """
        self._drop_pending()
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
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None

    def __enter__(self) -> FamilyWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # on an error, half-filled shards are not written: a rerun must redo them
        if exc_type is None:
            self.close()
        else:
            self.abort()
