"""Import a local LeRobot dataset (on-disk format v3.0) into a store.

The LeRobot layout (as ``lerobot.datasets`` writes it)::

    ROOT/meta/info.json                         fps, features {key: {dtype, shape, names}}, path templates
    ROOT/meta/tasks.parquet                     task string -> task_index
    ROOT/meta/episodes/chunk-*/file-*.parquet   one row per episode: length, tasks, data file and row
                                                offsets, per camera video file + from/to timestamps
    ROOT/meta/stats.json                        normalisation statistics
    ROOT/data/chunk-*/file-*.parquet            many episodes per file, one row per frame
    ROOT/videos/<camera>/chunk-*/file-*.mp4     many episodes per file, one after the other

:func:`read_lerobot` is a pure reader (nothing is written) that turns it into
:class:`LeRobotImport`: one :class:`~vlastore.store.EpisodeData` per LeRobot
episode, every numeric feature as a series with its column names, and the
metadata a v1 store has no place for yet (fps, tasks, video segments, stats).
:func:`ingest_lerobot` stores what v1 can hold. Parquet files are read one at a
time, batch by batch, keeping only the numeric columns: memory is about the
size of the series the store will hold, never the whole dataset.

Modules: :mod:`.layout` (constants and result types, pure), :mod:`.meta`
(``meta/``), :mod:`.data` (``data/``), :mod:`.ingest` (the store and report).
"""

from __future__ import annotations

from .data import read_column, read_lerobot
from .ingest import ingest_lerobot
from .layout import (
    BOOKKEEPING_COLUMNS,
    DEFAULT_NAME_PATTERN,
    LeRobotEpisode,
    LeRobotFeature,
    LeRobotFormatError,
    LeRobotImport,
    LeRobotMeta,
    VideoSegment,
    check_name_pattern,
    series_key_for,
)
from .meta import read_lerobot_meta

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "DEFAULT_NAME_PATTERN",
    "LeRobotEpisode",
    "LeRobotFeature",
    "LeRobotFormatError",
    "LeRobotImport",
    "LeRobotMeta",
    "VideoSegment",
    "check_name_pattern",
    "ingest_lerobot",
    "read_column",
    "read_lerobot",
    "read_lerobot_meta",
    "series_key_for",
]
