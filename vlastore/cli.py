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
    from .demo import demo_batch, describe_batch, make_demo_store
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
    dataset, batch = demo_batch(store)
    print(f"\ntraining batch: {dataset!r}\n  DataLoader(batch_size=4, collate_fn=vlastore.dataset.collate) ->")
    print("\n".join(f"    {line}" for line in describe_batch(batch)))
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

    from .features.command import add_build_features_parser

    add_build_features_parser(sub)
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
