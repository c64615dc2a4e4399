"""A ``DataLoader`` whose workers cost the training process little per batch.

:class:`VLADataLoader` is ``torch.utils.data.DataLoader`` (a subclass: every
argument, sampler, ``DistributedSampler``, ``persistent_workers``,
``pin_memory``, ``worker_init_fn``, ``get_worker_info()`` and
``multiprocessing_context`` work as there); only how batches travel between
the training process and its workers differs, for map-style datasets with
``num_workers > 0``:

- torch's loader sends each batch's indices through a ``multiprocessing.Queue``
  (a feeder thread that wakes, pickles and writes) and takes results from one
  queue shared by all workers, so each batch costs the training process a few
  thread hand-overs and ~0.2 ms of Python on 2 cores, more than a whole
  VLADataset batch of 64 costs to make. Here each worker has two pipes of its
  own; the training process writes the indices of batch ``k`` to worker
  ``k % num_workers`` and reads batch ``k`` from that worker's pipe: in order,
  no threads, no reorder buffer, no polling of every worker;
- batches come back through :mod:`vlastore.transport` (a shared-memory slot and
  one memcpy) as in torch's loader, straight into page-locked memory when
  ``pin_memory=True`` (no second copy by a pin-memory thread);
- ``prefetch_factor`` defaults to 4 (torch: 2): on a loaded machine a worker
  that waits a scheduler tick for a CPU then still has work queued.

Everything else (iterable datasets, ``num_workers=0``) is torch's own path.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import random
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader
from torch.utils.data._utils import pin_memory as _pin
from torch.utils.data._utils import signal_handling as _signals
from torch.utils.data._utils import worker as _worker
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind

from . import transport
from .sampler import ResumableDataLoader

__all__ = ["VLADataLoader", "ResumableVLADataLoader", "DEFAULT_PREFETCH"]

DEFAULT_PREFETCH = 4
"""Batches in flight per worker unless ``prefetch_factor`` says otherwise."""

_WATCH_S = 5.0  # a worker checks this often that the training process is still there


class VLADataLoader(DataLoader):
    """``torch.utils.data.DataLoader`` with a leaner path between workers and the training process.

    Takes exactly DataLoader's arguments (see the module doc for what differs
    inside); ``prefetch_factor`` defaults to :data:`DEFAULT_PREFETCH` with workers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("prefetch_factor") is None and self._workers_of(args, kwargs) > 0:
            kwargs["prefetch_factor"] = DEFAULT_PREFETCH
        super().__init__(*args, **kwargs)

    @staticmethod
    def _workers_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        # DataLoader(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, ...)
        return int(kwargs.get("num_workers", args[5] if len(args) > 5 else 0))

    def _get_iterator(self) -> _BaseDataLoaderIter:
        if self.num_workers == 0 or self._dataset_kind != _DatasetKind.Map:
            return super()._get_iterator()
        return _PipeIter(self)


class ResumableVLADataLoader(ResumableDataLoader, VLADataLoader):
    """:class:`~vlastore.sampler.ResumableDataLoader` over :class:`VLADataLoader`'s workers."""


class _PipeIter(_BaseDataLoaderIter):
    """Workers with a pipe each way; batch ``k`` goes to, and comes from, worker ``k % num_workers``."""

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)
        context = loader.multiprocessing_context or torch.multiprocessing
        self._prefetch = int(loader.prefetch_factor or DEFAULT_PREFETCH)
        self._workers: list[Any] = []
        self._index_out: list[Any] = []
        self._results_in: list[Any] = []
        self._pending: collections.deque[int] = collections.deque()  # worker of each batch in flight, in order
        self._sent = 0
        self._shutdown = False
        try:
            for worker_id in range(self._num_workers):
                index_in, index_out = context.Pipe(duplex=False)
                results_in, results_out = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker_loop,
                    args=(
                        self._dataset,
                        index_in,
                        results_out,
                        worker_id,
                        self._num_workers,
                        self._base_seed,
                        loader.worker_init_fn,
                        self._auto_collation,
                        self._collate_fn,
                        self._drop_last,
                    ),
                    daemon=True,
                )
                process.start()
                # the parent keeps only its ends, so a worker that dies closes its result pipe for good
                index_in.close()
                results_out.close()
                self._workers.append(process)
                self._index_out.append(index_out)
                self._results_in.append(results_in)
        except BaseException:
            self._shutdown_workers()
            raise
        self._prime()

    # ------------------------------------------------------------------ flow

    def _prime(self) -> None:
        for _ in range(self._prefetch * self._num_workers):
            if not self._put_index():
                break

    def _put_index(self) -> bool:
        try:
            index = self._next_index()
        except StopIteration:
            return False
        worker = self._sent % self._num_workers
        self._sent += 1
        # plain pickle: ForkingPickler copies its dispatch table on every call (~15 us), and indices need none
        try:  # noqa: SIM105 - a try costs nothing per batch, a suppress() context does
            self._index_out[worker].send_bytes(pickle.dumps(index, pickle.HIGHEST_PROTOCOL))
        except OSError:  # that worker is gone: reading its results says so, with its exit code
            pass
        self._pending.append(worker)
        return True

    def _receive(self, worker: int) -> Any:
        results = self._results_in[worker]
        if self._timeout > 0 and not results.poll(self._timeout):
            self._shutdown_workers(wait_s=0.1)  # a worker stuck in a batch gets terminated, not waited for
            raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")
        try:
            payload = results.recv_bytes()
            transport.unpack_pinned(self._pin_memory)  # batches from the rings land in pinned memory directly
            try:
                return ForkingPickler.loads(payload)
            finally:
                transport.unpack_pinned(False)
        except (EOFError, OSError):
            # a dead worker closes its pipe, or cannot hand over the file descriptor a message names
            process = self._workers[worker]
            process.join(timeout=1.0)
            if process.exitcode is None:
                raise
            self._shutdown_workers()
            raise RuntimeError(
                f"DataLoader worker (pid {process.pid}) exited unexpectedly with exit code {process.exitcode}; "
                "a negative code is the signal that ended it (e.g. -9: killed, often by the out-of-memory killer)"
            ) from None

    def _next_data(self) -> Any:
        if not self._pending:
            if not self._persistent_workers:
                self._shutdown_workers()
            raise StopIteration
        worker = self._pending.popleft()
        self._put_index()  # the worker that just finished gets its next batch before we read
        data = self._receive(worker)
        if isinstance(data, ExceptionWrapper):
            data.reraise()
        if self._pin_memory:
            data = _pin.pin_memory(data, self._pin_memory_device)
        return data

    def __next__(self) -> Any:
        if torch.autograd._profiler_enabled():
            return super().__next__()
        # DataLoader's __next__ without its profiler scope (~10 us a batch when nobody records)
        if self._sampler_iter is None:
            self._reset(None)  # type: ignore[arg-type]
        data = self._next_data()
        self._num_yielded += 1
        return data

    def _reset(self, loader: Any, first_iter: bool = False) -> None:
        """A new epoch on persistent workers: drop what the last one left in flight, start over."""
        super()._reset(loader, first_iter)
        while self._pending:
            worker = self._pending.popleft()
            self._receive(worker)  # read (which frees its ring slot) and dropped
        self._prime()

    # -------------------------------------------------------------- shutdown

    def _shutdown_workers(self, wait_s: float = 5.0) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        for out in self._index_out:
            with contextlib.suppress(OSError, ValueError):  # a worker that is gone already
                out.send_bytes(pickle.dumps(None))
        for process in self._workers:
            process.join(timeout=wait_s)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
        for conn in (*self._index_out, *self._results_in):
            conn.close()
        self._pending.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit modules may be gone already
            self._shutdown_workers()


def _worker_loop(
    dataset: Any,
    index_in: Any,
    results_out: Any,
    worker_id: int,
    num_workers: int,
    base_seed: int,
    init_fn: Any,
    auto_collation: bool,
    collate_fn: Any,
    drop_last: bool,
) -> None:
    """A worker process: seeds and worker info as torch's loader sets them, then batches until told to stop."""
    _signals._set_worker_signal_handlers()
    torch.set_num_threads(1)
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(_worker._generate_state(base_seed, worker_id))
    _worker._worker_info = _worker.WorkerInfo(id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset)
    failed: ExceptionWrapper | None = None
    try:
        if init_fn is not None:
            init_fn(worker_id)
        fetcher = _DatasetKind.create_fetcher(_DatasetKind.Map, dataset, auto_collation, collate_fn, drop_last)
    except Exception:  # noqa: BLE001 - reported to the training process with its traceback
        failed = ExceptionWrapper(where=f"in DataLoader worker process {worker_id}")
    parent = os.getppid()
    # one pickler for all batches: ForkingPickler.dumps builds a new one, dispatch table and all, per call
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL)
    while True:
        if not index_in.poll(_WATCH_S):
            if os.getppid() != parent:  # the training process is gone
                return
            continue
        try:
            index = pickle.loads(index_in.recv_bytes())
        except (EOFError, OSError):
            return
        if index is None:
            return
        if failed is not None:
            data: Any = failed
        else:
            try:
                data = fetcher.fetch(index)
            except Exception:  # noqa: BLE001
                data = ExceptionWrapper(where=f"in DataLoader worker process {worker_id}")
        buffer.seek(0)
        buffer.truncate()
        pickler.clear_memo()
        pickler.dump(data)
        del data
        view = buffer.getbuffer()
        try:
            results_out.send_bytes(view)
        except (BrokenPipeError, OSError):
            return
        finally:
            view.release()
