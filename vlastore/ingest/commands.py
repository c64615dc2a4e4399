"""``vlastore ingest robot|pt-cache|vggt|lerobot``: argument definitions and dispatch (the work is in the library)."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_ingest_parser", "run_ingest"]

EPILOG = """typical use:
  vlastore ingest robot data/csv --out train.vla                  catalog + series from robot data
  vlastore ingest pt-cache cache/ --into train.vla --dry-run      see the plan and problems, write nothing
  vlastore ingest pt-cache cache/ --into train.vla --verify       add the VL features, check every value
  vlastore ingest vggt data/ --into train.vla                     add VGGT features, keyed by image path
  vlastore ingest pt-cache cache/ --robot data/csv --out train.vla   both in one command
  vlastore ingest lerobot ~/lerobot/pusht --out train.vla         a LeRobot v3.0 dataset: catalog + series

Killed or interrupted? Run the same command again: finished shards are kept, the rest is written.
Source files are only read, never changed; pickled code in .pt files is never run.
"""


def _cores() -> int:
    # what IngestOptions.n_workers picks, without importing the library for --help
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _common(p: argparse.ArgumentParser, features: bool) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="STORE", help="create this store (or finish the one an earlier run "
                                                      "of this same command started)")
    if features:
        where.add_argument("--into", metavar="STORE", help="add the features to this existing store (e.g. made by "
                                                           "`vlastore ingest robot`); episodes come from it")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help=f"worker processes (default: one per CPU core, here {_cores()})")
    p.add_argument("--dry-run", action="store_true", help="scan and plan only: print episodes, rows, families, "
                   "shapes, dtypes, problems and the estimated store size; write nothing")
    p.add_argument("--strict", action="store_true", help="stop (exit 1) on any bad file instead of skipping it")
    p.add_argument("--verify", action="store_true", help="after ingesting, compare every stored value bit-exactly "
                   "with its source file")
    p.add_argument("--allow-nonfinite", action="store_true", help="store NaN/Inf values instead of skipping the file")
    if features:
        p.add_argument("--full-scan", action="store_true", help="read and check every file before writing anything "
                       "(implied by --dry-run and --strict); by default, when file names give every key, a sample "
                       "of files fixes shape and dtype and each file is checked as it is written")
    p.add_argument("--report-json", metavar="PATH", help="also write the final report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _feature_options(p: argparse.ArgumentParser, family: str) -> None:
    p.add_argument("--family", default=family, help="feature family name (default: %(default)s); a payload with "
                   "several tensors gives one family per tensor, named FAMILY_<key>")
    p.add_argument("--layout", choices=("auto", "fixed", "ragged"), default="auto", help="fixed row shape, or "
                   "variable-length rows [L, ...]; auto picks fixed when most files share one shape")
    p.add_argument("--compression", choices=("none", "zstd"), default="none",
                   help="compress rows (default none: raw rows are memory-mapped by the reader)")
    p.add_argument("--rows-per-shard", type=int, default=0, metavar="N", help="rows per shard file (default: "
                   "4096 for small rows, ~64 MiB per shard for big ones)")
    p.add_argument("--model", default="", help="model id that produced the features (stored in the manifest)")
    p.add_argument("--revision", default="", help="model revision")
    p.add_argument("--fingerprint", default="", help="hash of the weights that produced the features")


def _robot_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}format", dest=f"{prefix.replace('-', '_')}format",
                   choices=("auto", "csv", "npz", "hdf5"), default="auto",
                   help="robot data format (default: from the file names)")
    p.add_argument(f"--{prefix}series", dest=f"{prefix.replace('-', '_')}series", action="append", metavar="KEY=PAT,..",
                   help="group columns into series by name pattern, e.g. state='joint_*,gripper' "
                        "(repeat; default: all numeric columns in series 'data')")
    p.add_argument(f"--{prefix}dtype", dest=f"{prefix.replace('-', '_')}dtype", choices=("float32", "float64"),
                   default=None, help="store series as this dtype (default: as read: float64 for CSV)")


def add_ingest_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ingest`` and its sources to the ``vlastore`` parser."""
    p = sub.add_parser("ingest", help="one-shot ingestion of robot data and .pt feature caches into a store",
                       description="Ingest existing data into a vlastore store: scan and plan, then write in "
                                   "parallel, resumable, with a final report.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    r = sources.add_parser("robot", help="robot data (CSV/NPZ per episode, robomimic HDF5) -> catalog + series",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("path", help="folder of <episode>.csv or <episode>.npz files, or a robomimic .hdf5 file")
    _common(r, features=False)
    _robot_options(r)

    c = sources.add_parser("pt-cache", help="a folder of VL feature .pt files ({dataset}_vlm{idx}.pt or hashed)",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("path", help="the cache folder")
    _common(c, features=True)
    _feature_options(c, "vl_features")
    c.add_argument("--vlm-reuse-count", type=int, default=3, metavar="N",
                   help="steps served by one feature row (default: %(default)s): rows per episode = "
                        "ceil(steps / N); for a new store, steps = rows * N")
    c.add_argument("--pattern", default=None, metavar="REGEX", help="file-name regex with groups (?P<dataset>) and "
                   r"(?P<index>) (default: ^(?P<dataset>.+)_vlm(?P<index>\d+)\.pt$)")
    c.add_argument("--mapping", metavar="CSV", help="file,dataset,vlm_idx rows for files whose name holds no key "
                   "(hash-named files); files may also carry dataset/vlm_idx inside")
    c.add_argument("--robot", metavar="PATH", help="robot data to ingest first into --out (same as running "
                   "`vlastore ingest robot PATH --out STORE` before)")
    _robot_options(c, "robot-")

    v = sources.add_parser("vggt", help="VGGT caches next to images (<image>.vggt_cache.pt) under a data root",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("path", help="data root: one folder of images per episode")
    _common(v, features=True)
    _feature_options(v, "vggt")
    v.add_argument("--manifest", default="auto", metavar="PATH", help="manifest listing images per episode "
                   "(default: manifest.json/.jsonl/.csv at the root when present)")
    v.add_argument("--no-manifest", action="store_true", help="ignore any manifest: images ordered by name")
    v.add_argument("--robot", metavar="PATH", help="robot data to ingest first into --out")
    _robot_options(v, "robot-")

    lr = sources.add_parser("lerobot", help="a local LeRobot dataset (format v3.0) -> catalog + series",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    lr.add_argument("path", help="the dataset folder (it holds meta/info.json, data/, videos/)")
    _common(lr, features=False)
    lr.add_argument("--name-pattern", default="episode_{episode_index:06d}", metavar="PATTERN",
                    help="store name of each episode (default: %(default)s)")
    lr.add_argument("--dtype", choices=("float32", "float64"), default=None,
                    help="store series as this dtype (default: as in the dataset)")
    lr.add_argument("--metadata-json", metavar="PATH", help="also write what the store format cannot hold yet "
                    "(fps, tasks per episode, video segments, stats) as JSON")
    return p


def run_ingest(args: argparse.Namespace) -> int:
    """Run the ingestion ``args`` describe, print the report; exit status 0 (1 when verification fails).

    Raises:
        IngestError: ``--strict`` with problems, or a failed run (its report is still written to ``--report-json``).
    """
    from .report import IngestError

    try:
        return _run(args)
    except IngestError as exc:
        if args.report_json and exc.report is not None:
            exc.report.write_json(args.report_json)
        raise


def _run(args: argparse.Namespace) -> int:
    from ..format import Producer
    from .features import IngestOptions, ingest_pt_cache, ingest_vggt
    from .robot import ingest_robot
    from .scan import NAME_PATTERN

    options = IngestOptions(
        out=args.out, into=getattr(args, "into", None), workers=args.workers, dry_run=args.dry_run,
        strict=args.strict, verify=args.verify, allow_nonfinite=args.allow_nonfinite, progress=not args.quiet)
    if args.source == "robot":
        report = ingest_robot(args.path, options, fmt=args.format, series=args.series, dtype=args.dtype)
    elif args.source == "lerobot":
        from .lerobot import ingest_lerobot

        report = ingest_lerobot(args.path, options, name_pattern=args.name_pattern, dtype=args.dtype,
                                metadata_json=args.metadata_json)
    else:
        options.layout = args.layout
        options.full_scan = args.full_scan
        options.compression = None if args.compression == "none" else args.compression
        options.rows_per_shard = args.rows_per_shard
        options.producer = Producer(args.model, args.revision, args.fingerprint,
                                    params={"ingested_from": os.path.abspath(args.path)})
        if args.robot:
            if not args.out:
                raise SystemExit("vlastore ingest: --robot needs --out STORE (the store it creates)")
            robot_report = ingest_robot(args.robot, IngestOptions(
                out=args.out, workers=args.workers, dry_run=args.dry_run, strict=args.strict, verify=args.verify,
                allow_nonfinite=args.allow_nonfinite, progress=not args.quiet),
                fmt=args.robot_format, series=args.robot_series, dtype=args.robot_dtype)
            print(robot_report.format())
            if args.dry_run:
                print("(dry run: the features below are planned as if the robot store existed only when it does)")
            else:
                options.out, options.into = None, args.out
        if args.source == "pt-cache":
            report = ingest_pt_cache(args.path, options, family=args.family, vlm_reuse_count=args.vlm_reuse_count,
                                     pattern=args.pattern or NAME_PATTERN, mapping=args.mapping)
        else:
            report = ingest_vggt(args.path, options, family=args.family,
                                 manifest=None if args.no_manifest else args.manifest)
    print(report.format())
    if args.report_json:
        report.write_json(args.report_json)
    if report.verify is not None and not report.verify["ok"]:
        return 1
    return 0

