"""Ingest robot data: one CSV or NPZ per episode, or one robomimic HDF5 file.

The robot data gives the store its catalog (episode names and step counts)
and its series (``series/<key>``, column names kept). Feature caches are then
added with ``vlastore ingest pt-cache|vggt ... --into STORE``.
"""

from __future__ import annotations

import csv
import fnmatch
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ..format import FormatError, validate_name
from ..store import EpisodeData, VLAStore
from .features import IngestOptions, open_or_create_store, store_usage
from .report import IngestError, IngestReport, Problem
from .workers import parallel_map

__all__ = ["RobotEpisode", "read_csv_episode", "read_npz_episode", "read_robomimic", "ingest_robot",
           "parse_series_spec", "DEFAULT_SERIES"]

DEFAULT_SERIES = "data"
"""Series key of the columns no ``--series`` pattern claims."""


@dataclass
class RobotEpisode:
    """One episode's robot data as read from its source."""

    name: str
    path: str
    columns: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    """Series key -> (column names, ``[steps, columns]`` array)."""
    problem: tuple[str, str] | None = None
    dropped: list[str] = field(default_factory=list)
    nbytes: int = 0


def parse_series_spec(specs: list[str] | None) -> list[tuple[str, list[str]]]:
    """``["state=joint_*,gripper", "action=act_*"]`` -> ``[(key, patterns), ...]``.

    Raises:
        IngestError: a spec without ``=`` or with an unusable key.
    """
    out = []
    for spec in specs or []:
        key, sep, patterns = spec.partition("=")
        if not sep or not patterns:
            raise IngestError(f"--series {spec!r}: write KEY=PATTERN[,PATTERN...], e.g. state=joint_*,gripper")
        try:
            validate_name(key.strip(), "series key")
        except FormatError as exc:
            raise IngestError(f"--series {spec!r}: {exc}") from None
        out.append((key.strip(), [p.strip() for p in patterns.split(",") if p.strip()]))
    return out


def _group(names: list[str], table: np.ndarray, series: list[tuple[str, list[str]]],
           dtype: str | None) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """Split named columns into series by pattern (first match wins); all go to ``data`` without patterns."""
    if not series:
        groups = {DEFAULT_SERIES: list(range(len(names)))}
    else:
        groups = {key: [] for key, _ in series}
        for i, name in enumerate(names):
            for key, patterns in series:
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    groups[key].append(i)
                    break
    claimed = {i for cols in groups.values() for i in cols}
    dropped = [n for i, n in enumerate(names) if i not in claimed]
    out = {}
    for key, cols in groups.items():
        if cols:
            arr = table[:, cols]
            out[key] = ([names[i] for i in cols], arr.astype(dtype) if dtype else arr)
    return out, dropped


def read_csv_episode(path: str, series: list[tuple[str, list[str]]] | None = None,
                     dtype: str | None = None) -> RobotEpisode:
    """Numeric columns of a CSV with a header; text columns are reported in ``dropped``."""
    name = os.path.splitext(os.path.basename(path))[0]
    episode = RobotEpisode(name, path, nbytes=_size(path))
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        episode.problem = ("bad-series", f"{path}: cannot read the CSV ({exc})")
        return episode
    if not rows or not rows[0]:
        episode.problem = ("bad-series", f"{path}: empty CSV; one header row then one row per step is expected")
        return episode
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body) if len(r) != len(header))
        episode.problem = ("bad-series", f"{path} line {bad + 2}: {len(body[bad])} fields, the header has "
                                         f"{len(header)}")
        return episode
    numeric, names, dropped = [], [], []
    for j, col in enumerate(header):
        try:
            numeric.append([float(r[j]) if r[j].strip() else math.nan for r in body])
            names.append(col)
        except ValueError:
            dropped.append(col)
    table = np.array(numeric, dtype=np.float64).T.reshape(len(body), len(names))
    episode.columns, more = _group(names, table, series or [], dtype)
    episode.dropped = dropped + more
    return episode


def read_npz_episode(path: str, series: list[tuple[str, list[str]]] | None = None,
                     dtype: str | None = None) -> RobotEpisode:
    """An NPZ converted from a CSV: 1-D arrays are named columns; 2-D ``[steps, k]`` arrays are series of their own.

    ``data`` + ``columns`` (a 2-D table and its column names) is read as the CSV it came from.
    """
    name = os.path.splitext(os.path.basename(path))[0]
    episode = RobotEpisode(name, path, nbytes=_size(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        episode.problem = ("bad-series", f"{path}: cannot read the NPZ ({str(exc)[:200]})")
        return episode
    names: list[str] = []
    columns: list[np.ndarray] = []
    if "data" in arrays and "columns" in arrays and arrays["data"].ndim == 2:
        names += [str(c) for c in arrays.pop("columns").tolist()]
        columns += list(arrays.pop("data").T)
    own: dict[str, tuple[list[str], np.ndarray]] = {}
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            episode.dropped.append(key)
        elif arr.ndim == 1:
            names.append(key)
            columns.append(arr)
        elif arr.ndim == 2:
            own[key] = ([f"{key}_{i}" for i in range(arr.shape[1])], arr.astype(dtype) if dtype else arr)
        else:
            episode.dropped.append(key)
    if columns:
        if len({len(c) for c in columns}) != 1:
            episode.problem = ("bad-series", f"{path}: 1-D arrays of different lengths; one value per step is expected")
            return episode
        dt = np.result_type(*columns)
        table = np.stack([c.astype(dt) for c in columns], axis=1)
        grouped, more = _group(names, table, series or [], dtype)
        episode.columns.update(grouped)
        episode.dropped += more
    episode.columns.update(own)
    return episode


def read_robomimic(path: str, dtype: str | None = None) -> tuple[list[RobotEpisode], list[str]]:
    """Episodes ``data/demo_N`` of a robomimic HDF5 file: ``actions``, ``states``, ``rewards``,
    ``dones`` and ``obs/<key>`` (as series ``obs.<key>``) with at most 2 dimensions.

    Returns the episodes (by demo number) and notes on what was not stored.
    """
    import h5py

    notes: list[str] = []
    episodes = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise IngestError(f"{path}: no 'data' group; a robomimic file holds data/demo_N/{{actions,states,obs}}")
        demos = sorted(f["data"].keys(), key=lambda k: (int(m.group()) if (m := re.search(r"\d+", k)) else -1, k))
        skipped: Counter[str] = Counter()
        for demo in demos:
            group = f["data"][demo]
            episode = RobotEpisode(demo, f"{path}:data/{demo}")
            items = [(k, group[k]) for k in ("actions", "states", "rewards", "dones") if k in group]
            if "obs" in group:
                items += [(f"obs.{k}", group["obs"][k]) for k in sorted(group["obs"].keys())]
            for key, ds in items:
                if not isinstance(ds, h5py.Dataset) or ds.ndim > 2 or ds.dtype.kind not in "biuf":
                    skipped[key] += 1
                    continue
                arr = ds[()]
                arr = arr.reshape(len(arr), -1)
                cols = [f"{key}_{i}" for i in range(arr.shape[1])] if arr.shape[1] > 1 else [key]
                episode.columns[key] = (cols, arr.astype(dtype) if dtype else arr)
                episode.nbytes += arr.nbytes
            episodes.append(episode)
        for key, n in skipped.items():
            notes.append(f"{key} not stored in {n} demo(s): only numeric arrays of 1 or 2 dimensions become series")
    return episodes, notes


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _read_one(args: tuple[str, str, list[tuple[str, list[str]]], str | None]) -> RobotEpisode:
    path, fmt, series, dtype = args
    return read_csv_episode(path, series, dtype) if fmt == "csv" else read_npz_episode(path, series, dtype)


def _read_source(source: str, kind: str, groups: list[tuple[str, list[str]]], dtype: str | None,
                 options: IngestOptions, what: str) -> tuple[list[RobotEpisode], list[str]]:
    if kind == "hdf5":
        return read_robomimic(source, dtype)
    paths = sorted(os.path.join(source, n) for n in os.listdir(source) if n.endswith(f".{kind}"))
    with tqdm(total=len(paths), unit="file", desc=what, disable=not options.progress or None) as bar:
        return list(parallel_map(_read_one, [(p, kind, groups, dtype) for p in paths], options.n_workers,
                                 bar.update)), []


def _detect(source: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.path.isfile(source):
        if source.endswith((".hdf5", ".h5", ".he5")):
            return "hdf5"
        raise IngestError(f"{source}: give a folder of per-episode CSV/NPZ files or a robomimic .hdf5 file")
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    names = os.listdir(source)
    csvs, npzs = sum(n.endswith(".csv") for n in names), sum(n.endswith(".npz") for n in names)
    if not csvs and not npzs:
        raise IngestError(f"{source}: no .csv or .npz files; one file per episode is expected")
    return "csv" if csvs >= npzs else "npz"


def _check(episodes: list[RobotEpisode], allow_nonfinite: bool) -> tuple[list[RobotEpisode], list[Problem]]:
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
            problems.append(Problem(e.path, "bad-series", f"{e.path}: columns differ from the other episodes' "
                                    f"({[k for k, _ in sig]} vs {[k for k, _ in majority]})"))
            continue
        if not allow_nonfinite and any(not np.isfinite(a).all() for _, a in e.columns.values() if a.dtype.kind == "f"):
            problems.append(Problem(e.path, "nonfinite", f"{e.path}: holds NaN/Inf or empty cells; fix it or pass "
                                    "--allow-nonfinite"))
            continue
        kept.append(e)
    return kept, problems


def ingest_robot(
    source: str,
    options: IngestOptions,
    fmt: str = "auto",
    series: list[str] | None = None,
    dtype: str | None = None,
) -> IngestReport:
    """Create a store from robot data: the catalog plus one series per key, column names kept.

    Args:
        source: a folder of ``<episode>.csv`` / ``<episode>.npz`` files, or a robomimic ``.hdf5`` file.
        options: ``out`` (new store) and the shared options; ``into`` is not supported.
        fmt: ``auto``, ``csv``, ``npz`` or ``hdf5``.
        series: ``KEY=PATTERN,...`` groups of CSV/NPZ columns (default: all in series ``data``).
        dtype: store every series as this dtype (e.g. ``float32``) instead of the source's.
    """
    started = time.perf_counter()
    if options.into:
        raise IngestError("robot data makes a new store's catalog: use --out STORE (then add features with --into)")
    target = options.target
    report = IngestReport(source=source, store=target, kind="robot", dry_run=options.dry_run)
    report.store_before = store_usage(target)
    kind = _detect(source, fmt)
    groups = parse_series_spec(series)
    episodes, notes = _read_source(source, kind, groups, dtype, options, "read")
    report.notes += notes
    report.files_found = 1 if kind == "hdf5" else len(episodes)
    report.source_bytes = _size(source) if kind == "hdf5" else sum(e.nbytes for e in episodes)
    kept, report.problems = _check(episodes, options.allow_nonfinite)
    dropped = Counter(c for e in kept for c in e.dropped)
    if dropped:
        report.notes.append("columns not stored (text, or claimed by no --series pattern): "
                            + ", ".join(f"{c} ({n} files)" for c, n in dropped.most_common(10)))
    if options.strict and report.problems:
        raise IngestError(f"--strict: {len(report.problems)} problem(s) in {source}; nothing written",
                          report.problems, report)
    if kept:
        report.series = {k: list(c) for k, (c, _) in sorted(kept[0].columns.items())}
    report.episodes = len(kept)
    steps = [len(next(iter(e.columns.values()))[1]) for e in kept]
    report.episode_rows = {e.name: n for e, n in zip(kept, steps, strict=True)}
    report.steps = sum(steps)
    data = [EpisodeData(e.name, {k: a for k, (_, a) in e.columns.items()}) for e in kept]
    columns = {k: c for k, c in report.series.items()}
    report.estimated_bytes = sum(a.nbytes for e in data for a in e.series.values())
    report.estimated_files = 8 + 2 * len(columns)
    if options.dry_run:
        report.seconds = time.perf_counter() - started
        return report
    if not kept:
        raise IngestError(f"{source}: no usable episode; see the problems above", report.problems)
    store, created = open_or_create_store(target, data, columns, same=lambda s: _same_series(s, data))
    if not created:
        report.notes.append("the store already holds exactly this robot data (an earlier run finished): nothing to do")
    report.files_ingested = len(kept) if kind != "hdf5" else 1
    report.store_after = store_usage(target)
    if options.verify:  # against a fresh read of the source files, not the copy in memory
        again, _ = _read_source(source, kind, groups, dtype, options, "verify")
        by_name = {e.name: e for e in again}
        fresh = [EpisodeData(e.name, {k: a for k, (_, a) in by_name[e.name].columns.items()}) for e in kept]
        report.verify = _verify_series(store, fresh)
    report.seconds = time.perf_counter() - started
    return report


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
        for e, ep in enumerate(data):
            lo, hi = store.catalog.step_range(e)
            source = np.asarray(ep.series[key])
            source = source.reshape(len(source), -1)
            if source.dtype != stored.dtype:  # the store widens ints and mixed float widths, losslessly
                source = source.astype(stored.dtype)
            part = stored[lo:hi]
            checked += 1
            if part.shape != source.shape or part.tobytes() != source.tobytes():
                mismatches.append(f"series {key!r} of episode {ep.name!r} differs from its source")
    return {"rows_checked": checked, "rows_missing": 0, "mismatches": mismatches, "ok": not mismatches}
