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
from .ptfile import PtFileError, read_pt, tensor_entries
from .report import IngestError, Problem
from .scan import values_finite

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


def _context() -> Any:
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def die_with_parent(parent: int) -> None:
    """Make this worker process exit when its parent (pid ``parent``) dies, even by SIGKILL.

    Call it in child processes only.
    """
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


def load_value(path: str, entry: str, spec: FamilySpec, length: int) -> tuple[np.ndarray | None, Problem | None]:
    """The row stored for ``entry`` of ``path``, in storage dtype and row shape; or why it cannot be.

    Every check of the scan is made again here, so a file that went bad after
    the scan (or was never read by a fast scan) is skipped with its reason.
    """
    try:
        tensors, _ = tensor_entries(read_pt(path))
    except PtFileError as exc:
        return None, Problem(path, exc.reason, str(exc))
    except OSError as exc:
        return None, Problem(path, "unreadable", f"{path}: {exc.strerror or exc}")
    tensor = pick_entry(tensors, entry)
    label = path if entry == ONLY_TENSOR else f"{path} entry {entry!r}"
    if tensor is None:
        what = "no float tensor" if not tensors else f"tensors {sorted(tensors)}"
        return None, Problem(path, "no-tensor", f"{label}: holds {what}")
    shape = (length, *spec.row_shape) if spec.ragged else spec.row_shape
    if tensor.array.size != math.prod(shape) or core_shape(tensor.shape) != core_shape(shape):
        return None, Problem(path, "wrong-shape", f"{label}: shape {list(tensor.shape)}, but the family holds "
                             f"{list(shape)} rows here")
    if tensor.dtype != spec.dtype:
        return None, Problem(path, "wrong-dtype", f"{label}: dtype {tensor.dtype}, but the family is {spec.dtype}")
    if not spec.allow_nonfinite and not values_finite(tensor.array, tensor.dtype):
        return None, Problem(path, "nonfinite", f"{label}: holds NaN or Inf; fix the source or pass "
                             "--allow-nonfinite")
    return tensor.array.reshape(shape), None


# ----------------------------------------------------------------- write / verify


def _write_family(store: Any, work: FamilyWork, paths: list[str], rank: int, world: int, send: Callable) -> None:
    writer = store.writer(work.name, rank=rank, world_size=world)
    layout = writer.layout
    spec = work.spec
    for shard in writer.pending_shards().tolist():
        rows = layout.shard_rows(shard)
        sources = work.row_file[rows]
        have = sources >= 0
        rows, sources = rows[have], sources[have]
        problems: list[Problem] = []
        done = 0
        if spec.ragged:
            ok_rows, values = [], []
            for row, f in zip(rows.tolist(), sources.tolist(), strict=True):
                value, problem = load_value(paths[f], work.entry, spec, int(layout.lengths[row]))
                if problem:
                    problems.append(problem)
                else:
                    ok_rows.append(row)
                    values.append(value)
                done += 1
                if done % PROGRESS_EVERY == 0:
                    send(("progress", PROGRESS_EVERY, []))
            if ok_rows:
                writer.write_rows(ok_rows, values)
        else:
            batch = np.empty((len(rows), *spec.row_shape), dtype=spec.storage_dtype)
            ok = np.zeros(len(rows), dtype=bool)
            for k, f in enumerate(sources.tolist()):
                value, problem = load_value(paths[f], work.entry, spec, 1)
                if problem:
                    problems.append(problem)
                else:
                    batch[k] = value
                    ok[k] = True
                done += 1
                if done % PROGRESS_EVERY == 0:
                    send(("progress", PROGRESS_EVERY, []))
            if ok.any():
                writer.write_rows(rows[ok], batch[ok] if not ok.all() else batch)
        writer.finish_shard(shard)
        send(("progress", done % PROGRESS_EVERY, problems))
    writer.close()


def _verify_family(store: Any, work: FamilyWork, paths: list[str], rank: int, world: int, send: Callable) -> None:
    from ..reader import MissingRowError
    from ..shardcodec import ChecksumError

    reader = store.reader(work.name)
    layout = reader.layout
    for shard in range(rank, layout.n_shards, world):
        rows = layout.shard_rows(shard)
        mismatches: list[str] = []
        checked = missing = 0
        for row in rows[work.row_file[rows] >= 0].tolist():
            path = paths[int(work.row_file[row])]
            try:
                stored = reader.row(row)
            except MissingRowError:
                missing += 1
                continue
            except ChecksumError as exc:
                mismatches.append(f"{work.name} row {reader.describe(row)}: {exc}")
                continue
            source, problem = load_value(path, work.entry, work.spec, int(layout.lengths[row]))
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
    try:
        from ..store import VLAStore

        store = VLAStore.open(job.store, writable=mode == "write")
        for work in job.families:
            if mode == "write":
                _write_family(store, work, job.paths, rank, world, out.put)
            else:
                _verify_family(store, work, job.paths, rank, world, out.put)
        out.put(("done", rank))
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        out.put(("error", rank, traceback.format_exc()))
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
            raise IngestError(f"{mode} failed:\n{inline[-1][2] if inline else ''}") from None
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
                            errors.append(f"worker {rank} died (exit code {p.exitcode})")
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
        raise IngestError(f"{mode} failed in {len(errors)} worker(s):\n" + "\n".join(errors))


def _handle(msg: tuple, on_message: Callable, finished: set[int], errors: list[str]) -> None:
    if msg[0] == "done":
        finished.add(msg[1])
    elif msg[0] == "error":
        finished.add(msg[1])
        errors.append(f"worker {msg[1]}:\n{msg[2]}")
    else:
        on_message(msg)


def _drain(out: Any, on_message: Callable, finished: set[int], errors: list[str]) -> None:
    while True:
        try:
            _handle(out.get(timeout=0.5), on_message, finished, errors)
        except queue_mod.Empty:
            return
