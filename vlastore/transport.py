"""Batches from DataLoader workers to the training process through shared memory.

A DataLoader worker pickles every batch into its result queue. For a batch of a
few hundred KB that costs more than making it: torch moves each tensor into a
shared-memory segment of its own (a new segment, file descriptor and map per
tensor per batch), and pickling the bytes through the worker's pipe instead
costs a pickle, a pipe transfer and an unpickle (measured on 2 cores, 300 KB:
~330 us to pickle, ~290 us to unpickle, and the pipe on top).

Here each worker process owns a *ring*: a few slots in one shared-memory tensor,
made once and handed to the training process once (torch passes its file
descriptor). A batch is copied into a free slot and only a small descriptor
(slot, and per tensor its key, dtype, shape and offset) is pickled. The training
process copies the slot into one new tensor (one memcpy), makes the batch's
tensors as views of it and marks the slot free again. Batches therefore own
their memory: the ring never depends on what the training loop keeps.

Slot states live in the ring's header: the worker sets a slot busy before it
sends the descriptor, the training process sets it free after its copy. The
descriptor travels through the worker's pipe, a kernel round trip that orders
the worker's writes before the reader's copy. A worker that finds no free slot
(e.g. the training loop stopped reading) or a batch bigger than a slot sends
that batch the ordinary way, so nothing can block: correctness never depends on
the ring.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

__all__ = ["register", "pack_batch", "in_dataloader_worker", "RING_SLOTS", "SLOT_ALIGN"]

RING_SLOTS = 6
"""Slots per worker ring: DataLoader's default prefetch (2 per worker) plus room for the reorder buffer."""

SLOT_ALIGN = 4096
"""Slots and the tensors inside them start on page boundaries (any dtype view is aligned)."""

_TENSOR_ALIGN = 64
_HEADER = SLOT_ALIGN  # slot states (int64 each) at the start of the ring
_FREE, _BUSY = 0, 1

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class _Ring:
    """A worker's shared-memory slots (made in the worker, mapped by the training process)."""

    def __init__(self, slot_nbytes: int, slots: int = RING_SLOTS) -> None:
        self.key = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.slot_nbytes = -(-slot_nbytes // SLOT_ALIGN) * SLOT_ALIGN
        self.slots = slots
        self.tensor = torch.zeros(_HEADER + slots * self.slot_nbytes, dtype=torch.uint8).share_memory_()
        self.sent = False  # the training process has not been handed the tensor yet
        self.next = 0
        self._bind()

    def _bind(self) -> None:
        self.states = self.tensor[: self.slots * 8].view(torch.int64).numpy()

    def slot(self, index: int) -> torch.Tensor:
        start = _HEADER + index * self.slot_nbytes
        return self.tensor[start : start + self.slot_nbytes]

    def take(self) -> int | None:
        """A free slot, marked busy; None when every slot still waits for the training process."""
        for k in range(self.slots):
            index = (self.next + k) % self.slots
            if self.states[index] == _FREE:
                self.states[index] = _BUSY
                self.next = index + 1
                return index
        return None


_worker_ring: _Ring | None = None
_worker_lock = threading.Lock()  # the queue's feeder thread pickles; keep one ring per worker process anyway

_rings: dict[str, tuple[int, torch.Tensor, int, int]] = {}
"""Training process: ring key -> (worker pid, ring tensor, slots, slot bytes)."""


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], int]:
    entries, offset = [], 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        entries.append((key, str(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _TENSOR_ALIGN) * _TENSOR_ALIGN
    return entries, offset


def pack_batch(
    batch: Mapping[str, Any], rebuild: Callable[[dict[str, Any]], Any], in_worker: bool
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The ``__reduce__`` of a batch: through the worker's ring when ``in_worker``, else a plain dict.

    Args:
        batch: ``{key: tensor or picklable}``.
        rebuild: makes the batch object from a dict on arrival (e.g. the Batch class).
        in_worker: pickled by a DataLoader worker for the training process.
    """
    tensors = {k: v for k, v in batch.items()
               if isinstance(v, torch.Tensor) and v.device.type == "cpu" and str(v.dtype) in _DTYPES}
    others = {k: v for k, v in batch.items() if k not in tensors}
    if not in_worker or not tensors:
        return rebuild, (dict(batch),)
    entries, used = _layout(tensors)
    global _worker_ring
    with _worker_lock:
        ring = _worker_ring
        if ring is None or used > ring.slot_nbytes:
            # sized on the first batch, with room for bigger ones (ragged rows vary); a bigger batch makes a new ring
            ring = _worker_ring = _Ring(max(used + used // 2, 1 << 16))
        slot = ring.take()
        if slot is None:
            return rebuild, (dict(batch),)
        area = ring.slot(slot).numpy()
        for key, _dtype, _shape, offset, nbytes in entries:
            # numpy copies in this thread; torch's copy_ would wake its thread pool for a memcpy
            source = tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy()
            area[offset : offset + nbytes] = source
        handle: Any = ring.key
        if not ring.sent:  # the first batch carries the ring itself (torch shares its file descriptor)
            handle = (ring.key, ring.tensor, ring.slots, ring.slot_nbytes)
            ring.sent = True
    return _unpack, (rebuild, handle, slot, used, entries, others, list(batch))


def _attach(handle: Any) -> tuple[torch.Tensor, int, int]:
    if isinstance(handle, tuple):
        key, tensor, slots, slot_nbytes = handle
        pid = int(key.split("-", 1)[0])
        for old, (old_pid, *_rest) in list(_rings.items()):
            if old_pid == pid or not _alive(old_pid):  # that worker made a new ring, or is gone
                del _rings[old]
        _rings[key] = (pid, tensor, slots, slot_nbytes)
        return tensor, slots, slot_nbytes
    _pid, tensor, slots, slot_nbytes = _rings[handle]
    return tensor, slots, slot_nbytes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unpack(
    rebuild: Callable[[dict[str, Any]], Any],
    handle: Any,
    slot: int,
    used: int,
    entries: list[tuple[str, str, tuple[int, ...], int, int]],
    others: dict[str, Any],
    order: list[str],
) -> Any:
    ring, slots, slot_nbytes = _attach(handle)
    start = _HEADER + slot * slot_nbytes
    own = torch.empty(max(used, 1), dtype=torch.uint8)
    # the one copy (numpy: one memcpy in this thread, not torch's thread pool); the slot is free right after
    own.numpy()[:used] = ring[start : start + used].numpy()
    states = ring[: slots * 8].view(torch.int64)
    states[slot] = _FREE
    items: dict[str, Any] = dict(others)
    for key, dtype, shape, offset, nbytes in entries:
        items[key] = own[offset : offset + nbytes].view(_DTYPES[dtype]).view(shape)
    return rebuild({key: items[key] for key in order})


def register(batch_type: type) -> None:
    """Send ``batch_type`` objects (dicts built from a dict) through the rings when workers queue them.

    Registered with multiprocessing's ``ForkingPickler`` only, the pickler of
    DataLoader's queues (as torch does for tensors): ``copy.copy``, ``pickle`` and
    ``torch.save`` of a batch are unchanged.
    """
    ForkingPickler.register(batch_type, lambda batch: pack_batch(batch, batch_type, in_dataloader_worker()))


def in_dataloader_worker() -> bool:
    """Whether this process is a DataLoader worker (its batches go to the training process)."""
    return torch.utils.data.get_worker_info() is not None

