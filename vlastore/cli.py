"""The ``vlastore`` command: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

__all__ = ["main"]

EXAMPLES = """examples:
  vlastore demo                       make ./vlastore-demo.vla, show it, read a batch
  vlastore info STORE [--json]        what a store holds
  vlastore verify STORE               check every checksum; exit 1 on corruption
  vlastore build-features STORE --data-root DATA [--model Qwen/Qwen2.5-VL-3B-Instruct]
                                      compute a VLM feature family (torchrun --nproc_per_node=N -m vlastore ...)
  vlastore ingest robot|pt-cache|vggt SRC --out/--into STORE
                                      one-shot ingestion (see vlastore ingest --help)
"""


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, exit code 2."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import make_demo_store
    from .report import format_info, store_info

    path = Path(args.out)
    if path.exists():
        if not args.force and not (path / "zarr.json").exists():
            raise UserError(f"{path} exists and is not a vlastore store; pick another --out")
        shutil.rmtree(path)
    store = make_demo_store(path)
    print(format_info(store_info(store)))
    fam = "qwen_vl"
    name = store.datasets[0]
    feature = store.feature(fam, name, 0)
    tokens = store.feature("qwen_vl_tokens", name, 0)
    state = store.series("state", name, 0, 3)
    print(f"\nread back: {fam}[({name!r}, vlm_idx=0)] -> {tuple(feature.shape)} {feature.dtype}, "
          f"first values {feature[:4].float().tolist()}")
    print(f"           qwen_vl_tokens[({name!r}, vlm_idx=0)] -> {tuple(tokens.shape)} {tokens.dtype}")
    print(f"           state[{name!r}, steps 0:3] -> {state.shape} {state.dtype}")
    print(f"\nnext: vlastore info {path}   |   vlastore verify {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .report import format_info, store_info
    from .store import VLAStore

    info = store_info(VLAStore.open(args.store))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .report import total_shards, verify_store
    from .store import VLAStore

    store = VLAStore.open(args.store)
    with tqdm(total=total_shards(store), unit="shard", desc="verify", disable=args.quiet or None) as bar:
        report = verify_store(store, progress=bar.update)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for family, (present, rows) in report.coverage.items():
            print(f"{family}: {present:,}/{rows:,} rows present")
        print(f"checked {report.chunks_checked:,} chunks")
        for c in report.corrupt:
            print(f"CORRUPT {c}")
        print("OK: no corruption found" if report.ok else f"FAILED: {len(report.corrupt)} corrupt item(s)")
    return 0 if report.ok else 1


def _cmd_build_features(args: argparse.Namespace) -> int:
    from .features.command import extractor_options, run_build_features

    try:
        options = extractor_options(args.extractor, model=args.model, adapter=args.adapter, pooling=args.pooling,
                                    layer=args.layer, dtype=args.dtype, device=args.device, extra=args.option)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stats = run_build_features(
        args.store, args.data_root, extractor=args.extractor, options=options, family=args.family,
        vlm_reuse_count=args.vlm_reuse_count, batch_size=args.batch_size, image_pattern=args.image_pattern,
        cameras=args.cameras.split(",") if args.cameras else None, instruction_file=args.instruction_file,
        instruction=args.instruction, rows_per_shard=args.rows_per_shard, compression=args.compression,
        rebuild=args.rebuild, keep_previous=None if args.keep_all else args.keep_previous,
        progress=not args.quiet, stats_json=args.stats_json,
    )
    if not args.quiet:
        print(stats.summary(), file=sys.stderr)
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest.commands import run_ingest

    return run_ingest(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlastore",
        description="Robot episodes and precomputed VLA features in one chunked, checksummed Zarr v3 store.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vlastore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="make a small synthetic store, show its info and read a batch back")
    p.add_argument("--out", default="vlastore-demo.vla", help="where to write the demo store (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a vlastore store")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="episodes, steps, families, coverage, bytes and files of a store")
    p.add_argument("store", help="path (or URL) of the store")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("verify", help="read every stored byte and check its crc32c; exit 1 on corruption")
    p.add_argument("store", help="path (or URL) of the store")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "build-features",
        help="compute a feature family with a vision-language model (one process per GPU under torchrun)",
        description="Compute one feature row per (dataset, vlm_idx) from the images at step vlm_idx * "
        "vlm_reuse_count and the episode's instruction. Run as one process (CPU or one GPU) or under "
        "`torchrun --nproc_per_node=N -m vlastore build-features ...`: every rank writes its own shards. "
        "Resumable: run it again after a crash. See docs/features.md.",
    )
    p.add_argument("store", help="path of the store (its catalog names the episodes)")
    p.add_argument("--data-root", required=True,
                   help="folder with one sub-folder per episode (images, instruction)")
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct",
                   help="hub id or local folder (default: %(default)s)")
    p.add_argument("--adapter", help="PEFT/LoRA adapter folder applied to --model (needs peft)")
    p.add_argument("--extractor", default="transformers-vl",
                   help="registered extractor id or module:function (default: %(default)s)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="extra extractor option (repeatable)")
    p.add_argument("--family", default="qwen_vl", help="feature family to write (default: %(default)s)")
    p.add_argument("--pooling", choices=["mean", "last", "all"], default="mean",
                   help="mean over tokens, last token, or all tokens as variable-length rows (default: %(default)s)")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer; -1 = last (default: %(default)s)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="stored dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--vlm-reuse-count", type=int, default=3, help="steps served by one row (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="items per forward; halved on out-of-memory (default: %(default)s)")
    p.add_argument("--image-pattern", default="{camera}/{step:06d}.png",
                   help="image path inside an episode folder (default: %(default)s)")
    p.add_argument("--cameras", help="comma-separated camera folders, in model order (default: all, sorted)")
    p.add_argument("--instruction-file", default="instruction.txt",
                   help="per-episode instruction file, .txt or .json (default: %(default)s)")
    p.add_argument("--instruction", help="one instruction for every episode (instead of the file)")
    p.add_argument("--rows-per-shard", type=int, default=0,
                   help="rows per shard file for a new family (default: auto)")
    p.add_argument("--compression", choices=["zstd"],
                   help="compress a new family's shards (default: raw, memory-mapped)")
    p.add_argument("--rebuild", action="store_true",
                   help="write a new generation with the current weights, then switch readers to it")
    p.add_argument("--keep-previous", type=int, default=1,
                   help="replaced generations kept after --rebuild (default: %(default)s)")
    p.add_argument("--keep-all", action="store_true", help="keep every old generation after --rebuild")
    p.add_argument("--stats-json", help="write this rank's timing stats here ({rank} is replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_build_features)
    from .ingest.commands import add_ingest_parser

    add_ingest_parser(sub).set_defaults(func=_cmd_ingest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .features.registry import ExtractorError
    from .format import FormatError
    from .ingest.report import IngestError
    from .reader import MissingRowError
    from .shardcodec import ChecksumError
    from .storage import StoreNotFoundError
    from .writer import OwnershipError

    args = build_parser().parse_args(argv)
    user_errors = (UserError, FormatError, StoreNotFoundError, FileExistsError, FileNotFoundError,
                   PermissionError, KeyError, IndexError, MissingRowError, OwnershipError, ChecksumError,
                   ExtractorError)
    try:
        return int(args.func(args))
    except IngestError as exc:
        print(f"vlastore {args.command}: error: {exc}", file=sys.stderr)
        for problem in exc.problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        if len(exc.problems) > 20:
            print(f"  ... {len(exc.problems) - 20} more", file=sys.stderr)
        return 1
    except user_errors as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vlastore {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlastore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
