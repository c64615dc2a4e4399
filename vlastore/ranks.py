"""This process's rank and the world size: torch.distributed's when a process group is up, else 0 of 1."""

from __future__ import annotations

import sys

__all__ = ["rank_world", "resolve_rank"]


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one.

    A process that never imported ``torch.distributed`` has no process group, so it is not imported here
    (importing it costs about a second).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size`` where given, else the process group's; checked.

    Raises:
        ValueError: not ``0 <= rank < world_size``.
    """
    if rank is None or world_size is None:
        dist_rank, dist_world = rank_world()
        rank = dist_rank if rank is None else rank
        world_size = dist_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return int(rank), int(world_size)
