"""Reading robot data files: one CSV or NPZ per episode, or one robomimic HDF5 file.

Every reader opens only regular files (:mod:`vlastore.ingest.source`), checks
every size a file declares before allocating it, and never raises for a bad
file: the episode's ``problem`` says what is wrong (``bad-series``,
``not-a-regular-file``, ``too-large``, ...). Float series are cast to
:data:`DEFAULT_DTYPE` unless another dtype is asked for.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import sys
import zipfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format import TIMESTAMP_SERIES, FormatError, validate_name
from ..living import fps_value
from .report import IngestUsageError, Problem
from .source import MAX_FILE_BYTES, SourceError, file_size, open_source, outside_root, retrying

__all__ = [
    "RobotEpisode",
    "read_csv_episode",
    "read_npz_episode",
    "read_robomimic",
    "parse_series_spec",
    "DEFAULT_SERIES",
    "DEFAULT_DTYPE",
    "HDF5_SUFFIXES",
]

DEFAULT_SERIES = "data"
"""Series key of the columns no ``--series`` pattern claims."""

DEFAULT_DTYPE = "float32"
"""Series are stored as float32 unless ``--dtype float64`` is asked for (integers too, when float32 holds them)."""

HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")

_TIMESTAMP_COLUMNS = frozenset({"timestamp", "timestamps"})
"""Column names (any case) kept as the ``timestamp`` series: per-step times are metadata, never a data column."""

_TASK_COLUMNS = frozenset({"task", "instruction", "language_instruction"})
"""Text columns (any case) holding the episode's task / instruction (the first value is the episode's task)."""

MAX_METADATA_BYTES = 1 << 20
"""Largest ``<episode>.json`` read (episode metadata is small; a bigger file is refused, unread)."""

_METADATA_KEYS = ("task", "fps")
"""Keys of ``<episode>.json`` that are the episode's task and fps; every other key is a free attribute."""

_NPY_VERSIONS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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
    task: str | None = None
    """From a task/instruction text column or the ``task`` of ``<episode>.json``."""
    fps: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    """Free attributes: ``<episode>.json`` without ``task``/``fps``; ``tasks`` when a task column changes."""

    def set_tasks(self, texts: list[str]) -> None:
        """The first non-empty text is the episode's task; all distinct ones go to ``attrs["tasks"]`` when several."""
        distinct = list(dict.fromkeys(t for t in texts if t))
        if distinct:
            self.task = distinct[0]
        if len(distinct) > 1:
            self.attrs["tasks"] = distinct


def parse_series_spec(specs: list[str] | None) -> list[tuple[str, list[str]]]:
    """``["state=joint_*,gripper", "action=act_*"]`` -> ``[(key, patterns), ...]``.

    Raises:
        IngestUsageError: a spec without ``=`` or with an unusable key.
    """
    out = []
    for spec in specs or []:
        key, sep, patterns = spec.partition("=")
        if not sep or not patterns:
            raise IngestUsageError(f"--series {spec!r}: write KEY=PATTERN[,PATTERN...], e.g. state=joint_*,gripper")
        try:
            validate_name(key.strip(), "series key")
        except FormatError as exc:
            raise IngestUsageError(f"--series {spec!r}: {exc}") from None
        out.append((key.strip(), [p.strip() for p in patterns.split(",") if p.strip()]))
    return out


def _cast(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    """``arr`` as ``dtype``; integers stay exact (float64 when float32 would round them).

    Floats beyond float32's range become Inf, which the non-finite check then reports.
    """
    if dtype is None or arr.dtype == np.dtype(dtype):
        return arr
    if arr.dtype.kind in "biu":
        cast = arr.astype(dtype)
        return cast if np.array_equal(cast, arr) else arr.astype(np.float64)
    with np.errstate(over="ignore"):
        return arr.astype(dtype)


def _group(
    names: list[str], table: np.ndarray, series: list[tuple[str, list[str]]], dtype: str | None
) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """Split named columns into series by pattern (first match wins); all go to ``data`` without patterns.

    A ``timestamp``/``timestamps`` column (any case) becomes the one-column float64 series
    ``timestamp`` (exact seconds; float32 would round them within minutes of recording),
    unless a pattern names it exactly: a wildcard such as ``state=*`` never mixes the
    time into the data.
    """
    named = {p for _, patterns in series for p in patterns}
    time = next((i for i, n in enumerate(names) if n.lower() in _TIMESTAMP_COLUMNS and n not in named), None)
    rest = [i for i in range(len(names)) if i != time]
    if not series:
        groups = {DEFAULT_SERIES: rest}
    else:
        groups = {key: [] for key, _ in series}
        for i in rest:
            for key, patterns in series:
                if any(fnmatch.fnmatchcase(names[i], p) for p in patterns):
                    groups[key].append(i)
                    break
    claimed = {i for cols in groups.values() for i in cols} | ({time} if time is not None else set())
    dropped = [n for i, n in enumerate(names) if i not in claimed]
    out = {}
    for key, cols in groups.items():
        if cols:
            out[key] = ([names[i] for i in cols], _cast(table[:, cols], dtype))
    if time is not None and TIMESTAMP_SERIES not in out:
        out[TIMESTAMP_SERIES] = ([names[time]], table[:, [time]].astype(np.float64))
    elif time is not None:  # a --series key is called 'timestamp' too: the user's series wins, the time is noted
        dropped.append(names[time])
    return out, dropped


def _repeated(names: list[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _read_episode(reader: Any, path: str, *args: Any) -> RobotEpisode:
    """Run ``reader`` with retries; any failure is the episode's problem, never an exception."""
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        episode = retrying(lambda: reader(RobotEpisode(name, path, nbytes=file_size(path)), *args))
        if episode.problem is None:
            retrying(lambda: _read_metadata(episode))
        return episode
    except SourceError as exc:
        return RobotEpisode(name, path, problem=(exc.reason, str(exc)), nbytes=file_size(path))
    except MemoryError:
        return RobotEpisode(name, path, problem=("too-large", f"{path}: does not fit in memory"))
    except Exception as exc:  # noqa: BLE001 - one bad file is one skipped file, whatever it raises
        return RobotEpisode(
            name, path, problem=("bad-series", f"{path}: cannot read it ({type(exc).__name__}: {str(exc)[:200]})")
        )


def _read_metadata(episode: RobotEpisode) -> None:
    """``<episode>.json`` next to the episode's file, when there is one: task, fps and free attributes.

    Raises:
        SourceError: ``bad-metadata`` for a file that is not a JSON object with a text ``task`` and a
            positive ``fps`` (the episode is skipped: ingesting it without its task would be silently
            wrong); ``not-a-regular-file``/``too-large`` as for data files.
    """
    path = os.path.splitext(episode.path)[0] + ".json"
    if not os.path.lexists(path):
        return
    with open_source(path, MAX_METADATA_BYTES) as f:
        raw = f.read(MAX_METADATA_BYTES + 1)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError("bad-metadata", f"{path}: not UTF-8 JSON ({str(exc)[:160]}); fix or remove it") from None
    if not isinstance(meta, dict):
        raise SourceError("bad-metadata", f"{path}: holds a JSON {type(meta).__name__}; write an object {{...}}")
    task, fps = meta.get("task"), meta.get("fps")
    if task is not None and not isinstance(task, str):
        raise SourceError("bad-metadata", f"{path}: 'task' is {task!r}; write the task text as a string")
    try:
        fps_value(fps, episode.name)  # the store's own check, here so that a bad file skips only its episode
    except FormatError:
        raise SourceError(
            "bad-metadata", f"{path}: 'fps' is {fps!r}; write a positive number of frames per second"
        ) from None
    if task:
        episode.task = task
    if fps is not None:
        episode.fps = float(fps)
    episode.attrs.update({k: v for k, v in meta.items() if k not in _METADATA_KEYS})


def read_csv_episode(
    path: str,
    series: list[tuple[str, list[str]]] | None = None,
    dtype: str | None = DEFAULT_DTYPE,
    max_bytes: int = MAX_FILE_BYTES,
) -> RobotEpisode:
    """Numeric columns of a UTF-8 CSV with a header; text columns are reported in ``dropped``.

    Never raises for a bad file: the episode's ``problem`` says what is wrong.
    """
    return _read_episode(_read_csv, path, series or [], dtype, max_bytes)


def _read_csv(
    episode: RobotEpisode, series: list[tuple[str, list[str]]], dtype: str | None, max_bytes: int
) -> RobotEpisode:
    path = episode.path
    # one float per numeric cell as it is read: memory in proportion to the numbers, not to Python lists of rows
    with io.TextIOWrapper(open_source(path, max_bytes), encoding="utf-8", newline="") as f:
        try:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                episode.problem = ("bad-series", f"{path}: empty CSV; one header row then one row per step is expected")
                return episode
            if (twice := _repeated(header)) is not None:
                episode.problem = ("bad-series", f"{path}: the header names column {twice!r} twice; rename one")
                return episode
            columns: list[array | None] = [array("d") for _ in header]
            task_columns = [j for j, h in enumerate(header) if h.lower() in _TASK_COLUMNS]
            texts: dict[str, None] = {}  # distinct task texts in order: bounded by them, not by the steps
            steps = 0
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    episode.problem = (
                        "bad-series",
                        f"{path} line {line}: {len(row)} fields, the header has {len(header)}",
                    )
                    return episode
                steps += 1
                for j in task_columns[:1]:
                    texts.setdefault(row[j].strip())
                for j, cell in enumerate(row):
                    values = columns[j]
                    if values is not None:
                        cell = cell.strip()
                        try:
                            values.append(float(cell) if cell else math.nan)
                        except ValueError:
                            columns[j] = None  # a text column: not stored
        except (UnicodeDecodeError, csv.Error) as exc:
            episode.problem = ("bad-series", f"{path}: not a UTF-8 CSV file ({str(exc)[:160]})")
            return episode
    names = [h for h, c in zip(header, columns, strict=True) if c is not None]
    table = np.empty((steps, len(names)), dtype=np.float64)
    for j, values in enumerate(c for c in columns if c is not None):
        table[:, j] = np.frombuffer(values, dtype=np.float64)
    episode.columns, more = _group(names, table, series, dtype)
    task_text = task_columns[0] if task_columns and columns[task_columns[0]] is None else None
    if task_text is not None:  # a numeric 'task' column (an index) stays a data column
        episode.set_tasks(list(texts))
    episode.dropped = [h for j, (h, c) in enumerate(zip(header, columns, strict=True)) if c is None and j != task_text]
    episode.dropped += more
    return episode


def read_npz_episode(
    path: str,
    series: list[tuple[str, list[str]]] | None = None,
    dtype: str | None = DEFAULT_DTYPE,
    max_bytes: int = MAX_FILE_BYTES,
) -> RobotEpisode:
    """An NPZ converted from a CSV: 1-D arrays are named columns; 2-D ``[steps, k]`` arrays are series of their own.

    ``data`` + ``columns`` (a 2-D table and its column names) is read as the CSV it came from.
    Every array's declared size is checked against its zip member before it is read
    (no pickled objects are ever loaded). Never raises for a bad file.
    """
    return _read_episode(_read_npz, path, series or [], dtype, max_bytes)


def _npz_arrays(path: str, max_bytes: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Arrays of an NPZ file (numeric and text), each checked before its bytes are read; skipped keys."""
    arrays: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    with open_source(path, max_bytes) as raw:
        try:
            archive = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, EOFError, ValueError) as exc:
            raise SourceError("bad-series", f"{path}: not an NPZ (zip) file ({exc})") from None
        with archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
            declared = sum(m.file_size for m in members)
            if declared > max_bytes:
                raise SourceError(
                    "too-large",
                    f"{path}: its arrays declare {declared:,} bytes in all, more than the "
                    f"{max_bytes:,}-byte limit (--max-file-size)",
                )
            for member in members:
                key = member.filename[:-4]
                if key in arrays or key in skipped:
                    raise SourceError("bad-series", f"{path}: array {key!r} appears twice in the archive")
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = _NPY_VERSIONS.get(version)
                    if read_header is None:
                        skipped.append(key)
                        continue
                    shape, fortran, dt = read_header(f, max_header_size=10000)
                    if dt.hasobject or dt.itemsize == 0:  # pickled objects are never loaded
                        skipped.append(key)
                        continue
                    header_bytes = f.tell()  # the header reader stops right after the header
                    nbytes = math.prod(shape) * dt.itemsize
                    if header_bytes + nbytes != member.file_size:
                        raise SourceError(
                            "bad-series",
                            f"{path}: array {key!r} declares shape {list(shape)} of {dt} "
                            f"({nbytes:,} bytes) but its member holds "
                            f"{member.file_size - header_bytes:,}",
                        )
                    data = f.read(nbytes)
                if len(data) != nbytes:
                    raise SourceError("truncated", f"{path}: array {key!r} ends early")
                arrays[key] = np.frombuffer(data, dtype=dt).reshape(shape, order="F" if fortran else "C")
    return arrays, skipped


def _read_npz(
    episode: RobotEpisode, series: list[tuple[str, list[str]]], dtype: str | None, max_bytes: int
) -> RobotEpisode:
    path = episode.path
    arrays, episode.dropped = _npz_arrays(path, max_bytes)
    names: list[str] = []
    columns: list[np.ndarray] = []
    if "data" in arrays and "columns" in arrays and arrays["data"].ndim == 2:
        names += [str(c) for c in arrays.pop("columns").reshape(-1).tolist()]
        data = arrays.pop("data")
        if len(names) != data.shape[1]:
            episode.problem = ("bad-series", f"{path}: {len(names)} column names for {data.shape[1]} data columns")
            return episode
        columns += list(data.T)
    own: dict[str, tuple[list[str], np.ndarray]] = {}
    for key, arr in arrays.items():
        if arr.dtype.kind in "US" and key.lower() in _TASK_COLUMNS and episode.task is None:
            texts = arr.reshape(-1).tolist()
            episode.set_tasks([t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts])
        elif arr.dtype.kind not in "biuf":
            episode.dropped.append(key)
        elif arr.ndim == 1:
            names.append(key)
            columns.append(arr)
        elif arr.ndim == 2:
            own[key] = ([f"{key}_{i}" for i in range(arr.shape[1])], _cast(arr, dtype))
        else:
            episode.dropped.append(key)
    if (twice := _repeated(names)) is not None:
        episode.problem = ("bad-series", f"{path}: column {twice!r} is named twice; rename one")
        return episode
    if columns:
        if len({len(c) for c in columns}) != 1:
            episode.problem = ("bad-series", f"{path}: 1-D arrays of different lengths; one value per step is expected")
            return episode
        dt = np.result_type(*columns)
        table = np.stack([c.astype(dt) for c in columns], axis=1)
        grouped, more = _group(names, table, series, dtype)
        episode.columns.update(grouped)
        episode.dropped += more
    episode.columns.update(own)
    return episode


def read_robomimic(
    path: str, dtype: str | None = DEFAULT_DTYPE, max_bytes: int = MAX_FILE_BYTES, skip_outside_links: bool = False
) -> tuple[list[RobotEpisode], list[str], list[Problem], list[str]]:
    """Episodes ``data/demo_N`` of a robomimic HDF5 file: ``actions``, ``states``, ``rewards``,
    ``dones`` and ``obs/<key>`` (as series ``obs.<key>``) with at most 2 dimensions.

    The file is opened as a regular file by vlastore (never a FIFO), external links
    are followed by vlastore too (to regular files only), and every dataset's
    declared size is checked against ``max_bytes`` and against what it really
    stores before it is read. A damaged demo is one skipped episode.

    Returns:
        the episodes (by demo number), notes on what was not stored, problems
        (the file's or a demo's) and links leading outside the file's folder.
    """
    import h5py

    notes: list[str] = []
    outside: list[str] = []
    try:
        raw = retrying(lambda: open_source(path, sys.maxsize))  # images make big files: the limit is per dataset
    except SourceError as exc:
        return [], notes, [Problem(path, exc.reason, str(exc))], outside
    try:
        f = h5py.File(raw, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, ValueError... for files that are not HDF5
        raw.close()
        return [], notes, [Problem(path, "bad-series", f"{path}: not a readable HDF5 file ({str(exc)[:160]})")], outside
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    reader = _Hdf5Reader(path, folder, max_bytes, skip_outside_links, outside)
    episodes: list[RobotEpisode] = []
    problems: list[Problem] = []
    skipped: Counter[str] = Counter()
    try:
        with f:
            data = reader.child(f, "data")
            if not isinstance(data, h5py.Group):
                return (
                    [],
                    notes,
                    [
                        Problem(
                            path,
                            "bad-series",
                            f"{path}: no 'data' group; a robomimic file holds data/demo_N/{{actions,states,obs}}",
                        )
                    ],
                    outside,
                )
            demos = sorted(data.keys(), key=lambda k: (int(m.group()) if (m := re.search(r"\d{1,18}", k)) else -1, k))
            for demo in demos:
                episode = RobotEpisode(demo, f"{path}:data/{demo}")
                try:
                    reader.demo(reader.child(data, demo), episode, dtype, skipped)
                except SourceError as exc:
                    episode.problem = (exc.reason, f"{episode.path}: {exc}")
                except Exception as exc:  # noqa: BLE001 - a damaged demo is one skipped episode
                    episode.problem = (
                        "bad-series",
                        f"{episode.path}: cannot read it ({type(exc).__name__}: {str(exc)[:160]})",
                    )
                episodes.append(episode)
    except Exception as exc:  # noqa: BLE001 - a damaged file is one skipped file
        return (
            [],
            notes,
            [Problem(path, "bad-series", f"{path}: cannot read it ({type(exc).__name__}: {str(exc)[:160]})")],
            outside,
        )
    finally:
        reader.close()
        raw.close()
    for key, n in skipped.items():
        notes.append(f"{key} not stored in {n} demo(s): only numeric arrays of 1 or 2 dimensions become series")
    return episodes, notes, problems, outside


class _Hdf5Reader:
    """Reads robomimic groups; follows external links itself, to regular files only, noting those leaving the folder."""

    def __init__(self, path: str, folder: str, max_bytes: int, skip_outside: bool, outside: list[str]) -> None:
        self.path = path
        self.folder = folder
        self.max_bytes = max_bytes
        self.skip_outside = skip_outside
        self.outside = outside
        self._files: list[Any] = []

    def child(self, group: Any, key: str) -> Any:
        import h5py

        link = group.get(key, getlink=True)
        if link is None:
            return None
        if isinstance(link, h5py.ExternalLink):
            target = os.path.join(os.path.dirname(os.path.abspath(self.path)), link.filename)
            where = f"{self.path}:{group.name}/{key} -> {link.filename}:{link.path}"
            if outside_root(target, self.folder) is not None or not os.path.realpath(target).startswith(self.folder):
                self.outside.append(where)
                if self.skip_outside:
                    raise SourceError(
                        "outside-source",
                        f"external link {where} leads outside {self.folder}; not read (--skip-outside-links)",
                    )
            raw = retrying(lambda: open_source(target, sys.maxsize))
            self._files.append(raw)
            ext = h5py.File(raw, "r")
            self._files.append(ext)
            return ext.get(link.path)
        return group.get(key)

    def demo(self, group: Any, episode: RobotEpisode, dtype: str | None, skipped: Counter[str]) -> None:
        import h5py

        if not isinstance(group, h5py.Group):
            raise SourceError("bad-series", "not a group")
        items = [(k, self.child(group, k)) for k in ("actions", "states", "rewards", "dones") if k in group]
        obs = self.child(group, "obs") if "obs" in group else None
        if isinstance(obs, h5py.Group):
            items += [(f"obs.{k}", self.child(obs, k)) for k in sorted(obs.keys())]
        for key, ds in items:
            if not isinstance(ds, h5py.Dataset) or ds.ndim not in (1, 2) or ds.dtype.kind not in "biuf":
                skipped[key] += 1
                continue
            self._check_dataset(ds, key)
            arr = ds[()]
            arr = arr.reshape(len(arr), -1)
            cols = [f"{key}_{i}" for i in range(arr.shape[1])] if arr.shape[1] > 1 else [key]
            episode.columns[key] = (cols, _cast(arr, dtype))
            episode.nbytes += arr.nbytes

    def _check_dataset(self, ds: Any, key: str) -> None:
        declared = ds.size * ds.dtype.itemsize
        if declared > self.max_bytes:
            raise SourceError(
                "too-large",
                f"{key}: declares shape {list(ds.shape)} ({declared:,} bytes), more than "
                f"the {self.max_bytes:,}-byte limit (--max-file-size)",
            )
        for name in [e[0] for e in (ds.external or [])] + [
            v.file_name for v in (ds.virtual_sources() if ds.is_virtual else [])
        ]:
            target = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
            if not os.path.isfile(target):  # HDF5 opens these itself: a FIFO would hang it
                raise SourceError(
                    "not-a-regular-file", f"{key}: its data lives in {name!r}, which is not a regular file"
                )
            if outside_root(target, self.folder) is not None or not os.path.realpath(target).startswith(self.folder):
                self.outside.append(f"{self.path}:{ds.name} -> {name}")
                if self.skip_outside:
                    raise SourceError("outside-source", f"{key}: its data lives in {name!r}, outside {self.folder}")
            return  # external or virtual storage: the file's storage size says nothing
        stored = ds.id.get_storage_size()
        if declared > 64 * stored + (1 << 20):  # mostly never written: reading it would make up fill values
            raise SourceError(
                "bad-series", f"{key}: declares shape {list(ds.shape)} ({declared:,} bytes) but stores {stored:,} bytes"
            )

    def close(self) -> None:
        for f in reversed(self._files):  # each HDF5 file before the file object under it
            f.close()
