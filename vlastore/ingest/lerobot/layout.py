"""The LeRobot v3.0 on-disk layout: path constants, what info.json and meta/episodes say, the result types.

Pure: no file is opened here (:mod:`.meta` and :mod:`.data` read, :mod:`.ingest` writes).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ...format import FormatError, validate_name
from ...store import EpisodeData
from ..report import IngestError, Problem

__all__ = [
    "LeRobotFeature",
    "VideoSegment",
    "LeRobotEpisode",
    "LeRobotMeta",
    "LeRobotImport",
    "LeRobotFormatError",
    "series_key_for",
    "check_name_pattern",
    "episode_name",
    "DEFAULT_NAME_PATTERN",
    "BOOKKEEPING_COLUMNS",
    "INFO_PATH",
    "STATS_PATH",
    "TASKS_PATH",
    "EPISODES_DIR",
    "DEFAULT_DATA_PATH",
    "DEFAULT_VIDEO_PATH",
]

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
DEFAULT_NAME_PATTERN = "episode_{episode_index:06d}"
"""Store name of LeRobot episode ``i`` (``str.format`` with ``{episode_index}``)."""
BOOKKEEPING_COLUMNS = ("episode_index", "index", "frame_index")
"""Checked against the catalog, not stored: the catalog already says episode and step."""
NUMERIC_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
_NOT_NAME = re.compile(r"[^A-Za-z0-9._\-+=@,:~]")


class LeRobotFormatError(IngestError):
    """The folder is not a readable LeRobot v3.0 dataset (a data problem: exit status 1)."""


@dataclass(frozen=True)
class LeRobotFeature:
    """One entry of ``meta/info.json``'s ``features``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    names: tuple[str, ...] | None
    """Column names flattened in row-major order, when info.json gives one per value."""

    @property
    def kind(self) -> str:
        """``numeric``, ``video``, ``image`` or ``other`` (strings, language columns, ...)."""
        if self.dtype in ("video", "image"):
            return self.dtype
        return "numeric" if self.dtype in NUMERIC_DTYPES else "other"

    @property
    def width(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def columns(self, series_key: str) -> list[str]:
        """Column names of the series: info.json's names, else ``<key>`` (one value) or ``<key>_<i>``."""
        if self.names is not None and len(self.names) == self.width:
            return list(self.names)
        return [series_key] if self.width == 1 else [f"{series_key}_{i}" for i in range(self.width)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "names": None if self.names is None else list(self.names),
        }


@dataclass(frozen=True)
class VideoSegment:
    """Where one episode's frames of one camera are: a file and a time range inside it."""

    path: str
    """Relative to the dataset root (POSIX separators)."""
    from_timestamp: float
    to_timestamp: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "from_timestamp": self.from_timestamp, "to_timestamp": self.to_timestamp}


@dataclass
class LeRobotEpisode:
    """One row of ``meta/episodes``: where the episode's frames are."""

    episode_index: int
    name: str
    length: int
    tasks: list[str]
    data_path: str
    """Relative to the root."""
    dataset_from_index: int
    dataset_to_index: int
    videos: dict[str, VideoSegment] = field(default_factory=dict)


@dataclass
class LeRobotMeta:
    """Everything under ``meta/``, checked (no frame data)."""

    root: Path
    codebase_version: str
    fps: float
    robot_type: str | None
    features: dict[str, LeRobotFeature]
    tasks: dict[int, str]
    """task_index -> task string (``meta/tasks.parquet``)."""
    episodes: list[LeRobotEpisode]
    """Usable episodes, by episode index."""
    stats: dict[str, Any] | None
    info: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta_bytes: int = 0

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.kind == "video"]

    def episode(self, name: str) -> LeRobotEpisode:
        """The episode a store names ``name``.

        Raises:
            KeyError: no episode of that name (names come from the name pattern).
        """
        for episode in self.episodes:
            if episode.name == name:
                return episode
        raise KeyError(
            f"no LeRobot episode named {name!r} in {self.root} (episode names are made by the name "
            f"pattern, default {DEFAULT_NAME_PATTERN!r}; use the one the store was ingested with)"
        )


@dataclass
class LeRobotImport:
    """A LeRobot dataset read into what a store is made of, plus the metadata v1 stores cannot hold yet."""

    meta: LeRobotMeta
    episodes: list[EpisodeData]
    """One per usable LeRobot episode, in episode-index order; series by vlastore key."""
    columns: dict[str, list[str]]
    """Series key -> column names."""
    series_keys: dict[str, str]
    """LeRobot feature key -> vlastore series key (the same when it is a valid name)."""
    timestamps: dict[str, np.ndarray]
    """Episode name -> ``[steps]`` seconds (the ``timestamp`` column)."""
    task_index: dict[str, np.ndarray]
    """Episode name -> ``[steps]`` task index of every frame."""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_found: int = 0
    files_read: int = 0
    source_bytes: int = 0

    @property
    def fps(self) -> float:
        return self.meta.fps

    @property
    def features(self) -> dict[str, LeRobotFeature]:
        return self.meta.features

    @property
    def tasks(self) -> dict[int, str]:
        """The task table: task_index -> task string."""
        return self.meta.tasks

    @property
    def video_keys(self) -> list[str]:
        return self.meta.video_keys

    @property
    def episode_tasks(self) -> dict[str, list[str]]:
        """Episode name -> its task strings (meta/episodes ``tasks``)."""
        kept = {e.name for e in self.episodes}
        return {e.name: list(e.tasks) for e in self.meta.episodes if e.name in kept}

    @property
    def videos(self) -> dict[str, dict[str, VideoSegment]]:
        """Camera key -> episode name -> its video file and time range."""
        kept = {e.name for e in self.episodes}
        return {
            key: {e.name: e.videos[key] for e in self.meta.episodes if e.name in kept and key in e.videos}
            for key in self.video_keys
        }

    def step_tasks(self, name: str) -> list[str]:
        """The task string of every step of episode ``name``."""
        return [self.tasks.get(int(i), "") for i in self.task_index[name]]

    def metadata(self) -> dict[str, Any]:
        """JSON-able metadata that a v1 store has no place for (``--metadata-json``)."""
        kept = {e.name for e in self.episodes}
        return {
            "source": str(self.meta.root),
            "codebase_version": self.meta.codebase_version,
            "fps": self.fps,
            "robot_type": self.meta.robot_type,
            "features": {k: f.to_dict() for k, f in self.features.items()},
            "series_keys": dict(self.series_keys),
            "tasks": {str(i): t for i, t in sorted(self.tasks.items())},
            "episodes": {
                e.name: {
                    "episode_index": e.episode_index,
                    "length": e.length,
                    "tasks": list(e.tasks),
                    "videos": {k: v.to_dict() for k, v in e.videos.items()},
                }
                for e in self.meta.episodes
                if e.name in kept
            },
            "stats": self.meta.stats,
        }


# ------------------------------------------------------------------ names and paths


def series_key_for(feature_key: str) -> str:
    """The vlastore series key of a LeRobot feature: the same key when it is a valid store name
    (``observation.state``, ``action``, ``next.reward``), else every character outside letters, digits
    and ``._-+=@,:~`` (e.g. ``/`` or a space) becomes ``_`` and runs of dots collapse to one."""
    try:
        return validate_name(feature_key, "series key")
    except FormatError:
        key = re.sub(r"\.{2,}", ".", _NOT_NAME.sub("_", feature_key)).strip(".") or "feature"
        return validate_name(key, "series key")


def check_template(template: Any, what: str, fields: set[str]) -> str:
    """A path template of info.json, allowed only the given ``{fields}`` (ints or the video key)."""
    if not isinstance(template, str) or not template:
        raise LeRobotFormatError(f"meta/info.json: {what} must be a non-empty string, got {template!r}")
    try:
        parts = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        raise LeRobotFormatError(f"meta/info.json: {what} {template!r} is not a format string ({exc})") from None
    for name, spec, conversion in parts:
        # a width such as {chunk_index:03d} is fine; {chunk_index:999999999d} would allocate a huge string
        if name not in fields or conversion is not None or not re.fullmatch(r"(0?\d{1,2})?d?", spec or ""):
            raise LeRobotFormatError(
                f"meta/info.json: {what} {template!r} may only use {sorted(fields)} (with a width such as :03d)"
            )
    return template


def relative_path(path: str, what: str) -> str:
    """``path`` if it is a relative POSIX path that stays under the root; never absolute or with ``..``."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or any(ord(c) < 32 for c in path) or not pure.parts:
        raise LeRobotFormatError(f"{what} {path!r} leaves the dataset folder; only relative paths inside it are read")
    return str(pure)


def fill_path(template: str, what: str, **values: Any) -> str:
    return relative_path(template.format(**values), what)


def parse_features(info: dict[str, Any]) -> dict[str, LeRobotFeature]:
    raw = info.get("features")
    if not isinstance(raw, dict) or not raw:
        raise LeRobotFormatError("meta/info.json: no 'features' mapping; a LeRobot dataset lists its features there")
    out = {}
    for key, ft in raw.items():
        if not isinstance(key, str) or not key or not isinstance(ft, dict) or not isinstance(ft.get("dtype"), str):
            raise LeRobotFormatError(f"meta/info.json: feature {key!r} must be a mapping with a 'dtype' string")
        shape = ft.get("shape", [1])
        if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and 0 < d < 1 << 31 for d in shape):
            raise LeRobotFormatError(f"meta/info.json: feature {key!r} has shape {shape!r}; positive ints expected")
        out[key] = LeRobotFeature(key, ft["dtype"], tuple(shape), parse_names(ft.get("names")))
    return out


def parse_names(names: Any) -> tuple[str, ...] | None:
    """info.json ``names``: a list (maybe nested, for 2-D shapes), or ``{axis: [names]}`` with one list."""
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if not isinstance(names, list):
        return None
    flat: list[str] = []
    stack = list(reversed(names))
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str | int | float):
            flat.append(str(item)[:200])
        else:
            return None
        if len(flat) > 1 << 20:
            return None
    return tuple(flat)


def episode_name(pattern: str, index: int) -> str:
    try:
        name = pattern.format(episode_index=index)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise FormatError(
            f"--name-pattern {pattern!r}: {exc!r}; use {{episode_index}} (e.g. {DEFAULT_NAME_PATTERN!r})"
        ) from None
    return validate_name(name, "episode name (from --name-pattern)")


def check_name_pattern(pattern: str) -> str:
    """``pattern`` if it names episodes uniquely by ``{episode_index}``.

    Raises:
        FormatError: other fields, no ``{episode_index}``, or names that are not valid store names.
    """
    try:
        used = [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]
    except ValueError as exc:
        raise FormatError(f"--name-pattern {pattern!r}: {exc}") from None
    if used != ["episode_index"]:
        raise FormatError(
            f"--name-pattern {pattern!r}: use {{episode_index}} exactly once and no other field "
            f"(e.g. {DEFAULT_NAME_PATTERN!r} or 'pick_cup_{{episode_index}}')"
        )
    if episode_name(pattern, 0) == episode_name(pattern, 1):
        raise FormatError(f"--name-pattern {pattern!r} gives every episode the same name")
    return pattern
