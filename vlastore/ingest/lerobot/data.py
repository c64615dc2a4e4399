"""Read ``data/`` of a LeRobot v3.0 dataset, one Parquet file at a time, into episodes and series."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...store import EpisodeData
from ..report import Problem
from .layout import (
    BOOKKEEPING_COLUMNS,
    DEFAULT_NAME_PATTERN,
    TASKS_PATH,
    LeRobotEpisode,
    LeRobotFeature,
    LeRobotFormatError,
    LeRobotImport,
    series_key_for,
)
from .meta import BATCH_ROWS, file_problem, open_parquet, read_lerobot_meta

__all__ = ["read_lerobot", "read_column"]


def _to_matrix(array: Any, width: int, key: str) -> np.ndarray:
    """An Arrow column of scalars or (nested, fixed or variable) lists -> ``[rows, width]`` numpy.

    Raises:
        ValueError: nulls, ragged lists, a non-numeric type, or a width other than info.json's shape.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = len(array)
    values = array.storage if isinstance(array.type, pa.ExtensionType) else array
    while (
        pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)
    ):
        if values.null_count:
            raise ValueError(f"column {key!r} has empty (null) cells")
        if not pa.types.is_fixed_size_list(values.type) and len(values):
            lengths = pc.list_value_length(values)
            low, high = pc.min(lengths).as_py(), pc.max(lengths).as_py()
            if low != high:
                raise ValueError(
                    f"column {key!r} holds lists of {low} to {high} values; info.json's shape needs one length"
                )
        values = values.flatten()
        if isinstance(values.type, pa.ExtensionType):
            values = values.storage
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)):
        raise ValueError(f"column {key!r} is {array.type}, not numbers")
    if values.null_count:
        raise ValueError(f"column {key!r} has empty (null) cells")
    flat = values.to_numpy(zero_copy_only=False)
    if flat.size != rows * width:
        raise ValueError(
            f"column {key!r} holds {flat.size // max(rows, 1)} values per frame; info.json's shape says {width}"
        )
    return flat.reshape(rows, width)


@dataclass
class _Gathered:
    """Rows of one episode collected from its data file, batch by batch."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    index: list[np.ndarray] = field(default_factory=list)
    frame: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    closed: bool = False
    problem: tuple[str, str] | None = None


def _read_data_file(
    root: Path, rel: str, episodes: dict[int, LeRobotEpisode], numeric: list[LeRobotFeature], listed: set[int]
) -> tuple[dict[int, _Gathered], list[str], int, tuple[str, str] | None]:
    """Numeric columns of the episodes one data file holds.

    Returns ``(gathered by episode index, notes, file bytes, file problem)``: a file problem means none of
    its episodes could be read.
    """
    import pyarrow as pa

    path = root / rel
    try:
        pf, handle = open_parquet(path)
    except (OSError, ValueError) as exc:
        return {}, [], 0, file_problem(path, exc, root)
    with handle:
        nbytes = os.fstat(handle.fileno()).st_size
        wanted, problem = _wanted_columns(set(pf.schema_arrow.names), numeric, rel)
        if problem is not None:
            return {}, [], nbytes, problem
        gather = _FileGather(rel, episodes, numeric)
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["episode_index", *wanted]):
                problem = gather.add_batch(batch, wanted)
                if problem is not None:
                    return {}, [], nbytes, problem
        except (pa.ArrowException, OSError) as exc:
            return {}, [], nbytes, ("corrupt", f"{rel}: cannot be read ({str(exc).splitlines()[0][:200]})")
    return gather.gathered, gather.notes(listed), nbytes, None


def _wanted_columns(
    have: set[str], numeric: list[LeRobotFeature], rel: str
) -> tuple[list[str], tuple[str, str] | None]:
    """Columns to read besides ``episode_index`` (numeric features, then bookkeeping), or why the file is unusable."""
    if "episode_index" not in have:
        return [], ("bad-series", f"{rel}: no episode_index column; not a v3.0 data file")
    absent = [f.key for f in numeric if f.key not in have]
    if absent:
        return [], ("bad-series", f"{rel}: no column(s) {absent}, which meta/info.json lists")
    return [f.key for f in numeric] + [c for c in BOOKKEEPING_COLUMNS if c in have and c != "episode_index"], None


def _batch_columns(
    batch: Any, numeric: list[LeRobotFeature], wanted: list[str]
) -> tuple[dict[str, np.ndarray], str | None]:
    """The numeric features (``[rows, width]``) and ``index``/``frame_index`` of a batch, or the first failure."""
    columns: dict[str, np.ndarray] = {}
    try:
        for f in numeric:
            columns[f.key] = _to_matrix(batch.column(f.key), f.width, f.key)
        for col in ("index", "frame_index"):
            if col in wanted:
                columns[col] = _to_matrix(batch.column(col), 1, col)[:, 0].astype(np.int64)
    except ValueError as exc:
        return columns, str(exc)
    return columns, None


class _FileGather:
    """Rows of one data file sorted into its episodes, batch by batch, checking each episode's rows are contiguous."""

    def __init__(self, rel: str, episodes: dict[int, LeRobotEpisode], numeric: list[LeRobotFeature]) -> None:
        self.rel = rel
        self.episodes = episodes
        self.numeric = numeric
        self.gathered = {i: _Gathered() for i in episodes}
        self.foreign: Counter[int] = Counter()
        """Rows of episodes meta/episodes does not place in this file."""
        self.previous: int | None = None

    def add_batch(self, batch: Any, wanted: list[str]) -> tuple[str, str] | None:
        """Sort one batch's rows into episodes; a problem of the whole file (no episode_index) is returned."""
        owner = batch.column(0)
        if owner.null_count:
            return ("bad-series", f"{self.rel}: empty episode_index cells")
        owner_np = owner.to_numpy(zero_copy_only=False).astype(np.int64)
        columns, failure = _batch_columns(batch, self.numeric, wanted)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(owner_np)) + 1, [len(owner_np)]])
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            self._add_run(int(owner_np[lo]), lo, hi, columns, failure)
        return None

    def _add_run(self, ep: int, lo: int, hi: int, columns: dict[str, np.ndarray], failure: str | None) -> None:
        """Rows ``lo:hi`` of the batch, all of episode ``ep``."""
        if self.previous is not None and self.previous != ep and self.previous in self.gathered:
            self.gathered[self.previous].closed = True  # another episode began: this one must not come back
        self.previous = ep
        g = self.gathered.get(ep)
        if g is None:
            self.foreign[ep] += hi - lo
            return
        if g.problem is None:
            g.problem = self._run_problem(ep, g, hi - lo, failure)
        if g.problem is not None:
            g.parts.clear()
            return
        for f in self.numeric:
            g.parts.setdefault(f.key, []).append(columns[f.key][lo:hi])
        if "index" in columns:
            g.index.append(columns["index"][lo:hi])
        if "frame_index" in columns:
            g.frame.append(columns["frame_index"][lo:hi])
        g.rows += hi - lo

    def _run_problem(self, ep: int, g: _Gathered, rows: int, failure: str | None) -> tuple[str, str] | None:
        if g.closed:
            return ("bad-series", f"{self.rel}: the rows of episode {ep} are not contiguous")
        if failure is not None:
            return ("bad-series", f"{self.rel}: {failure}")
        if g.rows + rows > self.episodes[ep].length:
            return (
                "bad-series",
                f"{self.rel}: episode {ep} has more than the {self.episodes[ep].length} frames meta/episodes gives it",
            )
        return None

    def notes(self, listed: set[int]) -> list[str]:
        """Notes on rows of episodes this file should not hold (listed elsewhere, or not at all)."""
        notes = []
        elsewhere = sorted(ep for ep in self.foreign if ep in listed)
        unlisted = sorted(ep for ep in self.foreign if ep not in listed)
        if elsewhere:
            notes.append(
                f"{self.rel}: rows of episode(s) {elsewhere[:10]} that meta/episodes places in another file "
                "were ignored"
            )
        if unlisted:
            notes.append(
                f"{self.rel}: {sum(self.foreign[e] for e in unlisted)} rows of episode(s) {unlisted[:10]} "
                "that meta/episodes does not list were ignored"
            )
        return notes


def _finish(
    episode: LeRobotEpisode, g: _Gathered, numeric: list[LeRobotFeature], rel: str, allow_nonfinite: bool
) -> tuple[dict[str, np.ndarray] | None, tuple[str, str] | None]:
    """Concatenate and check one episode: frame count, ``index`` and ``frame_index`` against meta/episodes."""
    if g.problem is not None:
        return None, g.problem
    if g.rows != episode.length:
        return None, (
            "bad-series",
            f"{rel}: episode {episode.episode_index} has {g.rows} frames, meta/episodes says {episode.length}",
        )
    if g.index:
        index = np.concatenate(g.index)
        if not np.array_equal(index, np.arange(episode.dataset_from_index, episode.dataset_to_index)):
            return None, (
                "bad-series",
                f"{rel}: episode {episode.episode_index}: the index column runs "
                f"{index[0]}..{index[-1]}, meta/episodes says dataset_from_index "
                f"{episode.dataset_from_index} .. dataset_to_index {episode.dataset_to_index}",
            )
    if g.frame and not np.array_equal(np.concatenate(g.frame), np.arange(episode.length)):
        return None, (
            "bad-series",
            f"{rel}: episode {episode.episode_index}: frame_index is not 0..{episode.length - 1} in order",
        )
    series = {f.key: np.concatenate(g.parts[f.key]) for f in numeric}
    if not allow_nonfinite:
        for key, values in series.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                row = int(np.argwhere(~np.isfinite(values))[0][0])
                return None, (
                    "nonfinite",
                    f"{rel}: episode {episode.episode_index} {key!r} holds NaN/Inf (frame "
                    f"{row}); fix it or pass --allow-nonfinite",
                )
    return series, None


def read_lerobot(
    root: str | os.PathLike[str],
    name_pattern: str = DEFAULT_NAME_PATTERN,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> LeRobotImport:
    """Read a local LeRobot v3.0 dataset into episodes, series and metadata (writes nothing).

    Every numeric feature of ``meta/info.json`` (``observation.state``, ``action``, ``timestamp``,
    ``task_index``, ...) becomes a series ``[steps, prod(shape)]`` named by :func:`series_key_for`, with
    info.json's names as column names. ``episode_index``, ``index`` and ``frame_index`` are checked
    against meta/episodes and the catalog instead of being stored. Videos are not decoded.

    An episode whose rows do not match meta/episodes (count, ``index`` offsets, order) or whose data
    file is missing or not Parquet is skipped with a :class:`~vlastore.ingest.Problem`.

    Args:
        root: the dataset folder.
        name_pattern: store name of each episode (``{episode_index}``).
        dtype: cast every series to this dtype (``float32``/``float64``); default: as stored.
        allow_nonfinite: keep episodes with NaN/Inf values.
        progress: a progress bar over the data files.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        FormatError: a bad ``name_pattern``.
        LeRobotFormatError: not a v3.0 dataset (info.json, tasks or the episodes table unusable).
    """
    meta = read_lerobot_meta(root, name_pattern)
    root = meta.root
    numeric = [f for f in meta.features.values() if f.kind == "numeric" and f.key not in BOOKKEEPING_COLUMNS]
    series_keys: dict[str, str] = {}
    for f in numeric:
        key = series_key_for(f.key)
        if key in series_keys.values():
            raise LeRobotFormatError(
                f"features {[k for k, v in series_keys.items() if v == key] + [f.key]} all map "
                f"to the series key {key!r}; rename one in meta/info.json"
            )
        series_keys[f.key] = key
    columns = {series_keys[f.key]: f.columns(series_keys[f.key]) for f in numeric}
    problems = list(meta.problems)
    notes = list(meta.notes)
    skipped = [f"{k} ({f.dtype})" for k, f in meta.features.items() if f.kind in ("image", "other")]
    if skipped:
        notes.append("features not stored (not numbers; images inside Parquet are not decoded): " + ", ".join(skipped))
    by_file: dict[str, dict[int, LeRobotEpisode]] = {}
    for episode in meta.episodes:
        by_file.setdefault(episode.data_path, {})[episode.episode_index] = episode
    listed = {e.episode_index for e in meta.episodes}
    result: dict[int, dict[str, np.ndarray]] = {}
    files_read = 0
    nbytes = meta.meta_bytes
    from tqdm import tqdm

    with tqdm(total=len(by_file), unit="file", desc="read", disable=not progress or None) as bar:
        for rel in sorted(by_file, key=_natural):
            episodes = by_file[rel]
            gathered, file_notes, size, failure = _read_data_file(root, rel, episodes, numeric, listed)
            notes += file_notes
            nbytes += size
            bar.update()
            if failure is not None:
                for episode in episodes.values():
                    problems.append(Problem(rel, failure[0], f"{failure[1]} (episode {episode.episode_index} skipped)"))
                continue
            files_read += 1
            for index, episode in episodes.items():
                series, problem = _finish(episode, gathered[index], numeric, rel, allow_nonfinite)
                gathered[index] = _Gathered()  # let the batches go as soon as the episode is assembled
                if problem is not None:
                    problems.append(Problem(rel, *problem))
                else:
                    assert series is not None
                    result[index] = series
    data: list[EpisodeData] = []
    timestamps: dict[str, np.ndarray] = {}
    task_index: dict[str, np.ndarray] = {}
    for episode in meta.episodes:
        if episode.episode_index not in result:
            continue
        series = result.pop(episode.episode_index)
        if "timestamp" in series:
            timestamps[episode.name] = series["timestamp"][:, 0].copy()
        else:
            timestamps[episode.name] = np.arange(episode.length, dtype=np.float64) / meta.fps
        if "task_index" in series:
            task_index[episode.name] = series["task_index"][:, 0].astype(np.int64)
            unknown = sorted(set(np.unique(task_index[episode.name]).tolist()) - set(meta.tasks))
            if unknown:
                notes.append(f"episode {episode.episode_index}: task_index {unknown[:5]} not in {TASKS_PATH}")
        else:
            task_index[episode.name] = np.zeros(episode.length, dtype=np.int64)
        stored = {series_keys[k]: (v.astype(dtype) if dtype else v) for k, v in series.items()}
        # episode metadata (kept by format 2): the first task is the episode's task, all of them in attrs
        data.append(
            EpisodeData(
                episode.name,
                stored,
                steps=episode.length,
                task=episode.tasks[0] if episode.tasks else None,
                fps=float(meta.fps),
                attrs={"tasks": list(episode.tasks)} if len(episode.tasks) > 1 else None,
            )
        )
    return LeRobotImport(
        meta,
        data,
        columns,
        series_keys,
        timestamps,
        task_index,
        problems,
        notes,
        files_found=len(by_file),
        files_read=files_read,
        source_bytes=nbytes,
    )


def _natural(path: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


def read_column(
    root: str | os.PathLike[str], rel: str, key: str, episodes: dict[int, LeRobotEpisode]
) -> dict[int, np.ndarray]:
    """One numeric scalar column (e.g. ``task_index``) of the episodes a data file holds, checked like
    :func:`read_lerobot` checks them: ``{episode_index: [steps]}``.

    Raises:
        LeRobotFormatError: the file, the column or an episode's rows are not usable.
    """
    feature = LeRobotFeature(key, "float64", (1,), None)
    gathered, _, _, failure = _read_data_file(Path(root), rel, episodes, [feature], set(episodes))
    if failure is not None:
        raise LeRobotFormatError(failure[1])
    out = {}
    for index, episode in episodes.items():
        series, problem = _finish(episode, gathered[index], [feature], rel, allow_nonfinite=True)
        if problem is not None or series is None:
            raise LeRobotFormatError(problem[1] if problem else f"{rel}: episode {index} unreadable")
        out[index] = series[key][:, 0]
    return out
