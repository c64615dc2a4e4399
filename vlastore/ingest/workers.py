"""Worker processes: parallel scan, shard-aligned writes and bit-exact verification.

Each write worker is rank ``i`` of ``N`` and owns the shards ``s % N == i`` of
every family (a :class:`~vlastore.writer.FamilyWriter` per family), so no two
processes ever touch one shard. Workers report progress and problems to the
parent over a queue; the parent draws the progress bar.

Workers die with their parent (``PR_SET_PDEATHSIG`` on Linux, a parent check
elsewhere): after a ``kill -9`` of the ingest command nothing keeps writing,
and a rerun never races a leftover worker.
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..format import FamilySpec
from .plan import ONLY_TENSOR, core_shape, pick_entry
from .ptfile import read_pt, tensor_entries
from .report import IngestError, Problem, describe_failure
from .scan import values_finite
from .source import MAX_FILE_BYTES, SourceError, retrying

__all__ = ["FamilyWork", "WriteJob", "parallel_map", "run_workers", "load_value", "die_with_parent"]

PROGRESS_EVERY = 256


@dataclass
class FamilyWork:
    """What a worker needs to fill one family."""

    name: str
    entry: str
    spec: FamilySpec
    row_file: np.ndarray
    lengths: np.ndarray | None


@dataclass
class WriteJob:
    store: str
    paths: list[str]
    families: list[FamilyWork]
    max_file_bytes: int = MAX_FILE_BYTES
    repair: bool = False
    """Open writers with ``repair=True``: rows whose checksum fails are pending too, and rewritten."""


def _context() -> Any:
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def die_with_parent(parent: int) -> None:
    """Make this worker process exit when its parent (pid ``parent``) dies, even by SIGKILL.

    Call it in child processes only. Ctrl-C is left to the parent, which stops
    the workers: a worker never prints a ``KeyboardInterrupt`` traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def parallel_map(func: Callable[[Any], Any], items: list[Any], workers: int,
                 progress: Callable[[int], None] | None = None) -> Iterator[Any]:
    """``map(func, items)`` in order, over ``workers`` processes (in-process for one)."""
    if workers <= 1 or len(items) < 2:
        for item in items:
            yield func(item)
            if progress:
                progress(1)
        return
    chunk = max(1, min(256, len(items) // (workers * 16)))
    with _context().Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        for result in pool.imap(func, items, chunksize=chunk):
            yield result
            if progress:
                progress(1)


# ----------------------------------------------------------------- values


def load_value(path: str, entry: str, spec: FamilySpec, length: int, max_bytes: int = MAX_FILE_BYTES
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


def _load_value(path: str, entry: str, spec: FamilySpec, length: int, max_bytes: int
                ) -> tuple[np.ndarray | None, Problem | None]:
    tensors, _ = tensor_entries(read_pt(path, max_bytes))
    tensor = pick_entry(tensors, entry)
    label = path if entry == ONLY_TENSOR else f"{path} entry {entry!r}"
    if tensor is None:
        what = "no float tensor" if not tensors else f"tensors {sorted(tensors)}"
        return None, Problem(path, "no-tensor", f"{label}: holds {what}")
    shape, numel, core = _expected(tuple(spec.row_shape), spec.ragged, length)
    if tensor.numel != numel or core_shape(tensor.shape) != core:
        return None, Problem(path, "wrong-shape", f"{label}: shape {list(tensor.shape)}, but the family holds "
                             f"{list(shape)} rows here")
    if tensor.dtype != spec.dtype:
        return None, Problem(path, "wrong-dtype", f"{label}: dtype {tensor.dtype}, but the family is {spec.dtype}")
    array = tensor.array  # read only now that the declared shape and dtype are the family's
    if not spec.allow_nonfinite and not values_finite(array, tensor.dtype):
        return None, Problem(path, "nonfinite", f"{label}: holds NaN or Inf; fix the source or pass "
                             "--allow-nonfinite")
    return array.reshape(shape), None


# ----------------------------------------------------------------- write / verify


def _pending_by_shard(writer: Any) -> Iterator[tuple[int, np.ndarray]]:
    """``(shard, rows)`` of :meth:`FamilyWriter.pending_rows`, shard by shard (the rows ascend)."""
    rows = np.asarray(writer.pending_rows(), dtype=np.int64)
    if not rows.size:
        return
    shards = writer.layout.row_shards[rows]
    cuts = (np.flatnonzero(np.diff(shards)) + 1).tolist()
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        yield int(shards[lo]), rows[lo:hi]


def _write_family(store: Any, work: FamilyWork, job: WriteJob, rank: int, world: int, send: Callable) -> None:
    kwargs = {"repair": True} if job.repair else {}
    with store.writer(work.name, rank=rank, world_size=world, **kwargs) as writer:
        layout = writer.layout
        spec = work.spec
        existing = set(store.written_shards(work.name).tolist())
        for shard, rows in _pending_by_shard(writer):
            sources = work.row_file[rows]
            have = sources >= 0
            rows, sources = rows[have], sources[have]
            problems: list[Problem] = []
            ok_rows: list[int] = []
            values: list[np.ndarray] = []  # ragged rows
            batch = None if spec.ragged else np.empty((len(rows), *spec.row_shape), dtype=spec.storage_dtype)
            done = 0
            for row, f in zip(rows.tolist(), sources.tolist(), strict=True):
                length = int(layout.lengths[row]) if spec.ragged else 1
                value, problem = load_value(job.paths[f], work.entry, spec, length, job.max_file_bytes)
                if problem:
                    problems.append(problem)
                elif batch is not None:
                    batch[len(ok_rows)] = value
                    ok_rows.append(row)
                else:
                    values.append(value)  # type: ignore[arg-type]
                    ok_rows.append(row)
                done += 1
                if done % PROGRESS_EVERY == 0:
                    send(("progress", PROGRESS_EVERY, [], 0))
            if any(p.reason == "transient-error" for p in problems):
                # the shard stays pending, with all its rows: a rerun reads them again. Written now, the rows that
                # failed would be holes as if their files were bad for good
                send(("progress", done % PROGRESS_EVERY, problems, 0))
                continue
            if ok_rows:
                writer.write_rows(ok_rows, values if batch is None else batch[: len(ok_rows)])
            if ok_rows or shard not in existing:
                writer.finish_shard(shard)
            send(("progress", done % PROGRESS_EVERY, problems, len(ok_rows)))


def _verify_family(store: Any, work: FamilyWork, job: WriteJob, rank: int, world: int, send: Callable) -> None:
    from ..reader import MissingRowError
    from ..shardcodec import ChecksumError

    reader = store.reader(work.name)
    layout = reader.layout
    for shard in range(rank, layout.n_shards, world):
        rows = layout.shard_rows(shard)
        mismatches: list[str] = []
        checked = missing = 0
        for row in rows[work.row_file[rows] >= 0].tolist():
            path = job.paths[int(work.row_file[row])]
            try:
                stored = reader.row(row)
            except MissingRowError:
                missing += 1
                continue
            except ChecksumError as exc:
                mismatches.append(f"{work.name} row {reader.describe(row)}: {exc}")
                continue
            source, problem = load_value(path, work.entry, work.spec, int(layout.lengths[row]), job.max_file_bytes)
            checked += 1
            if problem is not None:
                mismatches.append(f"{work.name} row {reader.describe(row)}: {problem.message}")
            elif source is None or source.shape != stored.shape or np.ascontiguousarray(source).tobytes() != \
                    np.ascontiguousarray(stored).tobytes():
                mismatches.append(f"{work.name} row {reader.describe(row)}: stored bytes differ from {path}")
        send(("verified", checked, missing, mismatches))


def _child_main(parent: int, rank: int, world: int, job: WriteJob, mode: str, out: Any) -> None:
    die_with_parent(parent)
    _worker_main(rank, world, job, mode, out)


def _worker_main(rank: int, world: int, job: WriteJob, mode: str, out: Any) -> None:
    where = f"{mode} of {job.store}"
    try:
        from ..store import VLAStore

        store = VLAStore.open(job.store, writable=mode == "write")
        for work in job.families:
            where = f"{mode} of family {work.name!r} in {job.store}"
            if mode == "write":
                _write_family(store, work, job, rank, world, out.put)
            else:
                _verify_family(store, work, job, rank, world, out.put)
        out.put(("done", rank))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported to the parent in one line, which fails the run
        if os.environ.get("VLASTORE_DEBUG"):
            traceback.print_exc()
        out.put(("error", rank, describe_failure(exc, where)))
        raise SystemExit(1) from None


def run_workers(job: WriteJob, workers: int, mode: str, on_message: Callable[[tuple], None]) -> None:
    """Run ``workers`` ranks of ``mode`` (``"write"`` or ``"verify"``), feeding their messages to ``on_message``.

    Raises:
        IngestError: a worker failed (with its traceback) or died.
    """
    if workers <= 1:
        inline: list[tuple] = []

        class _Inline:
            @staticmethod
            def put(msg: tuple) -> None:
                if msg[0] == "error":
                    inline.append(msg)
                elif msg[0] != "done":
                    on_message(msg)

        try:
            _worker_main(0, 1, job, mode, _Inline)
        except SystemExit:
            raise IngestError(f"{mode} failed: {inline[-1][2] if inline else 'unknown error'}") from None
        return
    ctx = _context()
    out = ctx.Queue()
    procs = [ctx.Process(target=_child_main, args=(os.getpid(), rank, workers, job, mode, out), daemon=True)
             for rank in range(workers)]
    for p in procs:
        p.start()
    finished: set[int] = set()
    errors: list[str] = []
    try:
        while len(finished) < workers:
            try:
                msg = out.get(timeout=0.2)
            except queue_mod.Empty:
                for rank, p in enumerate(procs):
                    if rank not in finished and not p.is_alive():
                        _drain(out, on_message, finished, errors)
                        if rank not in finished:
                            finished.add(rank)
                            errors.append(f"worker {rank} died (exit code {p.exitcode}: killed, or out of memory?); "
                                          "rerun the same command: finished shards are kept")
                continue
            _handle(msg, on_message, finished, errors)
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
    if errors:
        distinct = list(dict.fromkeys(errors))  # every worker hitting a full disk says the same thing
        raise IngestError(f"{mode} failed in {len(errors)} of {workers} worker(s): " + "\n  ".join(distinct[:3]))


def _handle(msg: tuple, on_message: Callable, finished: set[int], errors: list[str]) -> None:
    if msg[0] == "done":
        finished.add(msg[1])
    elif msg[0] == "error":
        finished.add(msg[1])
        errors.append(msg[2])
    else:
        on_message(msg)


def _drain(out: Any, on_message: Callable, finished: set[int], errors: list[str]) -> None:
    while True:
        try:
            _handle(out.get(timeout=0.5), on_message, finished, errors)
        except queue_mod.Empty:
            return
