"""``vlastore ingest lerobot``: a store from a LeRobot v3.0 dataset (what format v1 can hold) and a report."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from ...format import FormatError
from ...store import EpisodeData, VLAStore
from ..features import IngestOptions, open_or_create_store, store_usage
from ..report import IngestError, IngestReport
from .data import read_lerobot
from .layout import DEFAULT_NAME_PATTERN, LeRobotImport

__all__ = ["ingest_lerobot"]


def ingest_lerobot(
    root: str | os.PathLike[str],
    options: IngestOptions,
    name_pattern: str = DEFAULT_NAME_PATTERN,
    dtype: str | None = None,
    metadata_json: str | None = None,
) -> IngestReport:
    """Create a store from a local LeRobot v3.0 dataset: catalog + one series per numeric feature.

    What a v1 store cannot hold yet (fps, the task table and per-episode tasks, video segments, stats,
    robot type) is listed in the report's notes and written to ``metadata_json`` when given.

    Args:
        root: the dataset folder.
        options: an :class:`~vlastore.ingest.IngestOptions` with ``out`` (``into`` is refused).
        name_pattern: store name of each episode.
        dtype: store every series as this dtype instead of the dataset's.
        metadata_json: also write :meth:`LeRobotImport.metadata` here.

    Raises:
        IngestError: nothing usable, ``--strict`` with problems, or ``out`` holds another store.
    """
    started = time.perf_counter()
    if options.into:
        raise IngestError("a LeRobot dataset makes a new store's catalog: use --out STORE")
    target = options.target
    report = IngestReport(source=str(root), store=target, kind="lerobot", dry_run=options.dry_run)
    report.store_before = store_usage(target)
    imported = read_lerobot(root, name_pattern, dtype, options.allow_nonfinite, options.progress)
    report.problems = imported.problems
    report.notes += imported.notes
    report.files_found = imported.files_found
    report.files_usable = imported.files_read
    report.source_bytes = imported.source_bytes
    report.series = dict(imported.columns)
    report.episodes = len(imported.episodes)
    report.episode_rows = {e.name: e.step_count() for e in imported.episodes}
    report.steps = sum(report.episode_rows.values())
    report.notes.append(_pending_note(imported))
    report.estimated_bytes = sum(a.nbytes for e in imported.episodes for a in e.series.values())
    report.estimated_files = 8 + 2 * len(imported.columns)
    if options.strict and report.problems:
        raise IngestError(
            f"--strict: {len(report.problems)} problem(s) in {root}; nothing written", report.problems, report
        )
    if options.dry_run:
        report.seconds = time.perf_counter() - started
        return report
    if not imported.episodes:
        raise IngestError(f"{root}: no usable episode; see the problems below", report.problems, report)
    try:
        store, created = open_or_create_store(
            target,
            imported.episodes,
            imported.columns,
            same=lambda s: _verify(s, imported.episodes)["ok"],
            allow_nonfinite=options.allow_nonfinite,
            format_version=options.format_version,
        )
    except FormatError as exc:  # the data, checked above, is what the store refused: a data problem
        raise IngestError(f"{target}: {exc}", report.problems, report) from None
    if not created:
        report.notes.append("the store already holds exactly this dataset (an earlier run finished): nothing to do")
    if metadata_json:  # only next to a store that holds these episodes
        with open(metadata_json, "w") as f:
            json.dump(imported.metadata(), f, indent=1, default=_json_default)
            f.write("\n")
    report.files_ingested = imported.files_read
    report.store_after = store_usage(target)
    if options.verify:  # against a fresh read of the Parquet files, not the copy in memory
        again = read_lerobot(root, name_pattern, dtype, options.allow_nonfinite)
        kept = {e.name for e in imported.episodes}
        report.verify = _verify(store, [e for e in again.episodes if e.name in kept], expected=len(kept))
    report.seconds = time.perf_counter() - started
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)


def _pending_note(imported: LeRobotImport) -> str:
    n_tasks = len(imported.tasks)
    cams = imported.video_keys
    return (
        f"stored: catalog, series {sorted(imported.columns)}; kept only in --metadata-json until the store "
        f"format has per-episode metadata: fps {imported.fps:g}, {n_tasks} task string(s) and each episode's "
        f"tasks, video segments of {len(cams)} camera(s){' ' + str(cams) if cams else ''}, "
        f"{'stats.json, ' if imported.meta.stats else ''}robot_type, LeRobot episode indices. Videos are not "
        "decoded: add image features with vlastore build-features STORE --lerobot-root ROOT"
    )


def _verify(store: VLAStore, data: list[EpisodeData], expected: int | None = None) -> dict[str, Any]:
    """Every series of every episode compared bit-exactly (at the store's dtype) with ``data``."""
    mismatches = []
    checked = 0
    if set(store.series_keys) != ({k for e in data for k in e.series} or set(store.series_keys)):
        return {
            "rows_checked": 0,
            "rows_missing": 0,
            "ok": False,
            "mismatches": [f"series {sorted(store.series_keys)} differ from the source's"],
        }
    position = {name: i for i, name in enumerate(store.datasets)}
    stored_all = {key: store.series_all(key) for key in store.series_keys}  # one read per series, not per episode
    for episode in data:
        if episode.name not in position:
            mismatches.append(f"episode {episode.name!r} is not in the store")
            continue
        lo, hi = store.catalog.step_range(position[episode.name])
        for key, source in episode.series.items():
            stored = stored_all[key][lo:hi]
            source = np.asarray(source).reshape(len(source), -1)
            if source.dtype != stored.dtype:  # the store widens ints and bools, losslessly
                source = source.astype(stored.dtype)
            checked += 1
            if stored.shape != source.shape or stored.tobytes() != source.tobytes():
                mismatches.append(f"series {key!r} of episode {episode.name!r} differs from its source")
    missing = 0 if expected is None else expected - len(data)
    if missing:
        mismatches.append(f"{missing} episode(s) could not be read again from the source")
    return {"rows_checked": checked, "rows_missing": missing, "mismatches": mismatches, "ok": not mismatches}
