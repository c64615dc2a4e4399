"""Ingest robot data: one CSV or NPZ per episode, or one robomimic HDF5 file.

The robot data gives the store its catalog (episode names and step counts)
and its series (``series/<key>``, column names kept). Feature caches are then
added with ``vlastore ingest pt-cache|vggt ... --into STORE``.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import os
import re
import sys
import time
import zipfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ..format import FormatError, validate_name
from ..store import EpisodeData, VLAStore
from .features import IngestOptions, open_or_create_store, store_usage
from .report import IngestError, IngestReport, IngestUsageError, Problem
from .source import MAX_FILE_BYTES, SourceError, file_size, open_source, outside_root, retrying
from .workers import parallel_map

__all__ = ["RobotEpisode", "read_csv_episode", "read_npz_episode", "read_robomimic", "ingest_robot",
           "parse_series_spec", "DEFAULT_SERIES", "DEFAULT_DTYPE", "HDF5_SUFFIXES"]

DEFAULT_SERIES = "data"
"""Series key of the columns no ``--series`` pattern claims."""

DEFAULT_DTYPE = "float32"
"""Float series are stored as float32 unless ``--dtype float64`` is asked for; integer series keep their dtype."""

HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")

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
    """Float arrays as ``dtype`` (beyond float32's range they become Inf, caught as non-finite); others as they are."""
    if dtype is None or arr.dtype.kind != "f" or arr.dtype == np.dtype(dtype):
        return arr
    with np.errstate(over="ignore"):
        return arr.astype(dtype)


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
            out[key] = ([names[i] for i in cols], _cast(table[:, cols], dtype))
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
        return retrying(lambda: reader(RobotEpisode(name, path, nbytes=file_size(path)), *args))
    except SourceError as exc:
        return RobotEpisode(name, path, problem=(exc.reason, str(exc)), nbytes=file_size(path))
    except MemoryError:
        return RobotEpisode(name, path, problem=("too-large", f"{path}: does not fit in memory"))
    except Exception as exc:  # noqa: BLE001 - one bad file is one skipped file, whatever it raises
        return RobotEpisode(name, path, problem=("bad-series", f"{path}: cannot read it ({type(exc).__name__}: "
                                                               f"{str(exc)[:200]})"))


def read_csv_episode(path: str, series: list[tuple[str, list[str]]] | None = None, dtype: str | None = DEFAULT_DTYPE,
                     max_bytes: int = MAX_FILE_BYTES) -> RobotEpisode:
    """Numeric columns of a UTF-8 CSV with a header; text columns are reported in ``dropped``.

    Never raises for a bad file: the episode's ``problem`` says what is wrong.
    """
    return _read_episode(_read_csv, path, series or [], dtype, max_bytes)


def _read_csv(episode: RobotEpisode, series: list[tuple[str, list[str]]], dtype: str | None,
              max_bytes: int) -> RobotEpisode:
    path = episode.path
    # one float per numeric cell as it is read: memory in proportion to the numbers, not to Python lists of rows
    with io.TextIOWrapper(open_source(path, max_bytes), encoding="utf-8", newline="") as f:
        try:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                episode.problem = ("bad-series", f"{path}: empty CSV; one header row then one row per step is "
                                                 "expected")
                return episode
            if (twice := _repeated(header)) is not None:
                episode.problem = ("bad-series", f"{path}: the header names column {twice!r} twice; rename one")
                return episode
            columns: list[array | None] = [array("d") for _ in header]
            steps = 0
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    episode.problem = ("bad-series", f"{path} line {line}: {len(row)} fields, the header has "
                                                     f"{len(header)}")
                    return episode
                steps += 1
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
    episode.dropped = [h for h, c in zip(header, columns, strict=True) if c is None] + more
    return episode


def read_npz_episode(path: str, series: list[tuple[str, list[str]]] | None = None, dtype: str | None = DEFAULT_DTYPE,
                     max_bytes: int = MAX_FILE_BYTES) -> RobotEpisode:
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
                raise SourceError("too-large", f"{path}: its arrays declare {declared:,} bytes in all, more than the "
                                               f"{max_bytes:,}-byte limit (--max-file-size)")
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
                        raise SourceError("bad-series", f"{path}: array {key!r} declares shape {list(shape)} of {dt} "
                                                        f"({nbytes:,} bytes) but its member holds "
                                                        f"{member.file_size - header_bytes:,}")
                    data = f.read(nbytes)
                if len(data) != nbytes:
                    raise SourceError("truncated", f"{path}: array {key!r} ends early")
                arrays[key] = np.frombuffer(data, dtype=dt).reshape(shape, order="F" if fortran else "C")
    return arrays, skipped


def _read_npz(episode: RobotEpisode, series: list[tuple[str, list[str]]], dtype: str | None,
              max_bytes: int) -> RobotEpisode:
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
        if arr.dtype.kind not in "biuf":
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


def read_robomimic(path: str, dtype: str | None = DEFAULT_DTYPE, max_bytes: int = MAX_FILE_BYTES,
                   skip_outside_links: bool = False) -> tuple[list[RobotEpisode], list[str], list[Problem], list[str]]:
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
                return [], notes, [Problem(path, "bad-series", f"{path}: no 'data' group; a robomimic file holds "
                                                               "data/demo_N/{actions,states,obs}")], outside
            demos = sorted(data.keys(), key=lambda k: (int(m.group()) if (m := re.search(r"\d{1,18}", k)) else -1, k))
            for demo in demos:
                episode = RobotEpisode(demo, f"{path}:data/{demo}")
                try:
                    reader.demo(reader.child(data, demo), episode, dtype, skipped)
                except SourceError as exc:
                    episode.problem = (exc.reason, f"{episode.path}: {exc}")
                except Exception as exc:  # noqa: BLE001 - a damaged demo is one skipped episode
                    episode.problem = ("bad-series", f"{episode.path}: cannot read it ({type(exc).__name__}: "
                                                     f"{str(exc)[:160]})")
                episodes.append(episode)
    except Exception as exc:  # noqa: BLE001 - a damaged file is one skipped file
        return [], notes, [Problem(path, "bad-series", f"{path}: cannot read it ({type(exc).__name__}: "
                                                       f"{str(exc)[:160]})")], outside
    finally:
        reader.close()
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
                    raise SourceError("outside-source", f"external link {where} leads outside {self.folder}; not "
                                                        "read (--skip-outside-links)")
            ext = h5py.File(retrying(lambda: open_source(target, sys.maxsize)), "r")
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
            raise SourceError("too-large", f"{key}: declares shape {list(ds.shape)} ({declared:,} bytes), more than "
                                           f"the {self.max_bytes:,}-byte limit (--max-file-size)")
        for name in [e[0] for e in (ds.external or [])] + [v.file_name for v in (
                ds.virtual_sources() if ds.is_virtual else [])]:
            target = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
            if not os.path.isfile(target):  # HDF5 opens these itself: a FIFO would hang it
                raise SourceError("not-a-regular-file", f"{key}: its data lives in {name!r}, which is not a regular "
                                                        "file")
            if outside_root(target, self.folder) is not None or not os.path.realpath(target).startswith(self.folder):
                self.outside.append(f"{self.path}:{ds.name} -> {name}")
                if self.skip_outside:
                    raise SourceError("outside-source", f"{key}: its data lives in {name!r}, outside {self.folder}")
            return  # external or virtual storage: the file's storage size says nothing
        stored = ds.id.get_storage_size()
        if declared > 64 * stored + (1 << 20):  # mostly never written: reading it would make up fill values
            raise SourceError("bad-series", f"{key}: declares shape {list(ds.shape)} ({declared:,} bytes) but stores "
                                            f"{stored:,} bytes")

    def close(self) -> None:
        for f in self._files:
            f.close()


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


def _read_source(source: str, kind: str, groups: list[tuple[str, list[str]]], dtype: str | None,
                 options: IngestOptions, what: str) -> tuple[list[RobotEpisode], list[str], list[Problem], list[str]]:
    """Episodes, notes, problems outside any episode, and links leading outside the source."""
    if kind == "hdf5":
        return read_robomimic(source, dtype, options.max_file_bytes, options.skip_outside_links)
    listing = _list_source(source, kind)
    outside = {p for p, _ in listing.outside}
    problems = []
    paths = listing.paths
    if options.skip_outside_links and outside:
        paths = [p for p in paths if p not in outside]
        problems = [Problem(p, "outside-source", f"{p}: symbolic link to {t}, outside the source folder; not read "
                            "(--skip-outside-links)") for p, t in listing.outside]
    with tqdm(total=len(paths), unit="file", desc=what, disable=not options.progress or None) as bar:
        episodes = list(parallel_map(_read_one, [(p, kind, groups, dtype, options.max_file_bytes) for p in paths],
                                     options.n_workers, bar.update))
    return episodes, [], problems, [f"{p} -> {t}" for p, t in listing.outside]


def _detect(source: str, fmt: str) -> str:
    if not os.path.exists(source):
        raise IngestUsageError(f"{source}: no such file or folder; give a folder of per-episode CSV/NPZ files or a "
                               "robomimic .hdf5 file")
    if fmt != "auto":
        if (fmt == "hdf5") == os.path.isdir(source):
            raise IngestUsageError(f"{source}: --format {fmt} needs " + ("a .hdf5 file" if fmt == "hdf5" else
                                                                         "a folder of per-episode files"))
        return fmt
    if not os.path.isdir(source):
        if source.endswith(HDF5_SUFFIXES):
            return "hdf5"
        raise IngestUsageError(f"{source}: give a folder of per-episode CSV/NPZ files or a robomimic .hdf5 file")
    names = os.listdir(source)
    csvs, npzs = sum(n.endswith(".csv") for n in names), sum(n.endswith(".npz") for n in names)
    return "csv" if csvs >= npzs else "npz"


def _check(episodes: list[RobotEpisode], allow_nonfinite: bool, dtype: str | None = None
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
            problems.append(Problem(e.path, "bad-series", f"{e.path}: columns differ from the other episodes' "
                                    f"({[k for k, _ in sig]} vs {[k for k, _ in majority]})"))
            continue
        if not allow_nonfinite and any(not np.isfinite(a).all() for _, a in e.columns.values() if a.dtype.kind == "f"):
            wide = " (or values beyond float32's range: pass --dtype float64)" if dtype == "float32" else ""
            problems.append(Problem(e.path, "nonfinite", f"{e.path}: holds NaN/Inf or empty cells{wide}; fix it or "
                                    "pass --allow-nonfinite"))
            continue
        kept.append(e)
    return kept, problems


def ingest_robot(
    source: str,
    options: IngestOptions,
    fmt: str = "auto",
    series: list[str] | None = None,
    dtype: str | None = DEFAULT_DTYPE,
) -> IngestReport:
    """Create a store from robot data: the catalog plus one series per key, column names kept.

    Args:
        source: a folder of ``<episode>.csv`` / ``<episode>.npz`` files, or a robomimic ``.hdf5`` file.
        options: ``out`` (new store) and the shared options; ``into`` is not supported yet.
        fmt: ``auto``, ``csv``, ``npz`` or ``hdf5``.
        series: ``KEY=PATTERN,...`` groups of CSV/NPZ columns (default: all in series ``data``).
        dtype: dtype of float series (``float32`` by default, ``float64`` keeps CSV values exactly; None: as
            read); integer series keep theirs.

    Raises:
        IngestUsageError: ``--into``, a missing source, a bad ``--series``, ``--out`` onto another store.
        IngestError: ``--strict`` with problems.
    """
    started = time.perf_counter()
    if options.into:
        # robot data defines a store's catalog; adding episodes to a store is appending, not supported yet
        raise IngestUsageError(f"ingest robot --into {options.into}: adding episodes to an existing store is not "
                               "supported yet; write a new store with --out NEW_STORE (then add features to it with "
                               "ingest pt-cache|vggt --into NEW_STORE)")
    target = options.target
    if options.workers < 0:
        raise IngestUsageError(f"--workers {options.workers}: give a number of processes >= 1 (0: one per core)")
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
        what = "skipped (--skip-outside-links)" if options.skip_outside_links else \
            "read; --skip-outside-links leaves them out"
        report.notes.append(f"{len(outside):,} link(s) lead outside {source if kind != 'hdf5' else 'its folder'}, "
                            f"{what}: {', '.join(outside[:3])}" + (", ..." if len(outside) > 3 else ""))
    report.files_found = 1 if kind == "hdf5" else len(episodes) + len(file_problems)
    report.source_bytes = file_size(source) if kind == "hdf5" else sum(e.nbytes for e in episodes)
    kept, problems = _check(episodes, options.allow_nonfinite, dtype)
    report.problems = file_problems + problems
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
    report.files_usable = (1 if kind == "hdf5" else len(kept)) if kept else 0
    data = [EpisodeData(e.name, {k: a for k, (_, a) in e.columns.items()}) for e in kept]
    columns = {k: c for k, c in report.series.items()}
    report.estimated_bytes = sum(a.nbytes for e in data for a in e.series.values())
    report.estimated_files = 8 + 2 * len(columns)
    if options.dry_run or not kept:
        report.seconds = time.perf_counter() - started
        return report
    store, created = open_or_create_store(
        target, data, columns, same=lambda s: _same_series(s, data),
        other_store_hint=f"Pick a new --out (or remove {target} first to replace it)")
    if not created:
        report.notes.append("the store already holds exactly this robot data (an earlier run finished): nothing to do")
    report.files_ingested = report.files_usable
    report.store_after = store_usage(target)
    if options.verify:  # against a fresh read of the source files, not the copy in memory
        again, _, _, _ = _read_source(source, kind, groups, dtype, options, "verify")
        by_name = {e.name: e for e in again}
        fresh = [EpisodeData(e.name, {k: a for k, (_, a) in by_name[e.name].columns.items()}) for e in kept
                 if e.name in by_name and not by_name[e.name].problem]
        report.verify = _verify_series(store, fresh)
        if len(fresh) < len(kept):
            report.verify["mismatches"].append(f"{len(kept) - len(fresh)} episode(s) no longer read from the source")
            report.verify["ok"] = False
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
