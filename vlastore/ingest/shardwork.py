"""What an ingest worker does: fill the shards of its part from their source files, or verify them.

A part is rank ``part`` of ``parts``: it owns the shards ``s % parts == part`` of every
family (a :class:`~vlastore.writer.FamilyWriter` with ``rank=part, world_size=parts``),
so no two parts ever touch one shard, whichever process runs them, and the store is
the same whatever the number of parts. The parent sends nothing per file: each part
finds its rows' files from the plan (:class:`~vlastore.ingest.plan.RowSources`),
reads them itself and writes each shard once, complete.

Fixed-shape rows are read straight into one shard-sized batch: a file laid out like
one read before is checked against that layout and its tensor bytes copied
(:func:`~vlastore.ingest.ptfile.template_tensor`); NaN/Inf are looked for once per
batch. Any other file goes through :func:`load_value`, with its exact reason when it
cannot be used. ``--verify`` reads the stored rows back shard by shard and compares
them with a fresh read of their sources.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format import FamilySpec
from .plan import ONLY_TENSOR, RowSources, core_shape, pick_entry
from .ptfile import read_pt, read_small, template_tensor, tensor_entries
from .report import MAX_PROBLEMS_LISTED, Problem, ProblemLog
from .scan import values_finite
from .source import MAX_FILE_BYTES, SourceError, file_size, retrying

__all__ = [
    "FamilyWork",
    "WriteJob",
    "PartResult",
    "Progress",
    "RowReader",
    "load_value",
    "write_part",
    "verify_part",
    "nonfinite_rows",
]


@dataclass
class FamilyWork:
    """What a worker needs to fill one family."""

    name: str
    entry: str
    spec: FamilySpec
    sources: RowSources


@dataclass
class WriteJob:
    """One ingestion's writes: the store, its families and the options the workers need."""

    store: str
    families: list[FamilyWork]
    max_file_bytes: int = MAX_FILE_BYTES
    repair: bool = False
    """Open writers with ``repair=True``: rows whose checksum fails are pending too, and rewritten."""


@dataclass
class PartResult:
    """What one part did, sent back to the parent once (counts and bounded lists, nothing per file)."""

    rows_written: int = 0
    source_bytes: int = 0
    """Bytes of the source files of this part's rows (read now, or looked up for rows written earlier)."""
    problems: ProblemLog = field(default_factory=ProblemLog)
    rows_checked: int = 0
    rows_missing: int = 0
    mismatches: list[str] = field(default_factory=list)
    mismatch_count: int = 0
    error: str | None = None
    """One line: why this part failed (the run fails)."""

    def mismatch(self, message: str) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < MAX_PROBLEMS_LISTED:
            self.mismatches.append(message)


class Progress:
    """A part's way to report rows done and to learn that the run is being stopped (Ctrl-C)."""

    def __init__(
        self, add: Callable[[int], None] = lambda n: None, stopped: Callable[[], bool] = lambda: False
    ) -> None:
        self.add = add
        self.stopped = stopped


class Stopped(Exception):
    """The parent asked the workers to stop (Ctrl-C): the part ends between two shards."""


# ----------------------------------------------------------------- one row


def load_value(
    path: str, entry: str, spec: FamilySpec, length: int, max_bytes: int = MAX_FILE_BYTES
) -> tuple[np.ndarray | None, Problem | None]:
    """The row stored for ``entry`` of ``path``, in storage dtype and row shape; or why it cannot be.

    Every check of the scan is made again here, so a file that went bad after
    the scan (or was never read by a fast scan) is skipped with its reason. The
    declared shape and dtype are checked before the tensor's bytes are read.
    Transient I/O errors are retried; when they persist the problem's reason
    is ``transient-error``. Never raises for a bad file.
    """
    try:
        try:
            return _load_value(path, entry, spec, length, max_bytes)
        except SourceError as exc:
            if not exc.transient:
                raise
            return retrying(lambda: _load_value(path, entry, spec, length, max_bytes))
    except SourceError as exc:
        return None, Problem(path, exc.reason, str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad file is one skipped file, whatever it raises
        return None, Problem(path, "corrupt", f"{path}: {type(exc).__name__}: {str(exc)[:200]}")


@functools.lru_cache(maxsize=1024)
def _expected(row_shape: tuple[int, ...], ragged: bool, length: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Shape, element count and core shape (no leading 1s) of a row of ``length`` (ragged) or of a fixed row."""
    shape = (length, *row_shape) if ragged else row_shape
    return shape, math.prod(shape), core_shape(shape)


def _label(path: str, entry: str) -> str:
    return path if entry == ONLY_TENSOR else f"{path} entry {entry!r}"


def _nonfinite_problem(path: str, entry: str) -> Problem:
    return Problem(
        path, "nonfinite", f"{_label(path, entry)}: holds NaN or Inf; fix the source or pass --allow-nonfinite"
    )


def _load_value(
    path: str, entry: str, spec: FamilySpec, length: int, max_bytes: int
) -> tuple[np.ndarray | None, Problem | None]:
    tensors, _ = tensor_entries(read_pt(path, max_bytes))
    tensor = pick_entry(tensors, entry)
    label = _label(path, entry)
    if tensor is None:
        what = "no float tensor" if not tensors else f"tensors {sorted(tensors)}"
        return None, Problem(path, "no-tensor", f"{label}: holds {what}")
    shape, numel, core = _expected(tuple(spec.row_shape), spec.ragged, length)
    if tensor.numel != numel or core_shape(tensor.shape) != core:
        return None, Problem(
            path, "wrong-shape", f"{label}: shape {list(tensor.shape)}, but the family holds {list(shape)} rows here"
        )
    if tensor.dtype != spec.dtype:
        return None, Problem(path, "wrong-dtype", f"{label}: dtype {tensor.dtype}, but the family is {spec.dtype}")
    array = tensor.array  # read only now that the declared shape and dtype are the family's
    if not spec.allow_nonfinite and not values_finite(array, tensor.dtype):
        return None, _nonfinite_problem(path, entry)
    return array.reshape(shape), None


def nonfinite_rows(batch: np.ndarray, dtype: str) -> np.ndarray:
    """bool per row of ``batch`` (``[rows, ...]`` in storage dtype): holds NaN or Inf (bfloat16 as uint16 bits)."""
    flat = batch.reshape(len(batch), -1)
    if dtype == "bfloat16":  # exponent bits all set; 0x7F80 is the largest value the mask leaves: one max per row
        return np.bitwise_and(flat, 0x7F80).max(axis=1, initial=0) == 0x7F80
    return ~np.isfinite(flat).all(axis=1)


class RowReader:
    """Reads the row a fixed-shape family takes from each file into a caller's buffer of the row's bytes.

    NaN/Inf are not looked for here (the caller checks a whole batch at once).
    """

    def __init__(self, entry: str, spec: FamilySpec, max_bytes: int) -> None:
        self.entry = entry
        self.spec = spec
        self.max_bytes = max_bytes
        self._pick = None if entry == ONLY_TENSOR else entry
        self._fits: dict[tuple[tuple[int, ...], str], bool] = {}

    def read_into(self, path: str, out: memoryview) -> tuple[int, Problem | None]:
        """Fill ``out`` (the row's bytes) from ``path``: ``(file size, None)`` or ``(file size, why not)``."""
        try:
            buf = read_small(path, self.max_bytes)
        except SourceError:
            buf = None  # the full reader retries what may pass and says what is wrong
        if buf is not None:
            hit = template_tensor(buf, self._pick)
            if hit is not None and self._fit(hit[1], hit[2]):
                out[:] = hit[0]  # a memoryview copy: no array made per file
                return len(buf), None
        value, problem = load_value(path, self.entry, self.spec, 1, self.max_bytes)
        size = len(buf) if buf is not None else file_size(path)
        if value is None:
            return size, problem
        out[:] = np.ascontiguousarray(value).reshape(-1).view(np.uint8).data
        return size, None

    def _fit(self, shape: tuple[int, ...], dtype: str) -> bool:
        fit = self._fits.get((shape, dtype))
        if fit is None:
            spec = self.spec
            fit = self._fits[(shape, dtype)] = (
                dtype == spec.dtype
                and core_shape(shape) == core_shape(spec.row_shape)
                and math.prod(shape) == math.prod(spec.row_shape)
            )
        return fit


# ----------------------------------------------------------------- a batch of fixed rows


class _Batch:
    """The rows of one shard read from their files, compacted: ``rows[:n]`` hold ``data[:n]``."""

    def __init__(self, work: FamilyWork, max_bytes: int, capacity: int) -> None:
        self.work = work
        self.reader = RowReader(work.entry, work.spec, max_bytes)
        self.data = np.empty((capacity, work.spec.row_nbytes), dtype=np.uint8)
        self._flat = self.data.data.cast("B")  # rows are copied in through it
        self.rows = np.empty(capacity, dtype=np.int64)
        self.n = 0

    def fill(self, rows: np.ndarray, paths: list[str], result: PartResult) -> list[Problem]:
        """Read ``rows`` from ``paths``; keep those that fit (NaN/Inf checked for the whole batch)."""
        spec = self.work.spec
        problems: list[Problem] = []
        kept_paths: list[str] = []
        read_into, flat, width, kept = self.reader.read_into, self._flat, spec.row_nbytes, self.rows
        n = nbytes = 0
        for row, path in zip(rows.tolist(), paths, strict=True):
            size, problem = read_into(path, flat[n * width : (n + 1) * width])
            nbytes += size
            if problem is not None:
                problems.append(problem)
                continue
            kept[n] = row
            kept_paths.append(path)
            n += 1
        result.source_bytes += nbytes
        if n and not spec.allow_nonfinite:
            bad = nonfinite_rows(self.values(n), spec.dtype)
            if bad.any():
                problems += [_nonfinite_problem(kept_paths[i], self.work.entry) for i in np.flatnonzero(bad).tolist()]
                keep = np.flatnonzero(~bad)
                self.data[: len(keep)] = self.data[keep]
                self.rows[: len(keep)] = self.rows[keep]
                n = len(keep)
        self.n = n
        return problems

    def values(self, n: int | None = None) -> np.ndarray:
        spec = self.work.spec
        n = self.n if n is None else n
        return self.data[:n].view(spec.storage_dtype).reshape(n, *spec.row_shape)


# ----------------------------------------------------------------- write


def pending_by_shard(writer: Any) -> Iterator[tuple[int, np.ndarray]]:
    """``(shard, rows)`` of :meth:`FamilyWriter.pending_rows`, shard by shard (the rows ascend)."""
    rows = np.asarray(writer.pending_rows(), dtype=np.int64)
    if not rows.size:
        return
    shards = writer.layout.shard_of(rows)  # no per-row map of the whole family for fixed rows
    cuts = (np.flatnonzero(np.diff(shards)) + 1).tolist()
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        yield int(shards[lo]), rows[lo:hi]


def write_part(store: Any, job: WriteJob, part: int, parts: int, progress: Progress) -> PartResult:
    """Write the pending rows of the shards part ``part`` of ``parts`` owns, in every family."""
    result = PartResult()
    kwargs = {"repair": True} if job.repair else {}
    for work in job.families:
        with store.writer(work.name, rank=part, world_size=parts, **kwargs) as writer:
            _ShardWriter(store, writer, work, job, result).run(progress)
    return result


class _ShardWriter:
    """Fills the pending shards of one family for one part."""

    def __init__(self, store: Any, writer: Any, work: FamilyWork, job: WriteJob, result: PartResult) -> None:
        self.writer = writer
        self.work = work
        self.job = job
        self.result = result
        self.existing = set(store.written_shards(work.name).tolist())
        self.batch = None if work.spec.ragged else _Batch(work, job.max_file_bytes, writer.layout.rows_per_shard)

    def run(self, progress: Progress) -> None:
        pending = []
        for shard, rows in pending_by_shard(self.writer):
            if progress.stopped():
                raise Stopped
            rows = rows[self.work.sources.has_source[rows]]
            self._shard(shard, rows)
            pending.append(rows)
            progress.add(len(rows))
        self._count_written_earlier(np.concatenate(pending) if pending else np.zeros(0, dtype=np.int64))

    def _shard(self, shard: int, rows: np.ndarray) -> None:
        paths = self.work.sources.paths(rows)
        values: np.ndarray | list[np.ndarray]
        if self.batch is not None:
            problems = self.batch.fill(rows, paths, self.result)
            ok_rows, values = self.batch.rows[: self.batch.n], self.batch.values()
        else:
            ok_rows, values, problems = self._ragged(rows, paths)
        self.result.problems.extend(problems)
        if any(p.reason == "transient-error" for p in problems):
            # the shard stays pending, with all its rows: a rerun reads them again. Written now, the rows that
            # failed would be holes as if their files were bad for good
            return
        if len(ok_rows):
            self.writer.write_rows(ok_rows, values)
            self.result.rows_written += len(ok_rows)
        if len(ok_rows) or shard not in self.existing:
            self.writer.finish_shard(shard)

    def _ragged(self, rows: np.ndarray, paths: list[str]) -> tuple[np.ndarray, list[np.ndarray], list[Problem]]:
        lengths = self.writer.layout.lengths
        ok_rows: list[int] = []
        values: list[np.ndarray] = []
        problems: list[Problem] = []
        for row, path in zip(rows.tolist(), paths, strict=True):
            value, problem = load_value(
                path, self.work.entry, self.work.spec, int(lengths[row]), self.job.max_file_bytes
            )
            self.result.source_bytes += file_size(path)
            if value is None:
                problems.append(problem)  # type: ignore[arg-type]
            else:
                ok_rows.append(row)
                values.append(value)
        return np.asarray(ok_rows, dtype=np.int64), values, problems

    def _count_written_earlier(self, pending: np.ndarray) -> None:
        """Add the size of the source files of this part's rows that an earlier run wrote (not read now)."""
        owned = self.writer.owned_rows()
        earlier = np.setdiff1d(owned[self.work.sources.has_source[owned]], pending, assume_unique=True)
        for path in self.work.sources.paths(earlier):
            self.result.source_bytes += file_size(path)


# ----------------------------------------------------------------- verify


@contextlib.contextmanager
def _shard_by_shard_reads() -> Iterator[None]:
    """Readers map one shard at a time (no arena, whose row map grows with the rows), in this process only."""
    before = os.environ.get("VLASTORE_NO_ARENA")
    os.environ["VLASTORE_NO_ARENA"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLASTORE_NO_ARENA", None)
        else:
            os.environ["VLASTORE_NO_ARENA"] = before


def verify_part(store: Any, job: WriteJob, part: int, parts: int, progress: Progress) -> PartResult:
    """Compare the stored rows of the shards ``s % parts == part`` bit-exactly with a fresh read of their sources.

    Shard by shard: the shard's maps are dropped after it, so memory does not grow with the store.
    ``store`` must not have made readers yet (they choose their maps when made).
    """
    result = PartResult()
    with _shard_by_shard_reads():
        for work in job.families:
            reader = store.reader(work.name)
            checker = _ShardChecker(reader, work, job, result)
            for shard in range(part, reader.layout.n_shards, parts):
                if progress.stopped():
                    raise Stopped
                rows = reader.layout.shard_rows(shard)
                rows = rows[work.sources.has_source[rows]]
                if rows.size:
                    checker.check(rows)
                reader.close()
                progress.add(len(rows))
    return result


def _rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool per row of two ``[rows, bytes]`` uint8 arrays: the bytes differ (compared 8 at a time when they can be)."""
    if a.shape[1] % 8 == 0 and a.flags.c_contiguous and b.flags.c_contiguous:
        a, b = a.view(np.uint64), b.view(np.uint64)
    return (a != b).any(axis=1)


class _ShardChecker:
    """Checks the rows of one shard against their sources."""

    def __init__(self, reader: Any, work: FamilyWork, job: WriteJob, result: PartResult) -> None:
        self.reader = reader
        self.work = work
        self.job = job
        self.result = result
        self.batch = None if work.spec.ragged else _Batch(work, job.max_file_bytes, reader.layout.rows_per_shard)

    def check(self, rows: np.ndarray) -> None:
        from ..reader import MissingRowError
        from ..shardcodec import ChecksumError

        if self.batch is None:
            for row in rows.tolist():
                self._check_row(row)
            return
        try:
            stored = self.reader.gather(rows)
        except (MissingRowError, ChecksumError):  # some rows are missing or corrupt: row by row says which
            for row in rows.tolist():
                self._check_row(row)
            return
        self._check_batch(rows, stored)

    def _check_batch(self, rows: np.ndarray, stored: np.ndarray) -> None:
        paths = self.work.sources.paths(rows)
        problems = self.batch.fill(rows, paths, PartResult())  # type: ignore[union-attr]
        self.result.rows_checked += len(rows)
        for problem in problems:
            row = rows[paths.index(problem.path)]
            self.result.mismatch(f"{self.work.name} row {self.reader.describe(int(row))}: {problem.message}")
        batch = self.batch
        assert batch is not None
        read = batch.rows[: batch.n]
        stored_bytes = np.ascontiguousarray(stored).reshape(len(rows), -1).view(np.uint8)
        if batch.n == len(rows):  # every source read (the usual case): the rows are those of the shard, in order
            position, got = np.arange(len(rows)), stored_bytes
        else:
            position = np.searchsorted(rows, read)
            got = stored_bytes[position]
        differ = _rows_differ(got, batch.data[: batch.n])
        for i in np.flatnonzero(differ).tolist():
            row = int(read[i])
            self.result.mismatch(
                f"{self.work.name} row {self.reader.describe(row)}: stored bytes differ from {paths[int(position[i])]}"
            )

    def _check_row(self, row: int) -> None:
        from ..reader import MissingRowError
        from ..shardcodec import ChecksumError

        work, reader = self.work, self.reader
        try:
            stored = reader.row(row)
        except MissingRowError:
            self.result.rows_missing += 1
            return
        except ChecksumError as exc:
            self.result.mismatch(f"{work.name} row {reader.describe(row)}: {exc}")
            return
        path = work.sources.paths(np.array([row]))[0]
        source, problem = load_value(
            path, work.entry, work.spec, int(reader.layout.lengths[row]), self.job.max_file_bytes
        )
        self.result.rows_checked += 1
        if problem is not None:
            self.result.mismatch(f"{work.name} row {reader.describe(row)}: {problem.message}")
        elif (
            source is None
            or source.shape != stored.shape
            or np.ascontiguousarray(source).tobytes() != np.ascontiguousarray(stored).tobytes()
        ):
            self.result.mismatch(f"{work.name} row {reader.describe(row)}: stored bytes differ from {path}")
