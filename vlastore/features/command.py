"""What ``vlastore build-features`` does, as one library call (the CLI only parses arguments)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .build import BuildStats, build_features
from .dist import init_from_env, rank_world, shutdown
from .rebuild import rebuild_features
from .registry import get_extractor
from .source import DataFolder

__all__ = ["run_build_features", "extractor_options"]

BUILTIN_VL = ("transformers-vl", "qwen-vl")


def extractor_options(
    extractor: str,
    model: str | None = None,
    adapter: str | None = None,
    pooling: str | None = None,
    layer: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for :func:`get_extractor` from command-line values.

    ``model``/``adapter``/``pooling``/``layer``/``dtype``/``device`` go to the
    built-in transformers extractor; ``extra`` holds ``KEY=VALUE`` strings for
    any extractor (VALUE parsed as JSON when it can be).

    Raises:
        ValueError: an ``extra`` item without ``=``.
    """
    options: dict[str, Any] = {}
    if extractor in BUILTIN_VL:
        given = {"model": model, "adapter": adapter, "pooling": pooling, "layer": layer, "dtype": dtype,
                 "device": device}
        options.update({k: v for k, v in given.items() if v is not None})
    for pair in extra or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: write KEY=VALUE (VALUE is parsed as JSON when it can be)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_build_features(
    store: str | os.PathLike[str],
    data_root: str | os.PathLike[str],
    extractor: str = "transformers-vl",
    options: dict[str, Any] | None = None,
    family: str = "qwen_vl",
    vlm_reuse_count: int = 3,
    batch_size: int = 8,
    image_pattern: str = "{camera}/{step:06d}.png",
    cameras: list[str] | None = None,
    instruction_file: str = "instruction.txt",
    instruction: str | None = None,
    rows_per_shard: int = 0,
    compression: str | None = None,
    rebuild: bool = False,
    keep_previous: int | None = 1,
    progress: bool = True,
    stats_json: str | None = None,
) -> BuildStats:
    """Build (or, with ``rebuild``, rebuild as a new generation) one feature family.

    Joins the ``torchrun`` process group when started under it. ``options`` are
    extra keyword arguments for the extractor (``pooling``, ``layer``, ``dtype``,
    ``device``, ...); ``model``/``adapter`` are passed when given.
    """
    created_group = init_from_env()
    try:
        kwargs = dict(options or {})
        source = DataFolder(Path(data_root), image_pattern=image_pattern, cameras=tuple(cameras) if cameras else None,
                            instruction_file=instruction_file, instruction=instruction)
        made = get_extractor(extractor, **kwargs)
        if rebuild:
            result = rebuild_features(store, family, made, source, batch_size=batch_size,
                                      keep_previous=keep_previous, progress=progress)
            stats = result.stats
        else:
            stats = build_features(store, made, source, family=family, vlm_reuse_count=vlm_reuse_count,
                                   batch_size=batch_size, rows_per_shard=rows_per_shard, compression=compression,
                                   progress=progress)
        rank, _ = rank_world()
        logging.getLogger(__name__).info(stats.summary())
        if stats_json:
            path = stats_json.replace("{rank}", str(rank))
            with open(path, "w") as f:
                json.dump({**{k: v for k, v in vars(stats).items()},
                           "outside_forward_fraction": stats.outside_forward_fraction}, f, indent=2)
        return stats
    finally:
        if created_group:
            shutdown()
