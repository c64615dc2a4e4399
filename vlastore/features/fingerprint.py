"""Weight fingerprints: which exact weights (and adapter) produced a generation of features.

A fingerprint is a BLAKE2b hash over every tensor of a ``state_dict``: its name,
dtype, shape and raw bytes, in sorted name order. It does not depend on the
device, on how the model was loaded, or on how many ranks computed it. Adapter
tensors (PEFT/LoRA: names containing ``lora_``) are hashed separately too, so
the manifest tells "same base, new adapter" apart from "new base".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["tensor_digest", "state_dict_fingerprint", "model_fingerprint", "Fingerprint", "ADAPTER_MARKERS"]

ADAPTER_MARKERS = ("lora_", "modules_to_save")
"""Tensor-name parts that mark adapter (PEFT) weights."""

CHUNK_BYTES = 64 * 1024 * 1024
DIGEST_SIZE = 16


def tensor_digest(tensor: Any, chunk_bytes: int = CHUNK_BYTES) -> bytes:
    """BLAKE2b of one tensor's dtype, shape and bytes (GPU tensors are copied in chunks)."""
    import torch

    t = tensor.detach()
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(f"{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return h.digest()
    raw = flat.view(torch.uint8) if flat.element_size() > 0 else flat
    if raw.device.type == "cpu":
        h.update(raw.numpy().data)
        return h.digest()
    buffer = torch.empty(min(chunk_bytes, raw.numel()), dtype=torch.uint8, pin_memory=True)
    for start in range(0, raw.numel(), chunk_bytes):
        part = raw[start : start + chunk_bytes]
        buffer[: part.numel()].copy_(part)
        h.update(buffer[: part.numel()].numpy().data)
    return h.digest()


class Fingerprint(str):
    """A fingerprint string ``blake2b:<hex>`` with the base and adapter parts kept apart."""

    base: str
    adapter: str

    def __new__(cls, value: str, base: str = "", adapter: str = "") -> Fingerprint:
        obj = super().__new__(cls, value)
        obj.base = base
        obj.adapter = adapter
        return obj


def _is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def state_dict_fingerprint(
    state: Mapping[str, Any] | Iterable[tuple[str, Any]],
    rank: int = 0,
    world_size: int = 1,
    group: Any = None,
    threads: int | None = None,
) -> Fingerprint:
    """Fingerprint of a state dict.

    With ``world_size > 1`` (call it on every rank of an initialised process
    group) each rank hashes every ``world_size``-th tensor and the digests are
    gathered: the result is identical to the single-process one, in a
    ``1/world_size`` of the time. Within a rank, ``threads`` (default: one per
    core, at most 8) hash tensors in parallel.
    """
    items = sorted(dict(state).items())
    mine = [(name, tensor) for i, (name, tensor) in enumerate(items) if i % world_size == rank]
    # hashlib releases the GIL on big buffers: CPU tensors hash in parallel threads
    workers = max(1, min(threads or min(8, os.cpu_count() or 1), len(mine)))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = dict(zip([n for n, _ in mine], pool.map(lambda nt: tensor_digest(nt[1]), mine), strict=True))
    else:
        digests = {name: tensor_digest(tensor) for name, tensor in mine}
    if world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, digests, group=group)
        for part in gathered:
            digests.update(part)
    base = hashlib.blake2b(digest_size=DIGEST_SIZE)
    adapter = hashlib.blake2b(digest_size=DIGEST_SIZE)
    n_adapter = 0
    for name, _tensor in items:
        target = adapter if _is_adapter(name) else base
        n_adapter += target is adapter
        target.update(name.encode() + b"\0" + digests[name])
    base_hex = base.hexdigest()
    adapter_hex = adapter.hexdigest() if n_adapter else ""
    whole = hashlib.blake2b(f"{base_hex}+{adapter_hex}".encode(), digest_size=DIGEST_SIZE).hexdigest()
    return Fingerprint(
        f"blake2b:{whole}", base=f"blake2b:{base_hex}", adapter=f"blake2b:{adapter_hex}" if adapter_hex else ""
    )


def model_fingerprint(model: Any, rank: int | None = None, world_size: int | None = None) -> Fingerprint:
    """Fingerprint of a torch module's ``state_dict`` (base weights plus any LoRA adapter).

    Under an initialised ``torch.distributed`` group the work is split over the
    ranks (all ranks must call it); pass ``rank=0, world_size=1`` to hash alone.
    """
    if rank is None or world_size is None:
        from .dist import rank_world

        rank, world_size = rank_world()
    return state_dict_fingerprint(model.state_dict(), rank=rank, world_size=world_size)
