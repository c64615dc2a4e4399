"""What ``vlastore build-features`` does, as one library call (the CLI only parses arguments)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .build import BuildStats, build_features
from .dist import init_from_env, rank_world, shutdown
from .rebuild import rebuild_features
from .registry import ExtractorError, get_extractor
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
        given = {
            "model": model,
            "adapter": adapter,
            "pooling": pooling,
            "layer": layer,
            "dtype": dtype,
            "device": device,
        }
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
    data_root: str | os.PathLike[str] | None,
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
    lerobot_root: str | os.PathLike[str] | None = None,
    lerobot_name_pattern: str | None = None,
    repair: bool = False,
) -> BuildStats:
    """Build (or, with ``rebuild``, rebuild as a new generation) one feature family.

    Joins the ``torchrun`` process group when started under it. ``options`` are
    extra keyword arguments for the extractor (``pooling``, ``layer``, ``dtype``,
    ``device``, ...); ``model``/``adapter`` are passed when given. Images come from
    ``data_root`` (a :class:`DataFolder`) or, with ``lerobot_root``, from the videos of
    a LeRobot dataset (:class:`~vlastore.features.video.LeRobotVideoSource`, ``cameras``
    are its video keys).
    """
    created_group = init_from_env()
    try:
        kwargs = dict(options or {})
        source: DataFolder
        if lerobot_root is not None:
            from .video import LeRobotVideoSource

            source = LeRobotVideoSource(
                lerobot_root, cameras=cameras, instruction=instruction, name_pattern=lerobot_name_pattern
            )
        elif data_root is not None:
            source = DataFolder(
                Path(data_root),
                image_pattern=image_pattern,
                cameras=tuple(cameras) if cameras else None,
                instruction_file=instruction_file,
                instruction=instruction,
            )
        else:
            raise ExtractorError("give the images: --data-root DATA or --lerobot-root ROOT")
        made = get_extractor(extractor, **kwargs)
        if rebuild:
            result = rebuild_features(
                store, family, made, source, batch_size=batch_size, keep_previous=keep_previous, progress=progress
            )
            stats = result.stats
        else:
            stats = build_features(
                store,
                made,
                source,
                family=family,
                vlm_reuse_count=vlm_reuse_count,
                batch_size=batch_size,
                rows_per_shard=rows_per_shard,
                compression=compression,
                progress=progress,
                repair=repair,
            )
        rank, _ = rank_world()
        logging.getLogger(__name__).info(stats.summary())
        if stats_json:
            path = stats_json.replace("{rank}", str(rank))
            with open(path, "w") as f:
                json.dump(
                    {
                        **{k: v for k, v in vars(stats).items()},
                        "outside_forward_fraction": stats.outside_forward_fraction,
                    },
                    f,
                    indent=2,
                )
        return stats
    finally:
        if created_group:
            shutdown()


def _count(minimum: int) -> Any:
    """argparse type: an integer >= ``minimum`` (a usage mistake exits 2 naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _cmd_build_features(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..store import probe

    probe(args.store)  # a wrong store path is a usage mistake found before any model is loaded
    if args.data_root is None and args.lerobot_root is None:
        raise UserError("give the images: --data-root DATA (one sub-folder per episode) or --lerobot-root ROOT")
    for option, folder in (("--data-root", args.data_root), ("--lerobot-root", args.lerobot_root)):
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{option} {folder}: no such folder")
    if args.repair and args.rebuild:
        raise UserError(
            "--repair rewrites corrupt rows of the current generation; --rebuild writes a new one "
            "from scratch: use one of them"
        )
    try:
        options = extractor_options(
            args.extractor,
            model=args.model,
            adapter=args.adapter,
            pooling=args.pooling,
            layer=args.layer,
            dtype=args.dtype,
            device=args.device,
            extra=args.option,
        )
    except ValueError as exc:
        raise ExtractorError(str(exc)) from None
    stats = run_build_features(
        args.store,
        args.data_root,
        extractor=args.extractor,
        options=options,
        family=args.family,
        vlm_reuse_count=args.vlm_reuse_count,
        batch_size=args.batch_size,
        image_pattern=args.image_pattern,
        cameras=args.cameras.split(",") if args.cameras else None,
        instruction_file=args.instruction_file,
        instruction=args.instruction,
        rows_per_shard=args.rows_per_shard,
        compression=args.compression,
        rebuild=args.rebuild,
        keep_previous=None if args.keep_all else args.keep_previous,
        progress=not args.quiet,
        stats_json=args.stats_json,
        lerobot_root=args.lerobot_root,
        lerobot_name_pattern=args.name_pattern,
        repair=args.repair,
    )
    if not args.quiet:
        print(stats.summary(), file=sys.stderr)
    return 0


def add_build_features_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``build-features`` to the ``vlastore`` parser."""
    p = sub.add_parser(
        "build-features",
        help="compute a feature family with a vision-language model (one process per GPU under torchrun)",
        description="Compute one feature row per (dataset, vlm_idx) from the images at step vlm_idx * "
        "vlm_reuse_count and the episode's instruction. Run as one process (CPU or one GPU) or under "
        "`torchrun --nproc_per_node=N -m vlastore build-features ...`: every rank writes its own shards. "
        "Resumable: run it again after a crash. See docs/features.md.",
    )
    p.add_argument("store", help="path of the store (its catalog names the episodes)")
    images = p.add_mutually_exclusive_group(required=True)
    images.add_argument("--data-root", help="folder with one sub-folder per episode (images, instruction)")
    images.add_argument(
        "--lerobot-root",
        metavar="ROOT",
        help="a LeRobot v3.0 dataset (the one `vlastore ingest lerobot` read): frames from its "
        "videos, decoded with PyAV (pip install 'vlastore[video]'), the task of each step as "
        "instruction; --cameras picks video keys",
    )
    p.add_argument(
        "--name-pattern",
        default=None,
        metavar="PATTERN",
        help="with --lerobot-root: the --name-pattern `ingest lerobot` used (default: episode_{episode_index:06d})",
    )
    p.add_argument(
        "--model", default="Qwen/Qwen2.5-VL-3B-Instruct", help="hub id or local folder (default: %(default)s)"
    )
    p.add_argument("--adapter", help="PEFT/LoRA adapter folder applied to --model (needs peft)")
    p.add_argument(
        "--extractor",
        default="transformers-vl",
        help="registered extractor id or module:function (default: %(default)s)",
    )
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="extra extractor option (repeatable)")
    p.add_argument("--family", default="qwen_vl", help="feature family to write (default: %(default)s)")
    p.add_argument(
        "--pooling",
        choices=["mean", "last", "all"],
        default="mean",
        help="mean over tokens, last token, or all tokens as variable-length rows (default: %(default)s)",
    )
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer; -1 = last (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="stored dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument(
        "--vlm-reuse-count", type=_count(1), default=3, help="steps served by one row (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=_count(1),
        default=8,
        help="items per forward; halved on out-of-memory (default: %(default)s)",
    )
    p.add_argument(
        "--image-pattern",
        default="{camera}/{step:06d}.png",
        help="image path inside an episode folder (default: %(default)s)",
    )
    p.add_argument(
        "--cameras",
        help="comma-separated camera folders (or LeRobot video keys), in model order "
        "(default: all, sorted; LeRobot: info.json's order)",
    )
    p.add_argument(
        "--instruction-file",
        default="instruction.txt",
        help="per-episode instruction file, .txt or .json (default: %(default)s)",
    )
    p.add_argument("--instruction", help="one instruction for every episode (instead of the file)")
    p.add_argument(
        "--rows-per-shard", type=_count(0), default=0, help="rows per shard file for a new family (default: auto)"
    )
    p.add_argument(
        "--compression", choices=["zstd"], help="compress a new family's shards (default: raw, memory-mapped)"
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="write a new generation with the current weights, then switch readers to it",
    )
    p.add_argument(
        "--keep-previous",
        type=_count(0),
        default=1,
        help="replaced generations kept after --rebuild (default: %(default)s)",
    )
    p.add_argument("--keep-all", action="store_true", help="keep every old generation after --rebuild")
    p.add_argument(
        "--repair",
        action="store_true",
        help="also recompute rows whose bytes fail their checksum (reads every shard first); missing "
        "rows are always computed on a rerun",
    )
    p.add_argument("--stats-json", help="write this rank's timing stats here ({rank} is replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_build_features)
    return p
