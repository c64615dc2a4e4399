"""Batches from DataLoader workers to the training process through shared memory.

A DataLoader worker pickles every batch into its result queue. For a batch of a
few hundred KB that costs more than making it: torch moves each tensor into a
shared-memory segment of its own (a new segment, file descriptor and map per
tensor per batch), and pickling the bytes through the worker's pipe instead
costs a pickle, a pipe transfer and an unpickle (measured on 2 cores, 300 KB:
~330 us to pickle, ~290 us to unpickle, and the pipe on top).

Here each worker process owns a *ring*: slots in one shared-memory tensor, made
once and handed to the training process once (torch passes its file
descriptor). A batch is copied into a free slot and only a small descriptor
(slot, and per tensor its key, dtype, shape and offset) is pickled. The training
process makes the batch's tensors as views of the slot, without a copy: the
slot is *leased* to the batch and marked free again when the last of its
tensors is freed (a weak reference to the slot's buffer, which every tensor
keeps alive). A training loop holds a batch or two, so the ring keeps its
size; one that keeps every batch makes the ring grow, then its batches go the
ordinary way (below). For a loader that pins memory the slot is copied into
page-locked memory instead (the one copy a pin would make) and freed at once.

Ordering. Slot states live in the ring's header. The worker marks a slot busy,
fills it and sends the descriptor; the pipe (a kernel round trip, a lock on each
side) orders the worker's writes before the training process's copy. The
training process marks the slot free only when the batch's tensors are gone (or
its copy is done), behind a full memory barrier (a lock released and taken
again: a release followed by an acquire), so that on weakly ordered CPUs
(aarch64) the worker cannot see the slot free while the training process still
reads it; x86 never reorders a store before earlier loads.
The worker reuses a slot only after reading it free.

A worker whose slots are all waiting (a loader that prefetches more batches
than the ring has slots, or a loop that keeps batches) makes a ring with twice the slots, up to
:data:`MAX_RING_SLOTS`; a batch bigger than a slot makes a ring with bigger
slots; a batch over :data:`MAX_SLOT_BYTES`, or one arriving when the ring cannot
grow, goes the ordinary way. Nothing ever waits on the ring.
"""

from __future__ import annotations

import ctypes
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

__all__ = [
    "register",
    "pack_batch",
    "in_dataloader_worker",
    "unpack_pinned",
    "RING_SLOTS",
    "MAX_RING_SLOTS",
    "MAX_SLOT_BYTES",
    "SLOT_ALIGN",
]

RING_SLOTS = 2
"""Slots of a worker's first ring: DataLoader's default prefetch (2 per worker); it doubles when that is short.

Shared memory is scarce in containers (Docker's default /dev/shm is 64 MB), so a ring
holds only what is in flight: a loader prefetching 4 batches per worker ends with 4 or 8 slots."""

MAX_RING_SLOTS = 64
"""A ring grows (doubling its slots) up to this many when every slot waits for the training process."""

MAX_SLOT_BYTES = 64 << 20
"""Batches bigger than this leave the worker the ordinary way (their copy dwarfs torch's per-tensor cost)."""

SLOT_ALIGN = 4096
"""Slots start on page boundaries."""

_TENSOR_ALIGN = 64  # tensors inside a slot start on cache lines (any dtype view is aligned)
_HEADER = SLOT_ALIGN  # slot states (int64 each) at the start of the ring: up to 512 slots
_FREE, _BUSY = 0, 1

_NUMPY_OF = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}
_NUMPY = {str(d): np.dtype(n) for d, n in _NUMPY_OF.items()}
_TORCH_NAME = {np.dtype(n).char: str(d) for d, n in _NUMPY_OF.items() if d != torch.bfloat16}

Entry = tuple[str, str, tuple[int, ...], int, int]
"""One tensor in a slot: ``(key, dtype, shape, offset, nbytes)``."""


class _Ring:
    """A worker's shared-memory slots (made in the worker, mapped by the training process)."""

    def __init__(self, slot_nbytes: int, slots: int) -> None:
        assert slots * 8 <= _HEADER
        self.key = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.slot_nbytes = -(-slot_nbytes // SLOT_ALIGN) * SLOT_ALIGN
        self.slots = slots
        self.tensor = torch.zeros(_HEADER + slots * self.slot_nbytes, dtype=torch.uint8).share_memory_()
        self.states = self.tensor[: slots * 8].view(torch.int64).numpy()
        self.bytes = self.tensor.numpy()
        self.sent = False  # the training process has not been handed the tensor yet
        self.layouts: dict[tuple[Any, ...], _Layout] = {}  # batch layouts sent so far, by signature

    def take(self) -> int | None:
        """The lowest free slot, marked busy; None when every slot still waits for the training process.

        Lowest first, not round robin: the slot freed last is likely still in the CPU caches
        (a round robin over a ring of 8 slots of 300 KB walks 2.4 MB of cold memory).
        """
        states = self.states
        for index in range(self.slots):
            if states[index] == _FREE:
                states[index] = _BUSY
                return index
        return None


_worker_ring: _Ring | None = None
_worker_lock = threading.Lock()  # the result queue's feeder thread pickles; any thread may


class _Attached:
    """The training process's view of a worker's ring."""

    def __init__(self, pid: int, tensor: torch.Tensor, slots: int, slot_nbytes: int) -> None:
        self.pid = pid
        self.tensor = tensor  # keeps the mapping alive
        self.bytes = tensor.numpy()
        self.states = self.bytes[: slots * 8].view(np.int64)
        self.slot_nbytes = slot_nbytes
        self.layouts: dict[int, tuple[list[tuple[str, np.dtype, tuple[int, ...], int, bool]], int]] = {}
        # slot -> a weak reference to the buffer its batch's tensors hold (ctypes: numpy keeps a ctypes
        # exporter as the arrays' base, where it would see through a memoryview to the ring itself)
        self.leases: list[weakref.ref[Any] | None] = [None] * slots
        self.release = [self._releaser(slot) for slot in range(slots)]

    def _releaser(self, slot: int) -> Callable[[Any], None]:
        # (the fence is bound now: a batch freed at interpreter exit may outlive this module's globals)
        def release(_gone: Any, fence: Callable[[], None] = _fence) -> None:
            self.leases[slot] = None  # the last tensor of the slot's batch is gone: the worker may reuse it
            fence()
            self.states[slot] = 0  # _FREE

        return release

    def lease(self, slot: int, used: int) -> Any:
        """The slot's bytes as a buffer whose end frees the slot (every tensor made on it keeps it alive)."""
        buffer = (ctypes.c_char * max(used, 1)).from_buffer(self.bytes.data, _HEADER + slot * self.slot_nbytes)
        self.leases[slot] = weakref.ref(buffer, self.release[slot])
        return buffer


_rings: dict[str, _Attached] = {}
"""Training process: ring key -> the ring (one per live worker; a worker's new ring replaces its old one)."""
_rings_lock = threading.Lock()  # pin-memory threads of several loaders may unpack at once

_local = threading.local()


def _fence() -> None:
    """A full memory barrier: a lock of this thread released, then taken again."""
    lock = getattr(_local, "fence", None)
    if lock is None:
        lock = _local.fence = threading.Lock()
        lock.acquire()
    lock.release()
    lock.acquire()


def _align(nbytes: int) -> int:
    return -(-nbytes // _TENSOR_ALIGN) * _TENSOR_ALIGN


def _ring_for(used: int) -> _Ring:
    """The worker's ring, made (or made anew, bigger) so that a batch of ``used`` bytes fits a slot."""
    global _worker_ring
    ring = _worker_ring
    if ring is None or used > ring.slot_nbytes:
        # sized on the first batch with room for somewhat bigger ones (ragged rows vary); bigger: a new ring
        slots = RING_SLOTS if ring is None else ring.slots
        ring = _worker_ring = _Ring(max(used + used // 4, 1 << 16), slots)
    return ring


Signature = tuple[tuple[str, str, str, tuple[int, ...]], ...]
"""Per tensor of a batch: key, torch dtype, numpy dtype char, shape."""


def _sources(batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Signature]:
    """The arrays to copy (numpy ones where the batch knows them) and their signature: key, dtypes, shape."""
    known = batch.transport_arrays() if hasattr(batch, "transport_arrays") else {}
    arrays: dict[str, np.ndarray] = {}
    signature = []
    for key, value in batch.items():
        hint = known.get(key)
        if hint is not None:
            array, is_bf16 = hint
            dtype = "torch.bfloat16" if is_bf16 else _TORCH_NAME.get(array.dtype.char, "")
            if not dtype:
                continue
        elif (
            type(value) is torch.Tensor
            and value.device.type == "cpu"
            and value.dtype in _NUMPY_OF
            and not value.requires_grad
        ):
            dtype = str(value.dtype)
            tensor = value.contiguous()
            array = (tensor.view(torch.int16) if value.dtype == torch.bfloat16 else tensor).numpy()
        else:
            continue
        arrays[key] = array
        signature.append((key, dtype, array.dtype.char, array.shape))
    return arrays, tuple(signature)


class _Layout:
    """Where a batch of one signature sits in a slot: the entries sent once, the slot views made once."""

    def __init__(self, number: int, signature: Signature) -> None:
        self.number = number
        self.entries: list[Entry] = []
        offset = 0
        for key, dtype, char, shape in signature:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(char).itemsize
            self.entries.append((key, dtype, shape, offset, nbytes))
            offset += _align(nbytes)
        self.used = offset
        self.chars = [char for _key, _dtype, char, _shape in signature]
        self.views: dict[int, list[tuple[str, np.ndarray]]] = {}  # slot -> (key, destination) in that slot

    def destinations(self, ring: _Ring, slot: int) -> list[tuple[str, np.ndarray]]:
        views = self.views.get(slot)
        if views is None:
            area = ring.bytes[_HEADER + slot * ring.slot_nbytes :]
            views = self.views[slot] = [
                (key, np.ndarray(shape, char, area, offset))
                for (key, _dtype, shape, offset, _n), char in zip(self.entries, self.chars)
            ]
        return views


def pack_batch(
    batch: Mapping[str, Any], rebuild: Callable[[dict[str, Any]], Any], in_worker: bool
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The ``__reduce__`` of a batch: through the worker's ring when ``in_worker``, else a plain dict.

    Args:
        batch: ``{key: tensor or picklable}``; one with a ``transport_arrays()``
            method (``{key: (numpy array, bfloat16?)}`` of tensors it made from
            numpy) saves torch's per-tensor attribute calls.
        rebuild: makes the batch object from a dict on arrival (e.g. the Batch class).
        in_worker: pickled by a DataLoader worker for the training process.
    """
    if not in_worker:
        return rebuild, (dict(batch),)
    arrays, signature = _sources(batch)
    if not arrays:
        return rebuild, (dict(batch),)
    with _worker_lock:
        ring = _worker_ring
        layout = ring.layouts.get(signature) if ring is not None else None
        if layout is None or ring is None:  # (ring None means layout None; said for the type checker)
            used = _Layout(0, signature).used
            if used > MAX_SLOT_BYTES:
                return rebuild, (dict(batch),)
            ring = _ring_for(used)
            layout = ring.layouts.get(signature)
        slot = ring.take()
        if slot is None and ring.slots < MAX_RING_SLOTS:
            # every slot waits for the training process (a deep prefetch): twice the slots from now on;
            # the old ring's slots in flight are still read and freed there, then it goes away
            ring = _grow(ring)
            layout = None
            slot = ring.take()
        if slot is None:
            return rebuild, (dict(batch),)
        described: Any
        if layout is None:  # the first batch of this layout in this ring carries it; later ones its number
            layout = ring.layouts[signature] = _Layout(len(ring.layouts), signature)
            described = (layout.number, layout.entries, layout.used)
        else:
            described = layout.number
        for key, destination in layout.destinations(ring, slot):
            np.copyto(destination, arrays[key], casting="no")  # numpy copies in this thread (torch: thread pool)
        handle: Any = ring.key
        if not ring.sent:  # the first batch carries the ring itself (torch shares its file descriptor)
            handle = (ring.key, ring.tensor, ring.slots, ring.slot_nbytes)
            ring.sent = True
    others = {k: v for k, v in batch.items() if k not in arrays}
    return _unpack, (rebuild, handle, slot, described, others, list(batch))


def _grow(ring: _Ring) -> _Ring:
    global _worker_ring
    _worker_ring = _Ring(ring.slot_nbytes, ring.slots * 2)
    return _worker_ring


def _attach(handle: Any) -> _Attached:
    with _rings_lock:
        if isinstance(handle, str):
            return _rings[handle]
        key, tensor, slots, slot_nbytes = handle
        pid = int(key.split("-", 1)[0])
        for old in [k for k, ring in _rings.items() if ring.pid == pid or not _alive(ring.pid)]:
            del _rings[old]  # that worker made a new ring, or is gone (batches still on its slots keep them mapped)
        ring = _rings[key] = _Attached(pid, tensor, slots, slot_nbytes)
        return ring


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
    layout: Any,
    others: dict[str, Any],
    order: list[str],
) -> Any:
    ring = _attach(handle)
    if isinstance(layout, tuple):
        number, entries, used = layout
        layout = ring.layouts[number] = (
            [
                (key, _NUMPY[dtype], shape, offset, dtype == "torch.bfloat16")
                for key, dtype, shape, offset, _nbytes in entries
            ],
            used,
        )
    else:
        layout = ring.layouts[layout]
    views, used = layout
    own: Any
    if getattr(_local, "pinned", False):  # straight into page-locked memory: pin_memory() then copies nothing
        start = _HEADER + slot * ring.slot_nbytes
        own = torch.empty(max(used, 1), dtype=torch.uint8, pin_memory=True).numpy()
        np.copyto(own[:used], ring.bytes[start : start + used])  # the one copy (numpy's, in this thread)
        _fence()
        ring.states[slot] = _FREE
    else:  # no copy: the batch's tensors are views of the slot, freed with the last of them
        own = ring.lease(slot, used)
    items: dict[str, Any] = dict(others)
    from_numpy = torch.from_numpy
    for key, dtype, shape, offset, is_bf16 in views:
        tensor = from_numpy(np.ndarray(shape, dtype, own, offset))
        items[key] = tensor.view(torch.bfloat16) if is_bf16 else tensor
    return rebuild({key: items[key] for key in order})


def unpack_pinned(enabled: bool) -> None:
    """Batches unpacked by this thread from now on land in page-locked (pinned) memory, or not.

    For a loader that pins batches anyway: the slot's one copy then goes straight
    to pinned memory and ``pin_memory()`` finds nothing left to do.
    """
    _local.pinned = bool(enabled)


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
