"""The few torch.distributed calls the feature builder makes; all no-ops in one process."""

from __future__ import annotations

from typing import Any

from ..ranks import rank_world

__all__ = ["rank_world", "barrier", "broadcast_object", "all_gather_objects", "all_sum", "init_from_env", "shutdown"]


def _initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_sum(value: int) -> int:
    return sum(all_gather_objects(int(value)))


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) if not done yet.

    Uses NCCL when CUDA is available, else gloo. Returns True when this call
    created the group (the caller then destroys it with :func:`shutdown`).
    """
    import os

    if _initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
