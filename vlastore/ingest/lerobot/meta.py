"""Read and check ``meta/`` of a LeRobot v3.0 dataset: info.json, the task table, the episodes table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import IO, Any

from ..report import IngestError, Problem
from .layout import (
    DEFAULT_DATA_PATH,
    DEFAULT_NAME_PATTERN,
    DEFAULT_VIDEO_PATH,
    EPISODES_DIR,
    INFO_PATH,
    STATS_PATH,
    TASKS_PATH,
    LeRobotEpisode,
    LeRobotFormatError,
    LeRobotMeta,
    VideoSegment,
    check_name_pattern,
    check_template,
    episode_name,
    fill_path,
    parse_features,
)

__all__ = [
    "read_lerobot_meta",
    "open_regular",
    "open_parquet",
    "file_problem",
    "display_path",
    "MAX_JSON_BYTES",
    "BATCH_ROWS",
]

MAX_JSON_BYTES = 64 << 20
BATCH_ROWS = 65536
_META_FILE = re.compile(r"^file-(\d+)\.parquet$")
_CHUNK_DIR = re.compile(r"^chunk-(\d+)$")


def open_regular(path: Path) -> IO[bytes]:
    """Open a file for reading, refusing anything but a regular file (a FIFO never blocks us).

    Symbolic links are followed (a Hugging Face cache holds links to blobs); only reading happens.

    Raises:
        OSError: missing, unreadable, or not a regular file (``errno`` EINVAL for the latter).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(22, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_json(path: Path, what: str, required: bool = True) -> Any:
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        if not required:
            return None
        raise LeRobotFormatError(
            f"{path}: missing; is {path.parent.parent} a LeRobot dataset in the v3.0 format (it holds {what})?"
        ) from None
    except OSError as exc:
        raise LeRobotFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise LeRobotFormatError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a LeRobot {what}")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeRobotFormatError(f"{path}: not valid JSON ({exc})") from None


def open_parquet(path: Path) -> tuple[Any, IO[bytes]]:
    """``(pyarrow.parquet.ParquetFile, open file)``; OSError or ValueError with a reason when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle = open_regular(path)
    try:
        return pq.ParquetFile(handle), handle
    except (pa.ArrowException, OSError, ValueError) as exc:
        handle.close()
        raise ValueError(f"not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None


def file_problem(path: Path, exc: BaseException, root: Path) -> tuple[str, str]:
    """(reason, message) for a file that could not be opened or parsed."""
    rel = display_path(path, root)
    if isinstance(exc, FileNotFoundError):
        return "unreadable", f"{rel}: missing"
    if isinstance(exc, OSError):
        return "unreadable", f"{rel}: cannot be read ({exc.strerror or exc})"
    return "corrupt", f"{rel}: {exc}"


def display_path(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise IngestError("reading LeRobot datasets needs pyarrow: pip install 'vlastore[lerobot]'") from None


def _read_tasks(root: Path) -> dict[int, str]:
    """``meta/tasks.parquet``: a ``task_index`` column and the task strings (pandas writes them as the index)."""
    import pyarrow as pa

    path = root / TASKS_PATH
    try:
        pf, handle = open_parquet(path)
    except (OSError, ValueError) as exc:
        _, message = file_problem(path, exc, root)
        raise LeRobotFormatError(f"{message}; the task table is needed to name every frame's task") from None
    with handle:
        names = pf.schema_arrow.names
        text = next((c for c in ("task", "__index_level_0__") if c in names), None)
        if text is None:
            strings = [
                f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            ]
            text = strings[0] if len(strings) == 1 else None
        if "task_index" not in names or text is None:
            raise LeRobotFormatError(
                f"{TASKS_PATH}: columns {names}; a 'task_index' column and one column of task strings are expected"
            )
        tasks: dict[int, str] = {}
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["task_index", text]):
                for index, task in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                    if not isinstance(index, int) or not isinstance(task, str) or index in tasks:
                        raise LeRobotFormatError(
                            f"{TASKS_PATH}: bad or duplicate row (task_index {index!r}, task {task!r})"
                        )
                    tasks[index] = task
        except (pa.ArrowException, OSError) as exc:
            raise LeRobotFormatError(f"{TASKS_PATH}: cannot be read ({exc})") from None
    return tasks


def _episode_files(root: Path) -> list[Path]:
    """``meta/episodes/chunk-NNN/file-NNN.parquet`` in (chunk, file) order; other entries are ignored."""
    base = root / EPISODES_DIR
    if not base.is_dir():
        raise LeRobotFormatError(
            f"{base}: missing; a v3.0 dataset keeps one row per episode in {EPISODES_DIR}/chunk-*/file-*.parquet"
        )
    found = []
    for chunk in os.scandir(base):
        m = _CHUNK_DIR.match(chunk.name)
        if not m or not chunk.is_dir(follow_symlinks=True):
            continue
        for entry in os.scandir(chunk.path):
            f = _META_FILE.match(entry.name)
            if f:
                found.append(((int(m.group(1)), int(f.group(1))), Path(entry.path)))
    return [p for _, p in sorted(found)]


_EPISODE_COLUMNS = (
    "episode_index",
    "tasks",
    "length",
    "data/chunk_index",
    "data/file_index",
    "dataset_from_index",
    "dataset_to_index",
)


def _int(value: Any, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} is {value!r}; an integer >= {low} is expected")
    return value


def _read_episodes(
    root: Path, info: dict[str, Any], video_keys: list[str], name_pattern: str, problems: list[Problem]
) -> tuple[list[LeRobotEpisode], int]:
    import pyarrow as pa

    data_template = check_template(info.get("data_path", DEFAULT_DATA_PATH), "data_path", {"chunk_index", "file_index"})
    video_template = info.get("video_path") or DEFAULT_VIDEO_PATH
    if video_keys:
        video_template = check_template(video_template, "video_path", {"video_key", "chunk_index", "file_index"})
    files = _episode_files(root)
    if not files:
        raise LeRobotFormatError(f"{root / EPISODES_DIR}: no chunk-*/file-*.parquet; nothing to import")
    episodes: dict[int, LeRobotEpisode] = {}
    names: dict[str, int] = {}
    nbytes = 0
    for path in files:
        where = display_path(path, root)
        try:
            pf, handle = open_parquet(path)
        except (OSError, ValueError) as exc:
            problems.append(Problem(where, *file_problem(path, exc, root)))
            continue
        with handle:
            nbytes += os.fstat(handle.fileno()).st_size
            have = set(pf.schema_arrow.names)
            missing = [c for c in _EPISODE_COLUMNS if c not in have and c != "tasks"]
            if missing:
                problems.append(
                    Problem(where, "bad-series", f"{where}: no column(s) {missing}; not a v3.0 episodes table")
                )
                continue
            video_cols = [
                f"videos/{k}/{c}"
                for k in video_keys
                for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
                if f"videos/{k}/{c}" in have
            ]
            columns = [c for c in _EPISODE_COLUMNS if c in have] + video_cols
            try:
                for batch in pf.iter_batches(batch_size=4096, columns=columns):
                    for row in batch.to_pylist():
                        episode = _episode_row(
                            row, root, data_template, video_template, video_keys, name_pattern, path, problems
                        )
                        if episode is None:
                            continue
                        if episode.episode_index in episodes or episode.name in names:
                            problems.append(
                                Problem(
                                    where,
                                    "bad-series",
                                    f"{where}: episode "
                                    f"{episode.episode_index} is listed twice; the second row is "
                                    "ignored",
                                )
                            )
                            continue
                        episodes[episode.episode_index] = episode
                        names[episode.name] = episode.episode_index
            except (pa.ArrowException, OSError) as exc:
                problems.append(
                    Problem(where, "corrupt", f"{where}: cannot be read ({str(exc).splitlines()[0][:200]})")
                )
    return [episodes[i] for i in sorted(episodes)], nbytes


def _episode_row(
    row: dict[str, Any],
    root: Path,
    data_template: str,
    video_template: str,
    video_keys: list[str],
    name_pattern: str,
    path: Path,
    problems: list[Problem],
) -> LeRobotEpisode | None:
    where = display_path(path, root)
    try:
        index = _int(row.get("episode_index"), "episode_index")
        length = _int(row.get("length"), "length", 1)
        chunk, file = (
            _int(row.get("data/chunk_index"), "data/chunk_index"),
            _int(row.get("data/file_index"), "data/file_index"),
        )
        start, stop = (
            _int(row.get("dataset_from_index"), "dataset_from_index"),
            _int(row.get("dataset_to_index"), "dataset_to_index"),
        )
        if stop - start != length:
            raise ValueError(
                f"dataset_from_index {start} .. dataset_to_index {stop} is {stop - start} frames, length says {length}"
            )
        episode_tasks = row.get("tasks")
        if episode_tasks is None:
            episode_tasks = []
        if not isinstance(episode_tasks, list) or not all(isinstance(t, str) for t in episode_tasks):
            raise ValueError(f"tasks is {episode_tasks!r}; a list of strings is expected")
        data_path = fill_path(data_template, "data_path", chunk_index=chunk, file_index=file)
        videos = {}
        for key in video_keys:
            cols: list[Any] = [
                row.get(f"videos/{key}/{c}") for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
            ]
            if any(c is None for c in cols):
                continue  # this camera has no video for this episode: reported by the video source if asked for
            v_chunk, v_file = _int(cols[0], f"videos/{key}/chunk_index"), _int(cols[1], f"videos/{key}/file_index")
            t0, t1 = float(cols[2]), float(cols[3])
            if not (math.isfinite(t0) and math.isfinite(t1) and 0 <= t0 <= t1):
                raise ValueError(f"videos/{key} time range {t0} .. {t1} is not a range of seconds")
            vpath = fill_path(video_template, "video_path", video_key=key, chunk_index=v_chunk, file_index=v_file)
            videos[key] = VideoSegment(vpath, t0, t1)
    except (ValueError, TypeError, OverflowError, LeRobotFormatError) as exc:
        problems.append(Problem(where, "bad-series", f"{where}: episode row {row.get('episode_index')!r}: {exc}"))
        return None
    name = episode_name(name_pattern, index)
    return LeRobotEpisode(index, name, length, list(episode_tasks), data_path, start, stop, videos)


def read_lerobot_meta(root: str | os.PathLike[str], name_pattern: str = DEFAULT_NAME_PATTERN) -> LeRobotMeta:
    """Read and check ``meta/`` of a LeRobot v3.0 dataset (no frame data is read).

    Args:
        root: the dataset folder (it holds ``meta/info.json``).
        name_pattern: store name of each episode, e.g. ``episode_{episode_index:06d}``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        FormatError: a bad ``name_pattern``.
        LeRobotFormatError: not a v3.0 dataset, or its info/tasks/episodes tables cannot be used.
    """
    _require_pyarrow()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; give the LeRobot dataset folder (the one holding {INFO_PATH})")
    check_name_pattern(name_pattern)
    info = _read_json(root / INFO_PATH, "fps, features and the file layout")
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{root / INFO_PATH}: a JSON object is expected")
    version = str(info.get("codebase_version", ""))
    if not re.match(r"^v3\.\d+$", version):
        hint = " Convert it first with lerobot's convert_dataset_v21_to_v30 script." if version.startswith("v2") else ""
        raise LeRobotFormatError(
            f"{root / INFO_PATH}: codebase_version {version or 'missing'!r}; only the v3.x "
            f"on-disk format (meta/episodes/, data/chunk-*/file-*.parquet) is read.{hint}"
        )
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise LeRobotFormatError(f"{root / INFO_PATH}: fps is {fps!r}; a positive number is expected")
    features = parse_features(info)
    problems: list[Problem] = []
    notes: list[str] = []
    total_tasks = info.get("total_tasks")
    tasks = _read_tasks(root) if (root / TASKS_PATH).exists() or total_tasks else {}
    video_keys = [k for k, f in features.items() if f.kind == "video"]
    for key in video_keys:
        if "/" in key or ".." in key or not key:
            raise LeRobotFormatError(f"{root / INFO_PATH}: video feature {key!r} cannot name a folder")
    episodes, nbytes = _read_episodes(root, info, video_keys, name_pattern, problems)
    announced = info.get("total_episodes")
    if isinstance(announced, int) and announced != len(episodes):
        notes.append(f"meta/info.json announces {announced} episodes; {len(episodes)} usable rows in {EPISODES_DIR}")
    stats = _read_json(root / STATS_PATH, "statistics", required=False)
    robot_type = info.get("robot_type")
    for path in (root / INFO_PATH, root / TASKS_PATH, root / STATS_PATH):
        with contextlib.suppress(OSError):
            nbytes += path.stat().st_size
    return LeRobotMeta(
        root,
        version,
        float(fps),
        robot_type if isinstance(robot_type, str) else None,
        features,
        tasks,
        episodes,
        stats if isinstance(stats, dict) else None,
        info,
        problems,
        notes,
        nbytes,
    )
