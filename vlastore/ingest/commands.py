"""``vlastore ingest robot|pt-cache|vggt``: argument definitions and dispatch (the work is in the library)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["add_ingest_parser", "run_ingest", "SOURCES", "Source"]

EPILOG = """typical use:
  vlastore ingest robot data/csv --out train.vla                  catalog + series from robot data
  vlastore ingest pt-cache cache/ --into train.vla --dry-run      see the plan and problems, write nothing
  vlastore ingest pt-cache cache/ --into train.vla --verify       add the VL features, check every value
  vlastore ingest vggt data/ --into train.vla                     add VGGT features, keyed by image path
  vlastore ingest pt-cache cache/ --robot data/csv --out train.vla   both in one command

Killed or interrupted? Run the same command again: finished shards are kept, the rest is written.
Source files are only read, never changed; pickled code in .pt files is never run.
"""


def _cores() -> int:
    # what IngestOptions.n_workers picks, without importing the library for --help
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _size(text: str) -> int:
    """``--max-file-size`` values: bytes, or with a K/M/G/T suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("IB").rstrip("B"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1073741824, 512M or 2G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive size")
    return value


def _common(p: argparse.ArgumentParser, features: bool) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--out",
        metavar="STORE",
        help="create this store (or finish the one an earlier run of this same command started)",
    )
    where.add_argument(
        "--into",
        metavar="STORE",
        help="add to this existing store (e.g. made by `vlastore ingest robot`); episodes come from it"
        if features
        else "append the episodes to an existing store (one commit; episodes already there with the "
        "same data are skipped, with different data refused unless --replace)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help=f"worker processes (default: one per CPU core, here {_cores()})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="scan and plan only: print episodes, rows, families, "
        "shapes, dtypes, problems and the estimated store size; write nothing",
    )
    p.add_argument("--strict", action="store_true", help="stop (exit 1) on any bad file instead of skipping it")
    p.add_argument(
        "--verify",
        action="store_true",
        help="after ingesting, compare every stored value bit-exactly with its source file",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="store NaN/Inf values instead of skipping the file")
    p.add_argument(
        "--max-file-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="skip source files bigger than this, unread (default 1G; e.g. 4G)",
    )
    p.add_argument(
        "--skip-outside-links",
        action="store_true",
        help="skip symbolic links (and HDF5 external links) "
        "that lead outside the source folder instead of reading them (they are listed either way)",
    )
    if features:
        p.add_argument(
            "--full-scan",
            action="store_true",
            help="read and check every file before writing anything "
            "(implied by --dry-run and --strict); by default, when file names give every key, a sample "
            "of files fixes shape and dtype and each file is checked as it is written",
        )
        p.add_argument(
            "--repair",
            action="store_true",
            help="also rewrite rows that `vlastore verify` reports "
            "corrupt, from their source files (each shard replaced atomically)",
        )
    p.add_argument("--report-json", metavar="PATH", help="also write the final report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _feature_options(p: argparse.ArgumentParser, family: str) -> None:
    p.add_argument(
        "--family",
        default=family,
        help="feature family name (default: %(default)s); a payload with "
        "several tensors gives one family per tensor, named FAMILY_<key>",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "fixed", "ragged"),
        default="auto",
        help="fixed row shape, or variable-length rows [L, ...]; auto picks fixed when most files share one shape",
    )
    p.add_argument(
        "--compression",
        choices=("none", "zstd"),
        default="none",
        help="compress rows (default none: raw rows are memory-mapped by the reader)",
    )
    p.add_argument(
        "--rows-per-shard",
        type=int,
        default=0,
        metavar="N",
        help="rows per shard file (default: 4096 for small rows, ~64 MiB per shard for big ones)",
    )
    p.add_argument("--model", default="", help="model id that produced the features (stored in the manifest)")
    p.add_argument("--revision", default="", help="model revision")
    p.add_argument("--fingerprint", default="", help="hash of the weights that produced the features")


def _robot_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    dest = prefix.replace("-", "_")
    p.add_argument(
        f"--{prefix}format",
        dest=f"{dest}format",
        choices=("auto", "csv", "npz", "hdf5"),
        default="auto",
        help="robot data format (default: from the file names)",
    )
    p.add_argument(
        f"--{prefix}series",
        dest=f"{dest}series",
        action="append",
        metavar="KEY=PAT,..",
        help="group columns into series by name pattern, e.g. state='joint_*,gripper' "
        "(repeat; default: all numeric columns in series 'data')",
    )
    p.add_argument(
        f"--{prefix}dtype",
        dest=f"{dest}dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of the series (default: %(default)s; float64 keeps CSV values exactly); integer "
        "columns that float32 would round are stored as float64",
    )


def _robot_parser(r: argparse.ArgumentParser) -> None:
    r.add_argument("path", help="folder of <episode>.csv or <episode>.npz files, or a robomimic .hdf5 file")
    _common(r, features=False)
    r.add_argument(
        "--replace",
        action="store_true",
        help="with --into: swap episodes already in the store whose "
        "data differ (their feature rows become missing until rebuilt)",
    )
    r.add_argument(
        "--task",
        help="task / instruction text of every episode without its own (a task/instruction column or "
        "<episode>.json gives an episode its own; kept by format 2)",
    )
    r.add_argument(
        "--fps", type=float, help="frame rate of every episode without its own (<episode>.json; kept by format 2)"
    )
    _format_option(r)
    _robot_options(r)


def _format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format-version",
        type=int,
        choices=(1, 2),
        default=None,
        help="format of a store made with --out: 2 is a living store (commits, snapshots, episode "
        "metadata); 1 (default for now) is the older layout, made format 2 in place by its first "
        "--into or rm",
    )


def _pt_cache_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument("path", help="the cache folder")
    _common(c, features=True)
    _format_option(c)
    _feature_options(c, "vl_features")
    c.add_argument(
        "--vlm-reuse-count",
        type=int,
        default=3,
        metavar="N",
        help="steps served by one feature row (default: %(default)s): rows per episode = "
        "ceil(steps / N); for a new store, steps = rows * N",
    )
    c.add_argument(
        "--pattern",
        default=None,
        metavar="REGEX",
        help="file-name regex with groups (?P<dataset>) and "
        r"(?P<index>) (default: ^(?P<dataset>.+)_vlm(?P<index>\d+)\.pt$)",
    )
    c.add_argument(
        "--mapping",
        metavar="CSV",
        help="file,dataset,vlm_idx rows for files whose name holds no key "
        "(hash-named files); files may also carry dataset/vlm_idx inside",
    )
    c.add_argument(
        "--robot",
        metavar="PATH",
        help="robot data to ingest first into --out (same as running `vlastore ingest robot PATH --out STORE` before)",
    )
    _robot_options(c, "robot-")


def _vggt_parser(v: argparse.ArgumentParser) -> None:
    v.add_argument("path", help="data root: one folder of images per episode")
    _common(v, features=True)
    _format_option(v)
    _feature_options(v, "vggt")
    v.add_argument(
        "--manifest",
        default="auto",
        metavar="PATH",
        help="manifest listing images per episode (default: manifest.json/.jsonl/.csv at the root when present)",
    )
    v.add_argument("--no-manifest", action="store_true", help="ignore any manifest: images ordered by name")
    v.add_argument("--robot", metavar="PATH", help="robot data to ingest first into --out")
    _robot_options(v, "robot-")


def _lerobot_parser(lr: argparse.ArgumentParser) -> None:
    lr.add_argument("path", help="the dataset folder (it holds meta/info.json, data/, videos/)")
    _common(lr, features=False)
    _format_option(lr)
    lr.add_argument(
        "--name-pattern",
        default="episode_{episode_index:06d}",
        metavar="PATTERN",
        help="store name of each episode (default: %(default)s)",
    )
    lr.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="dtype of the series (default: %(default)s)"
    )
    lr.add_argument(
        "--metadata-json",
        metavar="PATH",
        help="also write what the store format cannot hold yet (fps, tasks per episode, video segments, stats) as JSON",
    )


def run_ingest(args: argparse.Namespace) -> int:
    """Run the ingestion ``args`` describe and print the report; return the exit status.

    0: done. 1: a data problem (nothing ingested, files to retry after
    transient I/O errors, a failed ``--verify``, a failed write: disk full, file
    size limit, read-only store, another writer), in a few lines naming the
    cause and the fix. 2: a usage mistake (e.g. ``--out`` onto another store),
    naming the fix. Never a traceback (``VLASTORE_DEBUG=1`` shows one).

    With ``--strict``, the problems are listed and the report (the plan that was
    refused) is still written to ``--report-json``.
    """
    from .report import IngestError, IngestUsageError, describe_failure, printable

    def fail(message: str, code: int) -> int:
        print(printable(f"vlastore ingest: error: {message}"), file=sys.stderr)
        return code

    try:
        reports = _run(args)
    except IngestUsageError as exc:
        return fail(str(exc), 2)
    except IngestError as exc:
        if args.report_json and exc.report is not None:
            exc.report.write_json(args.report_json)
        shown = "".join(f"\n  {p}" for p in exc.problems[:20])
        more = f"\n  ... {len(exc.problems) - 20:,} more (see --report-json)" if len(exc.problems) > 20 else ""
        return fail(f"{exc}{shown}{more}", 1)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a few lines, never a traceback (VLASTORE_DEBUG=1 shows it)
        if os.environ.get("VLASTORE_DEBUG"):
            raise
        return fail(describe_failure(exc), 1)
    for report in reports:
        failure = report.failure()
        if failure:
            print(printable(f"vlastore ingest: {failure}"), file=sys.stderr)
            return 1
    return 0


def _options(args: argparse.Namespace, **overrides: object) -> Any:
    from .features import IngestOptions
    from .source import MAX_FILE_BYTES

    options = IngestOptions(
        out=args.out,
        into=args.into,
        workers=args.workers,
        dry_run=args.dry_run,
        strict=args.strict,
        verify=args.verify,
        allow_nonfinite=args.allow_nonfinite,
        progress=not args.quiet,
        max_file_bytes=args.max_file_size or MAX_FILE_BYTES,
        skip_outside_links=args.skip_outside_links,
    )
    options.replace = bool(getattr(args, "replace", False))
    if getattr(args, "format_version", None) is not None:  # else the library's default (DEFAULT_FORMAT_VERSION)
        options.format_version = int(args.format_version)
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def _run(args: argparse.Namespace) -> list[Any]:
    return SOURCES[args.source].run(args)


def _run_robot(args: argparse.Namespace) -> list[Any]:
    from .robot import ingest_robot

    report = ingest_robot(
        args.path, _options(args), fmt=args.format, series=args.series, dtype=args.dtype, task=args.task, fps=args.fps
    )
    _emit(args, report)
    return [report]


def _run_lerobot(args: argparse.Namespace) -> list[Any]:
    from ..format import FormatError
    from .lerobot import ingest_lerobot
    from .report import IngestUsageError

    if not os.path.isdir(args.path):
        raise IngestUsageError(
            f"{args.path}: not a folder; give the LeRobot dataset folder (the one holding meta/info.json)"
        )
    try:
        report = ingest_lerobot(
            args.path,
            _options(args),
            name_pattern=args.name_pattern,
            dtype=args.dtype,
            metadata_json=args.metadata_json,
        )
    except FormatError as exc:  # only the options are checked before reading: a usage mistake
        raise IngestUsageError(str(exc)) from None
    _emit(args, report)
    return [report]


def _feature_run_options(args: argparse.Namespace) -> Any:
    from ..format import Producer

    return _options(
        args,
        layout=args.layout,
        full_scan=args.full_scan,
        repair=args.repair,
        compression=None if args.compression == "none" else args.compression,
        rows_per_shard=args.rows_per_shard,
        producer=Producer(
            args.model, args.revision, args.fingerprint, params={"ingested_from": os.path.abspath(args.path)}
        ),
    )


def _robot_first(args: argparse.Namespace, options: Any) -> list[Any]:
    """``--robot PATH``: ingest the robot data into ``--out`` first; the features then go ``--into`` it."""
    if not args.robot:
        return []
    from .report import IngestUsageError
    from .robot import ingest_robot

    if not args.out:
        raise IngestUsageError(
            "--robot needs --out STORE (the store it creates); with --into the store already has its robot data"
        )
    report = ingest_robot(
        args.robot, _options(args), fmt=args.robot_format, series=args.robot_series, dtype=args.robot_dtype
    )
    print(report.format())
    if report.failure() is None:
        if args.dry_run:
            print("(dry run: the features below are planned as if the robot store existed only when it does)")
        else:
            options.out, options.into = None, args.out
    return [report]


def _run_pt_cache(args: argparse.Namespace) -> list[Any]:
    from .features import ingest_pt_cache
    from .scan import NAME_PATTERN

    options = _feature_run_options(args)
    reports = _robot_first(args, options)
    if reports and reports[0].failure():
        return reports
    report = ingest_pt_cache(
        args.path,
        options,
        family=args.family,
        vlm_reuse_count=args.vlm_reuse_count,
        pattern=args.pattern or NAME_PATTERN,
        mapping=args.mapping,
    )
    _emit(args, report)
    return [*reports, report]


def _run_vggt(args: argparse.Namespace) -> list[Any]:
    from .features import ingest_vggt

    options = _feature_run_options(args)
    reports = _robot_first(args, options)
    if reports and reports[0].failure():
        return reports
    report = ingest_vggt(args.path, options, family=args.family, manifest=None if args.no_manifest else args.manifest)
    _emit(args, report)
    return [*reports, report]


def _emit(args: argparse.Namespace, report: Any) -> None:
    print(report.format())
    if args.report_json:
        report.write_json(args.report_json)


class Source(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[Any]]
    """Runs the ingestion, prints the report(s) and returns them (their ``failure()`` sets the exit status)."""


SOURCES: dict[str, Source] = {
    "robot": Source("robot data (CSV/NPZ per episode, robomimic HDF5) -> catalog + series", _robot_parser, _run_robot),
    "pt-cache": Source(
        "a folder of VL feature .pt files ({dataset}_vlm{idx}.pt or hashed)", _pt_cache_parser, _run_pt_cache
    ),
    "vggt": Source("VGGT caches next to images (<image>.vggt_cache.pt) under a data root", _vggt_parser, _run_vggt),
    "lerobot": Source("a local LeRobot dataset (format v3.0) -> catalog + series", _lerobot_parser, _run_lerobot),
}
"""``vlastore ingest SOURCE``: one row per source (a new source is a new row)."""


def add_ingest_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ingest`` and its :data:`SOURCES` to the ``vlastore`` parser."""
    p = sub.add_parser(
        "ingest",
        help="one-shot ingestion of robot data and .pt feature caches into a store",
        description="Ingest existing data into a vlastore store: scan and plan, then write in "
        "parallel, resumable, with a final report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name, source in SOURCES.items():
        source.add_arguments(
            sources.add_parser(
                name, help=source.help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
            )
        )
    return p
