"""The ``vlastore`` command: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .errors import DataError, UserError

if TYPE_CHECKING:
    from .store import VLAStore

__all__ = ["main", "UserError", "DataError"]

EXAMPLES = """examples:
  vlastore demo                       make ./vlastore-demo.vla, show it, read a batch
  vlastore info STORE [--json]        what a store holds
  vlastore verify STORE               check every checksum; exit 1 on corruption
  vlastore build-features STORE --data-root DATA [--model Qwen/Qwen2.5-VL-3B-Instruct]
                                      compute a VLM feature family (torchrun --nproc_per_node=N -m vlastore ...)
  vlastore ingest robot|pt-cache|vggt SRC --out/--into STORE
                                      one-shot ingestion (see vlastore ingest --help)
"""


MAX_LISTED = 30
"""Corrupt items printed by `verify` (all are in --json)."""


# ------------------------------------------------------------------ storage options (every command)


def _key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--storage-option`` (argparse turns the ArgumentTypeError into exit 2)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. --storage-option endpoint=http://host:9000)")
    return key.strip(), value


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--storage-option KEY=VALUE`` to every leaf command of ``parser`` (subcommands included)."""
    children = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not children:
        parser.add_argument(
            "--storage-option",
            dest="storage_options",
            metavar="KEY=VALUE",
            type=_key_value,
            action="append",
            default=[],
            help="for s3:// stores (repeatable): endpoint, region, access_key_id, secret_access_key, "
            "profile, anonymous, max_retries, cache_dir, cache_max_bytes, ... (docs/remote.md); "
            "the AWS_* environment variables work too",
        )
        return
    for action in children:
        for child in dict.fromkeys(action.choices.values()):
            add_storage_options(child)


@contextlib.contextmanager
def storage_options_env(args: argparse.Namespace) -> Iterator[None]:
    """Check the command's ``--storage-option`` values and hand them to every store it opens.

    They go into ``VLASTORE_STORAGE_OPTIONS`` (over what it held) for the command's lifetime, so
    processes the command starts (ingest workers, torchrun ranks' DataLoader workers) see them too.

    Raises:
        UserError: an unknown key or a bad value (exit 2).
    """
    from .storage import check_options
    from .storage.settings import OPTIONS_ENV, options_from_env

    given = dict(getattr(args, "storage_options", None) or [])
    try:
        merged = {**options_from_env(), **given}
        check_options(merged)
    except ValueError as exc:
        raise UserError(f"{exc} (--storage-option KEY=VALUE)") from None
    if not given:
        yield
        return
    before = os.environ.get(OPTIONS_ENV)
    os.environ[OPTIONS_ENV] = json.dumps(merged)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OPTIONS_ENV, None)
        else:
            os.environ[OPTIONS_ENV] = before


def _is_url(location: str) -> bool:
    return location.startswith("s3://")


def _demo_target_on_object_storage(url: str, force: bool) -> None:
    """``demo --out s3://...``: only onto an empty prefix (nothing remote is ever replaced)."""
    from .storage import StoreNotFoundError, open_storage
    from .store import probe

    try:
        probe(url)
    except StoreNotFoundError:
        if next(iter(open_storage(url).list("")), None) is not None:
            raise UserError(f"{url} holds objects and is not a vlastore store; pick another --out") from None
        return
    raise UserError(
        f"{url} already holds a vlastore store; pick another --out (--force replaces only a local "
        "store; remove the prefix yourself to replace this one)"
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_batch, describe_batch, make_demo_store
    from .format import FormatError
    from .report import format_info, store_info
    from .storage import StoreNotFoundError
    from .store import probe, remove_store

    path = Path(args.out)
    if _is_url(args.out):
        _demo_target_on_object_storage(args.out, args.force)
    elif path.exists() or path.is_symlink():
        try:
            probe(path)
        except (StoreNotFoundError, FormatError, OSError):
            raise UserError(
                f"{path} exists and is not a vlastore store; pick another --out (nothing was "
                "changed; --force replaces only a vlastore store)"
            ) from None
        if not args.force:
            raise UserError(f"{path} already holds a vlastore store; pass --force to replace it, or pick another --out")
        try:
            remove_store(path)  # deletes only a store, and only its own files
        except (StoreNotFoundError, FormatError) as exc:
            raise UserError(f"--force replaces only a vlastore store and nothing else: {exc}") from None
    location = args.out if _is_url(args.out) else path
    store = make_demo_store(location)
    print(format_info(store_info(store)))
    fam = "qwen_vl"
    name = store.datasets[0]
    feature = store.feature(fam, name, 0)
    tokens = store.feature("qwen_vl_tokens", name, 0)
    state = store.series("state", name, 0, 3)
    print(
        f"\nread back: {fam}[({name!r}, vlm_idx=0)] -> {tuple(feature.shape)} {feature.dtype}, "
        f"first values {feature[:4].float().tolist()}"
    )
    print(f"           qwen_vl_tokens[({name!r}, vlm_idx=0)] -> {tuple(tokens.shape)} {tokens.dtype}")
    print(f"           state[{name!r}, steps 0:3] -> {state.shape} {state.dtype}")
    dataset, batch = demo_batch(store)
    print(f"\ntraining batch: {dataset!r}\n  DataLoader(batch_size=4, collate_fn=vlastore.dataset.collate) ->")
    print("\n".join(f"    {line}" for line in describe_batch(batch)))
    print(f"\nnext: vlastore info {location}   |   vlastore verify {location}")
    return 0


def _open_checked(location: str) -> VLAStore:
    """The store, or DataError naming what is damaged (exit 1)."""
    from .format import FormatError, NewerFormatError
    from .shardcodec import ChecksumError
    from .store import VLAStore

    try:
        return VLAStore.open(location)
    except NewerFormatError:
        raise
    except (FormatError, ChecksumError) as exc:
        raise DataError(
            f"{location} is damaged: {exc}\n  run `vlastore verify {location}` to list everything damaged"
        ) from None


def _cmd_info(args: argparse.Namespace) -> int:
    from .report import format_info, store_info

    info = store_info(_open_checked(args.store))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 1 if any("error" in f for f in info["families"].values()) else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .format import FormatError, NewerFormatError
    from .report import total_shards, verify_store
    from .shardcodec import ChecksumError
    from .storage import StorageError, StoreNotFoundError
    from .store import VLAStore

    total: int | None
    try:
        total = total_shards(VLAStore.open(args.store))
    except (NewerFormatError, StoreNotFoundError, StorageError):  # usage mistakes (exit 2), no server: not damage
        raise
    except (FormatError, ChecksumError, OSError):  # damaged: verify_store reports it; the bar has no total
        total = None
    with tqdm(total=total, unit="shard", desc="verify", disable=args.quiet or None) as bar:
        report = verify_store(args.store, progress=bar.update)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    print(f"store {args.store}")
    for family, (present, rows) in report.coverage.items():
        print(f"{family}: {present:,}/{rows:,} rows present")
    print(f"checked {report.chunks_checked:,} chunks")
    for note in report.notes:
        print(f"note: {note}")
    for family, missing in report.missing.items():
        print(f"MISSING {family}: {missing}")
    for c in report.corrupt[:MAX_LISTED]:
        print(f"CORRUPT {c}")
    if len(report.corrupt) > MAX_LISTED:
        print(f"... and {len(report.corrupt) - MAX_LISTED:,} more corrupt item(s) (--json lists all)")
    if report.ok:
        print("OK: no corruption found, every planned row is stored")
        return 0
    n_missing = sum(m.rows for m in report.missing.values())
    print(
        f"FAILED: {len(report.corrupt):,} corrupt item(s), {n_missing:,} missing row(s). Rewrite them: rerun "
        "the ingestion or `vlastore build-features` (with --repair for corrupt rows)"
    )
    return 1


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
    from .version import __version__

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
    _add_living_parsers(sub)
    add_storage_options(parser)
    return parser


def _add_living_parsers(sub: argparse._SubParsersAction) -> None:
    """``rm``, ``log``, ``gc``, ``upgrade``: the commands of format-2 (living) stores."""
    p = sub.add_parser("rm", help="remove episodes from a store (one commit; space comes back at `vlastore gc`)")
    p.add_argument("store", help="path (or URL) of the store")
    p.add_argument("episodes", nargs="+", metavar="EPISODE", help="episode names")
    p.set_defaults(func=_cmd_rm)

    p = sub.add_parser("log", help="the commits of a store: number, time, what changed")
    p.add_argument("store", help="path (or URL) of the store")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_log)

    p = sub.add_parser("gc", help="delete old snapshots and every object no kept snapshot uses")
    p.add_argument("store", help="path of the store")
    p.add_argument("--keep", type=int, default=1, metavar="N", help="always keep the newest N commits (default 1)")
    p.add_argument(
        "--retention-hours",
        type=float,
        default=24.0,
        metavar="H",
        help="keep commits younger than this (default 24: readers opened in that time keep working)",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    p.add_argument(
        "--no-compact",
        action="store_true",
        help="leave series made of many appends as they are (by "
        "default they are first rewritten as one segment: opening stays as fast as a fresh store's)",
    )
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser("upgrade", help="make a format-1 store a format-2 store (commits, appends); atomic")
    p.add_argument("store", help="path of the store")
    p.set_defaults(func=_cmd_upgrade)


def _open_for_change(path: str) -> VLAStore:
    from .store import VLAStore

    store = VLAStore.open(path, writable=True)
    if store.upgrade():
        print(f"{path}: upgraded from format 1 to format 2 (its content is commit 1) to take the change")
    return store


def _cmd_rm(args: argparse.Namespace) -> int:
    from .store import VLAStore

    absent = sorted(set(args.episodes) - set(VLAStore.open(args.store).catalog.names))
    if absent:
        raise UserError(
            f"{args.store} has no episode {absent[0]!r} ({len(absent)} of the names given are not there); "
            "nothing removed"
        )
    store = _open_for_change(args.store)
    snapshot = store.remove_episodes(args.episodes)
    assert snapshot is not None
    print(
        f"{args.store}: removed {len(args.episodes)} episode(s) in commit {snapshot.commit}; "
        f"{len(store.catalog)} episodes left (space comes back at `vlastore gc`)"
    )
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    from .store import VLAStore

    entries = VLAStore.open(args.store).log()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        what = "; ".join(entry.get("changes", [])) or entry.get("error", "")
        print(f"{entry['commit']:>6}  {entry['time']:<25}  {entry.get('episodes', '?'):>8} episodes  {what}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    if args.keep < 1:
        raise UserError(f"--keep {args.keep}: keep at least the newest commit (1)")
    from .store import VLAStore

    store = VLAStore.open(args.store, writable=True)
    if store.snapshot is None:
        print(f"{args.store} is a format-1 store (write-once): nothing to collect")
        return 0
    result = store.gc(
        retention_s=args.retention_hours * 3600, keep=args.keep, dry_run=args.dry_run, compact=not args.no_compact
    )
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{args.store}: {verb} {result['commits']} commit(s) and {result['objects']} object(s) "
        f"({result['bytes']:,} bytes); kept commits {result['kept']}"
    )
    return 0


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from .store import upgrade_store

    commit = upgrade_store(args.store)
    if commit is None:
        print(f"{args.store} is already a format-2 store: nothing to do")
    else:
        print(f"{args.store}: upgraded to format 2 (commit {commit}); no data was copied")
    return 0


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or write elsewhere), then rerun; finished shards are kept",
    errno.EDQUOT: "the disk quota is exhausted: free space, then rerun; finished shards are kept",
    errno.EFBIG: "a file grew past the file size limit (ulimit -f): raise it, then rerun",
    errno.EROFS: "the file system is read-only: write the store on a writable disk",
    errno.EACCES: "permission denied: check the owner and mode of the store (read-only for this user?)",
    errno.EPERM: "operation not permitted: check the owner and mode of the store",
    errno.EIO: "an input/output error from the disk: check the device, then run `vlastore verify`",
}


def _os_error_lines(exc: OSError) -> list[str]:
    where = exc.filename if exc.filename is not None else ""
    name = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
    what = exc.strerror or str(exc)
    first = f"{what}{f' ({name})' if name else ''}{f': {where}' if where else ''}"
    hint = _OS_HINTS.get(exc.errno or 0)
    return [first, *([hint] if hint else [])]


def _failure(exc: BaseException, command: str) -> tuple[int, list[str]]:
    """Exit code and lines for an error that ended a command: 2 for usage mistakes, 1 for data problems."""
    from .commitlog import CommitConflictError, SnapshotNotFoundError
    from .features.build import FeatureMismatchError
    from .features.extractor import ExtractorError
    from .format import FormatError, NewerFormatError
    from .read import MissingRowError, StaleGenerationError
    from .shardcodec import ChecksumError
    from .storage import StorageError, StoreNotFoundError
    from .writer import OwnershipError

    if isinstance(exc, StorageError):  # the object store: unreachable, missing bucket, failing after retries
        return 1, str(exc).splitlines()
    if isinstance(
        exc,
        (
            UserError,
            StoreNotFoundError,
            NewerFormatError,
            FeatureMismatchError,
            ExtractorError,
            FileExistsError,
            SnapshotNotFoundError,
        ),
    ):
        return 2, [str(exc)]
    if isinstance(exc, CommitConflictError):
        return 1, [str(exc)]
    if isinstance(exc, (KeyError, IndexError)) and not isinstance(exc, MissingRowError):
        return 2, [str(exc.args[0]) if exc.args else repr(exc)]
    if isinstance(exc, FileNotFoundError) and not exc.filename:  # a path the user gave (message names it)
        return 2, [str(exc)]
    if isinstance(exc, DataError):
        return 1, str(exc).splitlines()
    if isinstance(exc, (FormatError, ChecksumError, MissingRowError, StaleGenerationError)):
        return 1, [str(exc), "run `vlastore verify STORE` to list everything damaged or missing"]
    if isinstance(exc, OwnershipError):
        return 1, [str(exc)]
    if isinstance(exc, OSError):
        return 1, _os_error_lines(exc)
    return 1, [
        f"internal error: {type(exc).__name__}: {exc}",
        "rerun with VLASTORE_DEBUG=1 for the traceback, and report it",
    ]


class _UnretrievedFutures(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports (with their tracebacks).

    zarr runs its I/O on an event loop thread; when one write of a batch fails (a read-only or
    full disk), the sibling futures' exceptions are never retrieved and asyncio prints each one
    when it is collected, after vlastore has already reported the failure in a few lines.
    ``VLASTORE_DEBUG=1`` keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


def main(argv: Sequence[str] | None = None) -> int:
    from .ingest.report import IngestError

    args = build_parser().parse_args(argv)  # usage mistakes in the arguments: argparse exits 2
    if os.environ.get("VLASTORE_DEBUG", "") in ("", "0"):
        asyncio_log = logging.getLogger("asyncio")
        if not any(isinstance(f, _UnretrievedFutures) for f in asyncio_log.filters):
            asyncio_log.addFilter(_UnretrievedFutures())
    try:
        with storage_options_env(args):
            return int(args.func(args))
    except IngestError as exc:
        print(f"vlastore {args.command}: error: {exc}", file=sys.stderr)
        for problem in exc.problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        if len(exc.problems) > 20:
            print(f"  ... {len(exc.problems) - 20} more", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlastore {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("VLASTORE_DEBUG", "") not in ("", "0"):
            raise
        code, lines = _failure(exc, args.command)
        print(f"vlastore {args.command}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
