"""Worker processes of an ingestion: a standard-library process pool, plus what it does not give.

:func:`parallel_map` (the scan, robot files) and :func:`run_parts` (shard writes and
``--verify``, see :mod:`vlastore.ingest.shardwork`) run on a
:class:`concurrent.futures.ProcessPoolExecutor`, which reports a worker that dies
(killed, out of memory) instead of waiting for it. Added here:

* workers die with their parent (:func:`die_with_parent`: ``PR_SET_PDEATHSIG`` on
  Linux, a parent check elsewhere): after a ``kill -9`` of the ingest command nothing
  keeps writing, and a rerun never races a leftover worker;
* Ctrl-C reaches the parent only; it asks the parts to stop between two shards and
  waits for them, so no worker prints a traceback and no shard is left half-made;
* progress: parts add the rows they finish to one shared counter, which the parent
  shows; a part's result (counts, bounded lists) comes back once, at its end;
* a failure in a part is one line (:func:`~vlastore.ingest.report.describe_failure`),
  never a traceback (``VLASTORE_DEBUG=1`` prints it in the worker).

The pool forks (where the platform can): the plan is inherited, never pickled per
task, and no h5py handle is open in the parent while it forks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .report import IngestError, describe_failure
from .shardwork import PartResult, Progress, Stopped, WriteJob

__all__ = ["parallel_map", "run_parts", "die_with_parent", "Part"]

Part = Callable[[Any, WriteJob, int, int, Progress], PartResult]
"""``part(store, job, part, parts, progress)``: what one part of :func:`run_parts` does."""

_POLL_SECONDS = 0.25
"""How often the parent refreshes the progress bar while parts run."""

_WORKER: dict[str, Any] = {}
"""In a worker process (or the parent, for one worker): the job, the shared counter and stop flag, the store."""


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
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the parent is the thread that forked us
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _pool(workers: int, initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A pool forked from the calling (main) thread, so PR_SET_PDEATHSIG follows the process that lives on."""
    return ProcessPoolExecutor(
        workers, mp_context=_context(), initializer=_init_worker, initargs=(os.getpid(), *initargs)
    )


def _init_worker(parent: int, *state: Any) -> None:
    die_with_parent(parent)
    if state:
        job, counter, stop = state
        _WORKER.clear()
        _WORKER.update(job=job, counter=counter, stop=stop)


def _died(what: str) -> IngestError:
    return IngestError(
        f"{what} failed: a worker process died (killed, or out of memory?); rerun the same command: "
        "finished shards are kept"
    )


def parallel_map(
    func: Callable[[Any], Any], items: list[Any], workers: int, progress: Callable[[int], None] | None = None
) -> Iterator[Any]:
    """``map(func, items)`` in order, over ``workers`` processes (in-process for one).

    Raises:
        IngestError: a worker process died.
    """
    if workers <= 1 or len(items) < 2:
        for item in items:
            yield func(item)
            if progress:
                progress(1)
        return
    chunk = max(1, min(256, len(items) // (workers * 16)))
    with _pool(workers) as pool:
        try:
            for result in pool.map(func, items, chunksize=chunk):
                yield result
                if progress:
                    progress(1)
        except BrokenProcessPool:
            raise _died("reading the source files") from None


# ----------------------------------------------------------------- parts


def run_parts(
    part: Part, job: WriteJob, parts: int, workers: int, mode: str, progress: Callable[[int], None]
) -> list[PartResult]:
    """Run ``part(store, job, i, parts, ...)`` for every ``i`` over ``workers`` processes; their results.

    ``progress`` gets the rows done as the parts report them. ``mode`` names the work
    in messages (``write``, ``verify``).

    Raises:
        IngestError: a part failed (one line per distinct cause) or a worker died.
        KeyboardInterrupt: Ctrl-C; the parts were stopped between two shards first.
    """
    if workers <= 1 or parts <= 1:
        results = _run_inline(part, job, parts, mode, progress)
    else:
        results = _run_pool(part, job, parts, min(workers, parts), mode, progress)
    errors = [r.error for r in results if r.error]
    if errors:  # the first cause: parts stop once one failed, and those running then say much the same
        more = f" (and in {len(errors) - 1} more part(s))" if len(errors) > 1 else ""
        raise IngestError(f"{mode} failed{more}: {errors[0]}")
    return results


def _run_inline(part: Part, job: WriteJob, parts: int, mode: str, progress: Callable[[int], None]) -> list[PartResult]:
    _WORKER.clear()
    _WORKER.update(job=job, progress=Progress(progress))
    try:
        results: list[PartResult] = []
        for i in range(parts):
            results.append(_run_part(part, i, parts, mode))
            if results[-1].error:  # a full disk fails every part alike: stop at the first
                break
        return results
    finally:
        _WORKER.clear()


def _run_pool(
    part: Part, job: WriteJob, parts: int, workers: int, mode: str, progress: Callable[[int], None]
) -> list[PartResult]:
    ctx = _context()
    counter = ctx.Value("q", 0)
    stop = ctx.Event()
    results: list[PartResult] = []
    shown = 0
    pool = _pool(workers, (job, counter, stop))
    try:
        pending: set[Future[PartResult]] = {pool.submit(_run_part, part, i, parts, mode) for i in range(parts)}
        while pending:
            done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
            value = counter.value
            progress(value - shown)
            shown = value
            results += [future.result() for future in done]
            if any(r.error for r in results):  # a full disk fails every part alike: stop the others
                stop.set()
    except BrokenProcessPool:
        raise _died(mode) from None
    except BaseException:  # Ctrl-C, or a failure here: the parts stop at their next shard
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _run_part(part: Part, i: int, parts: int, mode: str) -> PartResult:
    """One part in this process; its failure comes back as one line in the result."""
    job: WriteJob = _WORKER["job"]
    where = f"{mode} of {job.store}"
    try:
        store = _store(job, writable=mode == "write")
        return part(store, job, i, parts, _progress())
    except Stopped:
        return PartResult()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported to the parent in one line, which fails the run
        if os.environ.get("VLASTORE_DEBUG"):
            traceback.print_exc()
        result = PartResult()
        result.error = describe_failure(exc, where)
        return result


def _progress() -> Progress:
    """The parent's progress bar in-process; in a worker, the shared counter and stop flag."""
    progress = _WORKER.get("progress")
    if progress is not None:
        return progress
    counter, stop = _WORKER["counter"], _WORKER["stop"]

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    return Progress(add, stop.is_set)


def _store(job: WriteJob, writable: bool) -> Any:
    """The store of this job, opened once per process and run (a new run, e.g. verify after write, reopens it)."""
    store = _WORKER.get("store")
    if store is None:
        from ..store import VLAStore

        store = _WORKER["store"] = VLAStore.open(job.store, writable=writable)
    return store
