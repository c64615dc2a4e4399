"""Ingest robot data: one CSV or NPZ per episode, or one robomimic HDF5 file.

The robot data gives the store its catalog (episode names and step counts)
and its series (``series/<key>``, column names kept). Feature caches are then
added with ``vlastore ingest pt-cache|vggt ... --into STORE``. The files are
read by :mod:`vlastore.ingest.robotfiles`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from ..format import FormatError, NewerFormatError, validate_name
from ..living import fps_value
from ..storage import StoreNotFoundError
from ..store import EpisodeData, VLAStore
from .options import IngestOptions
from .output import open_or_create_store, store_usage
from .report import IngestError, IngestReport, IngestUsageError, Problem
from .robotfiles import (
    DEFAULT_DTYPE,
    DEFAULT_SERIES,
    HDF5_SUFFIXES,
    RobotEpisode,
    parse_series_spec,
    read_csv_episode,
    read_npz_episode,
    read_robomimic,
)
from .source import file_size, outside_root
from .workers import parallel_map

__all__ = [
    "RobotEpisode",
    "read_csv_episode",
    "read_npz_episode",
    "read_robomimic",
    "ingest_robot",
    "parse_series_spec",
    "DEFAULT_SERIES",
    "DEFAULT_DTYPE",
]


def _read_one(args: tuple[str, str, list[tuple[str, list[str]]], str | None, int]) -> RobotEpisode:
    path, fmt, series, dtype, max_bytes = args
    if fmt == "csv":
        return read_csv_episode(path, series, dtype, max_bytes)
    return read_npz_episode(path, series, dtype, max_bytes)


@dataclass
class _Listing:
    paths: list[str]
    outside: list[tuple[str, str]]


def _list_source(source: str, kind: str) -> _Listing:
    real = os.path.realpath(source)
    paths, outside = [], []
    with os.scandir(source) as entries:
        for entry in entries:
            if entry.name.endswith(f".{kind}"):
                paths.append(entry.path)
                if entry.is_symlink() and (target := outside_root(entry.path, real)) is not None:
                    outside.append((entry.path, target))
    return _Listing(sorted(paths), sorted(outside))


def _read_source(
    source: str, kind: str, groups: list[tuple[str, list[str]]], dtype: str | None, options: IngestOptions, what: str
) -> tuple[list[RobotEpisode], list[str], list[Problem], list[str]]:
    """Episodes, notes, problems outside any episode, and links leading outside the source."""
    if kind == "hdf5":
        return read_robomimic(source, dtype, options.max_file_bytes, options.skip_outside_links)
    listing = _list_source(source, kind)
    outside = {p for p, _ in listing.outside}
    problems = []
    paths = listing.paths
    if options.skip_outside_links and outside:
        paths = [p for p in paths if p not in outside]
        problems = [
            Problem(
                p,
                "outside-source",
                f"{p}: symbolic link to {t}, outside the source folder; not read (--skip-outside-links)",
            )
            for p, t in listing.outside
        ]
    with tqdm(total=len(paths), unit="file", desc=what, disable=not options.progress or None) as bar:
        episodes = list(
            parallel_map(
                _read_one,
                [(p, kind, groups, dtype, options.max_file_bytes) for p in paths],
                options.n_workers,
                bar.update,
            )
        )
    return episodes, [], problems, [f"{p} -> {t}" for p, t in listing.outside]


def _detect(source: str, fmt: str) -> str:
    if not os.path.exists(source):
        raise IngestUsageError(
            f"{source}: no such file or folder; give a folder of per-episode CSV/NPZ files or a robomimic .hdf5 file"
        )
    if fmt != "auto":
        if (fmt == "hdf5") == os.path.isdir(source):
            raise IngestUsageError(
                f"{source}: --format {fmt} needs "
                + ("a .hdf5 file" if fmt == "hdf5" else "a folder of per-episode files")
            )
        return fmt
    if not os.path.isdir(source):
        if source.endswith(HDF5_SUFFIXES):
            return "hdf5"
        raise IngestUsageError(f"{source}: give a folder of per-episode CSV/NPZ files or a robomimic .hdf5 file")
    names = os.listdir(source)
    csvs, npzs = sum(n.endswith(".csv") for n in names), sum(n.endswith(".npz") for n in names)
    return "csv" if csvs >= npzs else "npz"


def _check(
    episodes: list[RobotEpisode], allow_nonfinite: bool, dtype: str | None = None
) -> tuple[list[RobotEpisode], list[Problem]]:
    """Episodes that agree with the majority on series keys and column names, finite unless allowed."""
    problems = [Problem(e.path, *e.problem) for e in episodes if e.problem]
    good = [e for e in episodes if not e.problem]
    for e in list(good):
        try:
            validate_name(e.name, "episode name")
            lengths = {len(a) for _, a in e.columns.values()}
            if len(lengths) > 1:
                raise FormatError(f"series of different lengths {sorted(lengths)}")
            if not e.columns:
                raise FormatError("no numeric column")
        except FormatError as exc:
            problems.append(Problem(e.path, "bad-series", f"{e.path}: {exc}"))
            good.remove(e)
    if not good:
        return [], problems
    signature = Counter(tuple((k, tuple(c)) for k, (c, _) in sorted(e.columns.items())) for e in good)
    majority = signature.most_common(1)[0][0]
    kept = []
    for e in good:
        sig = tuple((k, tuple(c)) for k, (c, _) in sorted(e.columns.items()))
        if sig != majority:
            problems.append(
                Problem(
                    e.path,
                    "bad-series",
                    f"{e.path}: columns differ from the other episodes' "
                    f"({[k for k, _ in sig]} vs {[k for k, _ in majority]})",
                )
            )
            continue
        if not allow_nonfinite and any(not np.isfinite(a).all() for _, a in e.columns.values() if a.dtype.kind == "f"):
            wide = " (or values beyond float32's range: pass --dtype float64)" if dtype == "float32" else ""
            problems.append(
                Problem(
                    e.path,
                    "nonfinite",
                    f"{e.path}: holds NaN/Inf or empty cells{wide}; fix it or pass --allow-nonfinite",
                )
            )
            continue
        kept.append(e)
    return kept, problems


def ingest_robot(
    source: str,
    options: IngestOptions,
    fmt: str = "auto",
    series: list[str] | None = None,
    dtype: str | None = DEFAULT_DTYPE,
    task: str | None = None,
    fps: float | None = None,
) -> IngestReport:
    """Create a store from robot data: the catalog plus one series per key, column names kept.

    Args:
        source: a folder of ``<episode>.csv`` / ``<episode>.npz`` files, or a robomimic ``.hdf5`` file.
        options: ``out`` (new store) and the shared options; ``into`` is not supported yet.
        fmt: ``auto``, ``csv``, ``npz`` or ``hdf5``.
        series: ``KEY=PATTERN,...`` groups of CSV/NPZ columns (default: all in series ``data``).
        dtype: dtype of the series (``float32`` by default, ``float64`` keeps CSV values exactly; None: as
            read); integer columns that float32 would round become float64.

    Raises:
        IngestUsageError: ``--into``, a missing source, a bad ``--series``, ``--out`` onto another store.
        IngestError: ``--strict`` with problems.
    """
    started = time.perf_counter()
    if options.replace and not options.into:
        raise IngestUsageError("--replace is for --into STORE (swapping episodes of an existing store)")
    target = options.target
    if options.workers < 0:
        raise IngestUsageError(f"--workers {options.workers}: give a number of processes >= 1 (0: one per core)")
    try:
        fps_value(fps, "every episode")
    except FormatError:
        raise IngestUsageError(f"--fps {fps}: give a positive number of frames per second") from None
    if dtype not in (None, "float32", "float64"):
        raise IngestUsageError(f"--dtype {dtype}: give float32 or float64")
    report = IngestReport(source=source, store=target, kind="robot", dry_run=options.dry_run)
    report.store_before = store_usage(target)
    report.store_after = dict(report.store_before)
    kind = _detect(source, fmt)
    groups = parse_series_spec(series)
    episodes, notes, file_problems, outside = _read_source(source, kind, groups, dtype, options, "read")
    report.notes += notes
    report.outside_links = outside
    if outside:
        what = (
            "skipped (--skip-outside-links)"
            if options.skip_outside_links
            else "read; --skip-outside-links leaves them out"
        )
        report.notes.append(
            f"{len(outside):,} link(s) lead outside {source if kind != 'hdf5' else 'its folder'}, "
            f"{what}: {', '.join(outside[:3])}" + (", ..." if len(outside) > 3 else "")
        )
    report.files_found = 1 if kind == "hdf5" else len(episodes) + len(file_problems)
    report.source_bytes = file_size(source) if kind == "hdf5" else sum(e.nbytes for e in episodes)
    kept, problems = _check(episodes, options.allow_nonfinite, dtype)
    report.problems = file_problems + problems
    dropped = Counter(c for e in kept for c in e.dropped)
    if dropped:
        report.notes.append(
            "columns not stored (text, or claimed by no --series pattern): "
            + ", ".join(f"{c} ({n} files)" for c, n in dropped.most_common(10))
        )
    if options.strict and report.problems:
        raise IngestError(
            f"--strict: {len(report.problems)} problem(s) in {source}; nothing written", report.problems, report
        )
    if kept:
        report.series = {k: list(c) for k, (c, _) in sorted(kept[0].columns.items())}
    report.episodes = len(kept)
    steps = [len(next(iter(e.columns.values()))[1]) for e in kept]
    report.episode_rows = {e.name: n for e, n in zip(kept, steps, strict=True)}
    report.steps = sum(steps)
    report.files_usable = (1 if kind == "hdf5" else len(kept)) if kept else 0
    data = [
        EpisodeData(
            e.name,
            {k: a for k, (_, a) in e.columns.items()},
            task=e.task or task,
            fps=e.fps or fps,
            attrs=e.attrs or None,
        )
        for e in kept
    ]
    columns = {k: c for k, c in report.series.items()}
    report.estimated_bytes = sum(a.nbytes for e in data for a in e.series.values())
    report.estimated_files = 8 + 2 * len(columns)
    if options.dry_run or not kept:
        report.seconds = time.perf_counter() - started
        return report
    if options.into:
        store = _append(options.into, data, columns, options, report)
    else:
        store = _create(target, data, columns, options, report)
    report.files_ingested = report.files_usable
    report.store_after = store_usage(target)
    if options.verify:  # against a fresh read of the source files, not the copy in memory
        again, _, _, _ = _read_source(source, kind, groups, dtype, options, "verify")
        by_name = {e.name: e for e in again}
        fresh = [
            EpisodeData(e.name, {k: a for k, (_, a) in by_name[e.name].columns.items()})
            for e in kept
            if e.name in by_name and not by_name[e.name].problem
        ]
        report.verify = _verify_series(store, fresh)
        if len(fresh) < len(kept):
            report.verify["mismatches"].append(f"{len(kept) - len(fresh)} episode(s) no longer read from the source")
            report.verify["ok"] = False
    report.seconds = time.perf_counter() - started
    return report


def _append(
    into: str, data: list[EpisodeData], columns: dict[str, list[str]], options: IngestOptions, report: IngestReport
) -> VLAStore:
    """``--into``: the episodes appended in one commit (identical ones skipped, different ones refused or replaced)."""
    try:
        store = VLAStore.open(into, writable=True)
    except (StoreNotFoundError, NewerFormatError) as exc:
        raise IngestUsageError(f"--into {into}: {exc}") from None
    if store.upgrade():
        report.notes.append(f"{into} was upgraded from format 1 to format 2 (its content is commit 1) to take appends")
    before = set(store.catalog.names)
    try:
        snapshot = store.add_episodes(
            data, replace=options.replace, columns=columns, allow_nonfinite=options.allow_nonfinite
        )
    except FormatError as exc:
        raise IngestError(f"--into {into}: {exc}; nothing appended", [], report) from None
    added = [e.name for e in data if e.name not in before]
    if snapshot is None:
        report.notes.append(f"every episode is already in {into} with the same data: nothing to do")
    else:
        replaced = {n for c in snapshot.changes if c.op == "replace" for n in c.details.get("episodes", [])}
        identical = len(data) - len(added) - len(replaced)
        report.notes.append(
            f"commit {snapshot.commit}: {len(added)} episode(s) appended"
            + (f", {len(replaced)} replaced" if replaced else "")
            + (f", {identical} already there with the same data (skipped)" if identical else "")
        )
        families = list(store.families)
        if families and added:
            report.notes.append(
                f"feature rows of the new episodes are missing until built: {', '.join(families)} "
                f"(vlastore build-features / ingest pt-cache|vggt --into {into})"
            )
    return store


def _create(
    target: str, data: list[EpisodeData], columns: dict[str, list[str]], options: IngestOptions, report: IngestReport
) -> VLAStore:
    store, created = open_or_create_store(
        target,
        data,
        columns,
        same=lambda s: _same_series(s, data),
        other_store_hint=f"Pick a new --out (or remove {target} first to replace it)",
        allow_nonfinite=options.allow_nonfinite,
        format_version=options.format_version,
    )
    if not created:
        report.notes.append("the store already holds exactly this robot data (an earlier run finished): nothing to do")
    return store


def _same_series(store: VLAStore, data: list[EpisodeData]) -> bool:
    if not data:
        return True
    if set(store.series_keys) != set(data[0].series):
        return False
    return _verify_series(store, data)["ok"]


def _verify_series(store: VLAStore, data: list[EpisodeData]) -> dict[str, Any]:
    mismatches = []
    checked = 0
    for key in store.series_keys:
        stored = store.series_all(key)
        for ep in data:
            lo, hi = store.catalog.step_range(store.catalog.resolve(ep.name))
            source = np.asarray(ep.series[key])
            source = source.reshape(len(source), -1)
            if source.dtype != stored.dtype:  # the store widens ints and mixed float widths, losslessly
                source = source.astype(stored.dtype)
            part = stored[lo:hi]
            checked += 1
            if part.shape != source.shape or part.tobytes() != source.tobytes():
                mismatches.append(f"series {key!r} of episode {ep.name!r} differs from its source")
    return {"rows_checked": checked, "rows_missing": 0, "mismatches": mismatches, "ok": not mismatches}
