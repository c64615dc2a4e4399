"""Format version 2: the commit document, one JSON object per commit (pure: no I/O).

A version-2 store is immutable objects plus a log of commits. Commit ``N`` is
the object ``_log/<N, 20 digits>.json``, created only if absent, so exactly one
writer makes each number: that is the whole concurrency protocol (the same on a
filesystem, ``os.link``, and on S3, ``If-None-Match: *``). A commit holds a
complete description of the store at that point (a *snapshot*): the catalog and
task table it uses, the segments of every series, and for every family
generation its spec, producer, segments and layout. Opening a store reads one
commit; a reader keeps its snapshot until it refreshes, and everything a
snapshot names is immutable (shard files may be replaced only to fill holes or
repair, with the same rows).

Every array a snapshot uses is listed in :attr:`Snapshot.arrays` with the
crc32c of its ``zarr.json``, and the commit carries a checksum over itself, so
every piece of metadata a reader trusts is checksummed. docs/FORMAT.md is the
prose contract of the same fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .format import (
    MAX_EPISODES,
    MAX_GENERATION,
    MAX_ROWS,
    MAX_SERIES_COLUMNS,
    MAX_STEPS,
    FamilySpec,
    FormatError,
    NewerFormatError,
    Producer,
    _dict,
    _int,
    _str,
    check_seal,
    seal,
    validate_name,
)

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "SERIES_SEGMENTS",
    "LOG_PREFIX",
    "MAX_COMMIT",
    "log_key",
    "commit_of_log_key",
    "object_id",
    "check_object_path",
    "SeriesSegment",
    "SeriesState",
    "Segment",
    "GenerationState",
    "FamilyState",
    "CatalogRef",
    "StatsRef",
    "Change",
    "Snapshot",
    "SERIES_DTYPES_V2",
]

SNAPSHOT_FORMAT_VERSION = 2

SERIES_SEGMENTS = "seriesdata"
"""Folder of series segments: ``seriesdata/<key>/s<id>`` (``series/<key>`` is the format-1 array an upgraded
store keeps using; zarr allows no array below another)."""

LOG_PREFIX = "_log"
"""Folder of the commit log: ``_log/00000000000000000001.json`` ..."""

MAX_COMMIT = 10**19 - 1
"""Commit numbers have 20 digits in the log's file names (so they sort as text)."""

SERIES_DTYPES_V2 = ("float16", "float32", "float64", "int32", "int64")
"""Series dtypes of format 2: floats as in version 1, and integers (frame and task indices)."""

_LOG_NAME = re.compile(r"^(\d{20})\.json\Z")
_OBJECT_ID = re.compile(r"^\d{8,20}-[0-9a-f]{6}\Z")
_PATH_PART = re.compile(r"^[A-Za-z0-9._\-+=@,:~]+\Z")


def log_key(commit: int) -> str:
    """Key of commit ``commit`` in the log."""
    if not 1 <= commit <= MAX_COMMIT:
        raise FormatError(f"commit number {commit} is outside 1..{MAX_COMMIT}")
    return f"{LOG_PREFIX}/{commit:020d}.json"


def commit_of_log_key(key: str) -> int | None:
    """The commit number of a log key, or None for anything else in the log folder (temporaries, hints)."""
    name = key.rsplit("/", 1)[-1]
    match = _LOG_NAME.match(name)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def object_id(commit: int, token: str) -> str:
    """Name part of an object written for commit ``commit``: ``00000007-a1b2c3``.

    ``token`` (6 hex digits, random) keeps two committers racing for the same
    number from writing the same path.
    """
    oid = f"{commit:08d}-{token}"
    if not _OBJECT_ID.match(oid):
        raise FormatError(f"object id {oid!r}: need a commit number and 6 hex digits")
    return oid


def check_object_path(path: object, where: str, prefix: str | None = None) -> str:
    """A path read from a commit: relative, '/'-separated name parts, no '..', optionally under ``prefix``.

    Raises:
        FormatError: anything that could leave the store or is not what vlastore writes.
    """
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise FormatError(f"{where}: path {path!r} is not a non-empty string; the commit is damaged")
    parts = path.split("/")
    if any(p in ("", ".", "..") or not _PATH_PART.match(p) or ".." in p for p in parts):
        raise FormatError(f"{where}: path {path!r} is not a plain relative path inside the store; refused")
    if prefix is not None and not (path == prefix or path.startswith(prefix.rstrip("/") + "/")):
        raise FormatError(f"{where}: path {path!r} is not under {prefix!r}; refused")
    return path


# ------------------------------------------------------------------ series


@dataclass(frozen=True)
class SeriesSegment:
    """One array ``[rows, columns]`` of a series: the steps one commit added."""

    path: str
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str) -> SeriesSegment:
        data = _dict(data, "a series segment", where)
        path = check_object_path(data.get("path"), where)
        if path != f"series/{key}":  # the format-1 array of an upgraded store, or a segment of format 2
            check_object_path(path, where, f"{SERIES_SEGMENTS}/{key}")
        return cls(path, _int(data, "rows", where, 0, MAX_STEPS))


@dataclass(frozen=True)
class SeriesState:
    """A robot series: column names, dtype, and its segments in order (their concatenation is the physical axis)."""

    columns: tuple[str, ...]
    dtype: str
    segments: tuple[SeriesSegment, ...] = ()

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "dtype": self.dtype, "segments": [s.to_dict() for s in self.segments]}

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str) -> SeriesState:
        data = _dict(data, "the series entry", where)
        columns = data.get("columns")
        if (
            not isinstance(columns, list)
            or not 1 <= len(columns) <= MAX_SERIES_COLUMNS
            or not all(isinstance(c, str) for c in columns)
        ):
            raise FormatError(f"{where}: columns must be a list of 1..{MAX_SERIES_COLUMNS} strings")
        dtype = data.get("dtype")
        if dtype not in SERIES_DTYPES_V2:
            raise FormatError(f"{where}: dtype {dtype!r} is not one of {SERIES_DTYPES_V2}")
        segments = data.get("segments", [])
        if not isinstance(segments, list):
            raise FormatError(f"{where}: segments must be a list")
        parsed = tuple(SeriesSegment.from_dict(s, f"{where} segment #{i}", key) for i, s in enumerate(segments))
        if sum(s.rows for s in parsed) > MAX_STEPS:
            raise FormatError(f"{where}: segments hold more than {MAX_STEPS} steps")
        return cls(tuple(columns), dtype, parsed)


# ----------------------------------------------------------------- families


@dataclass(frozen=True)
class Segment:
    """One sharded ``values`` array of a family generation, and the row tables of its rows.

    Its shard ``k`` is the generation's global shard ``first_shard + k``; global
    shard ``s`` holds stored rows ``s * rows_per_shard ...`` of the generation's
    stored row space (token rows for ragged families). Segments never overlap.
    ``rows``: the segment's physical rows (items); ``capacity``: the length of
    its ``values`` array (stored rows, counted from the segment's first shard).
    ``tables``: the folder with ``starts``/``lengths`` (ragged, per physical row,
    local to the segment) and ``key_utf8``/``key_offsets`` (row keys); None when
    the family needs neither.

    A segment may use only part of its array (written by compaction, which keeps
    the shards of an array that hold no removed rows and rewrites the others):
    ``offset`` is the array's shard number of the segment's first shard, and its
    rows are rows ``row_offset .. row_offset + rows - 1`` of the array's tables,
    which hold ``table_rows`` rows (ragged starts there count from the array's
    start). The defaults (0, 0, ``rows``) are the whole array, and are not written.
    """

    path: str
    first_shard: int
    shards: int
    rows: int = 0
    capacity: int = 0
    tables: str | None = None
    offset: int = 0
    row_offset: int = 0
    table_rows: int | None = None

    @property
    def array_rows(self) -> int:
        """Rows of the array's tables (``rows`` unless the segment uses part of its array)."""
        return self.rows if self.table_rows is None else self.table_rows

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "first_shard": self.first_shard,
            "shards": self.shards,
            "rows": self.rows,
            "capacity": self.capacity,
            "tables": self.tables,
        }
        if self.offset or self.row_offset or self.table_rows is not None:
            out.update(offset=self.offset, row_offset=self.row_offset, table_rows=self.array_rows)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str, prefix: str) -> Segment:
        data = _dict(data, "a segment", where)
        tables = data.get("tables")
        segment = cls(
            check_object_path(data.get("path"), where, prefix),
            _int(data, "first_shard", where, 0, MAX_ROWS),
            _int(data, "shards", where, 0, MAX_ROWS),
            _int(data, "rows", where, 0, MAX_ROWS),
            _int(data, "capacity", where, 0, MAX_ROWS),
            None if tables is None else check_object_path(tables, where, prefix),
            _int(data, "offset", where, 0, MAX_ROWS, default=0),
            _int(data, "row_offset", where, 0, MAX_ROWS, default=0),
            _int(data, "table_rows", where, 0, MAX_ROWS, default=None),
        )
        if segment.row_offset + segment.rows > segment.array_rows:
            raise FormatError(
                f"{where}: rows {segment.row_offset}..{segment.row_offset + segment.rows} outside the "
                f"{segment.array_rows} rows of its array; the commit is damaged"
            )
        return segment


@dataclass(frozen=True)
class GenerationState:
    """One generation of a family in a snapshot.

    ``rows``: the rows the snapshot's catalog reaches (``sum(row_count)``);
    ``capacity``: the stored row space of all segments (the last segment's end).
    ``layout``: the folder with ``row_start``/``row_count`` per catalog episode
    (physical row numbers: the segments' rows concatenated in order), written for
    the catalog version this snapshot uses.
    """

    generation: int
    spec: FamilySpec
    producer: Producer
    created: str
    segments: tuple[Segment, ...]
    layout: str
    rows: int
    capacity: int

    @property
    def shards(self) -> int:
        return sum(s.shards for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "spec": self.spec.to_dict(),
            "producer": self.producer.to_dict(),
            "created": self.created,
            "segments": [s.to_dict() for s in self.segments],
            "layout": self.layout,
            "rows": self.rows,
            "capacity": self.capacity,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, family: str) -> GenerationState:
        data = _dict(data, "a generation", where)
        generation = _int(data, "generation", where, 1, MAX_GENERATION)
        prefix = f"features/{family}/gen-{generation:04d}"
        spec = FamilySpec.from_dict(_dict(data.get("spec"), "spec", where), f"{where} spec")
        segments_raw = data.get("segments")
        if not isinstance(segments_raw, list):
            raise FormatError(f"{where}: segments must be a list")
        segments = tuple(Segment.from_dict(s, f"{where} segment #{i}", prefix) for i, s in enumerate(segments_raw))
        state = cls(
            generation=generation,
            spec=spec,
            producer=Producer.from_dict(_dict(data.get("producer", {}), "producer", where), f"{where} producer"),
            created=_str(data, "created", where),
            segments=segments,
            layout=check_object_path(data.get("layout"), where, prefix),
            rows=_int(data, "rows", where, 0, MAX_ROWS),
            capacity=_int(data, "capacity", where, 0, MAX_ROWS),
        )
        state.check(where)
        return state

    def check(self, where: str) -> None:
        """Segments tile the shard space in order, each holds what it says, and the capacity is the last one's end."""
        shard = 0
        rows_per_shard = self.spec.rows_per_shard
        for i, segment in enumerate(self.segments):
            if segment.first_shard != shard:
                raise FormatError(f"{where}: segment #{i} starts at shard {segment.first_shard}, expected {shard}")
            if segment.shards != -(-segment.capacity // rows_per_shard):
                raise FormatError(
                    f"{where}: segment #{i} has {segment.shards} shards for {segment.capacity} "
                    f"stored rows of {rows_per_shard} per shard"
                )
            if (not self.spec.ragged and segment.rows != segment.capacity) or segment.rows > segment.capacity:
                raise FormatError(f"{where}: segment #{i} has {segment.rows} rows in {segment.capacity} stored rows")
            if (self.spec.ragged or self.spec.has_keys) and segment.tables is None:
                raise FormatError(f"{where}: segment #{i} has no row tables (starts/lengths/keys)")
            shard += segment.shards
        end = self.segments[-1].first_shard * rows_per_shard + self.segments[-1].capacity if self.segments else 0
        if self.capacity != end:
            raise FormatError(f"{where}: capacity {self.capacity} is not the end of the last segment ({end})")
        if self.rows > sum(s.rows for s in self.segments):
            raise FormatError(f"{where}: {self.rows} rows, more than the segments hold")


@dataclass(frozen=True)
class FamilyState:
    """A family in a snapshot: the generation readers use and every generation kept."""

    current_generation: int
    generations: dict[int, GenerationState]

    def to_dict(self) -> dict[str, Any]:
        return {
            "current_generation": self.current_generation,
            "generations": {str(g): s.to_dict() for g, s in sorted(self.generations.items())},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, family: str) -> FamilyState:
        data = _dict(data, "the family entry", where)
        current = _int(data, "current_generation", where, 1, MAX_GENERATION)
        raw = _dict(data.get("generations"), "generations", where)
        generations: dict[int, GenerationState] = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not key.isdigit():
                raise FormatError(f"{where}: generation key {key!r} is not a number")
            state = GenerationState.from_dict(value, f"{where} generation {key}", family)
            if state.generation != int(key):
                raise FormatError(f"{where}: generation {key} says it is generation {state.generation}")
            generations[state.generation] = state
        if current not in generations:
            raise FormatError(f"{where}: current generation {current} is not among {sorted(generations)}")
        specs = {g.spec for g in generations.values()}
        if len(specs) != 1:
            raise FormatError(f"{where}: generations disagree on the row spec")
        return cls(current, generations)


# -------------------------------------------------------------------- stats


_CRC = re.compile(r"^crc32c:[0-9a-f]{8}\Z")
QUANTILE_METHODS = (
    "inverted_cdf",
    "averaged_inverted_cdf",
    "closest_observation",
    "interpolated_inverted_cdf",
    "hazen",
    "weibull",
    "linear",
    "median_unbiased",
    "normal_unbiased",
    "lower",
    "higher",
    "midpoint",
    "nearest",
)
"""``np.quantile``'s methods: the only values a commit's ``stats.method`` may hold."""


@dataclass(frozen=True)
class StatsRef:
    """The statistics stored with a commit: of every series over the snapshot's episodes (``stats/s<id>/<key>``).

    Each ``<key>`` array is float64 ``[5 + len(quantiles), columns]``: rows count, mean, std, min, max,
    then one row per quantile (in ``quantiles``' order, ``np.quantile(..., method=method)``).
    ``values``: per key, crc32c of the array's values (little-endian float64, C order), so a stored
    value that was changed is refused even where its chunk's own crc was recomputed.
    """

    path: str
    quantiles: tuple[float, ...]
    method: str
    values: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "quantiles": list(self.quantiles),
            "method": self.method,
            "values": dict(sorted(self.values.items())),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StatsRef:
        data = _dict(data, "the stats entry", where)
        qs = data.get("quantiles")
        if (
            not isinstance(qs, list)
            or len(qs) > 64
            or not all(isinstance(q, (int, float)) and not isinstance(q, bool) and 0 <= q <= 1 for q in qs)
        ):
            raise FormatError(f"{where}: quantiles must be a list of at most 64 probabilities in [0, 1]")
        method = data.get("method")
        if method not in QUANTILE_METHODS:
            raise FormatError(f"{where}: method {method!r} is not one of np.quantile's")
        values = _dict(data.get("values"), "values", where)
        for key, crc in values.items():
            validate_name(key, f"{where}: series key")
            if not isinstance(crc, str) or not _CRC.match(crc):
                raise FormatError(f"{where}: checksum {crc!r} of {key!r} is not crc32c:<8 hex digits>")
        return cls(check_object_path(data.get("path"), where, "stats"), tuple(float(q) for q in qs), method, values)


# ------------------------------------------------------------------ catalog


@dataclass(frozen=True)
class CatalogRef:
    """The catalog arrays a snapshot uses (``catalog/<id>/...``) and the task table (``tasks/<id>/...``)."""

    path: str
    episodes: int
    steps: int
    tasks_path: str | None = None
    tasks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "episodes": self.episodes,
            "steps": self.steps,
            "tasks_path": self.tasks_path,
            "tasks": self.tasks,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CatalogRef:
        data = _dict(data, "the catalog entry", where)
        tasks_path = data.get("tasks_path")
        return cls(
            check_object_path(data.get("path"), where, "catalog"),
            _int(data, "episodes", where, 0, MAX_EPISODES),
            _int(data, "steps", where, 0, MAX_STEPS),
            None if tasks_path is None else check_object_path(tasks_path, where, "tasks"),
            _int(data, "tasks", where, 0, MAX_EPISODES),
        )


@dataclass(frozen=True)
class Change:
    """What a commit did, for ``vlastore log``: an operation and its details (episode names, family, ...)."""

    op: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **self.details}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Change:
        data = _dict(data, "a change", where)
        op = data.get("op")
        if not isinstance(op, str) or not op:
            raise FormatError(f"{where}: a change without an 'op'")
        return cls(op, {k: v for k, v in data.items() if k != "op"})

    def summary(self, limit: int = 3) -> str:
        names = self.details.get("episodes")
        if isinstance(names, list):
            shown = ", ".join(str(n) for n in names[:limit]) + (f", ... ({len(names)})" if len(names) > limit else "")
            return f"{self.op} {shown}"
        rest = ", ".join(f"{k}={v}" for k, v in self.details.items())
        return f"{self.op} {rest}".strip()


# ----------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class Snapshot:
    """The store as one commit describes it."""

    commit: int
    parent: int | None
    time: str
    vlastore_version: str
    changes: tuple[Change, ...]
    next_episode_id: int
    catalog: CatalogRef
    series: dict[str, SeriesState]
    families: dict[str, FamilyState]
    arrays: dict[str, str]
    """Every array path this snapshot uses -> ``crc32c:<hex>`` of its ``zarr.json``."""
    format_version: int = SNAPSHOT_FORMAT_VERSION
    stats: StatsRef | None = None
    """Statistics of the series over this snapshot's episodes (None: a commit written without them)."""

    def to_dict(self) -> dict[str, Any]:
        """The commit document as written, sealed with its checksum."""
        document: dict[str, Any] = {
            "format_version": self.format_version,
            "commit": self.commit,
            "parent": self.parent,
            "time": self.time,
            "vlastore_version": self.vlastore_version,
            "changes": [c.to_dict() for c in self.changes],
            "next_episode_id": self.next_episode_id,
            "catalog": self.catalog.to_dict(),
            "series": {k: v.to_dict() for k, v in sorted(self.series.items())},
            "families": {k: v.to_dict() for k, v in sorted(self.families.items())},
            "arrays": dict(sorted(self.arrays.items())),
        }
        if self.stats is not None:  # absent, not null, when there are none: commits as written before
            document["stats"] = self.stats.to_dict()
        return seal(document)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Snapshot:
        """Parse, verify the checksum of, and validate a commit document.

        Raises:
            NewerFormatError: written by a newer vlastore. FormatError: damaged, or not a commit.
        """
        data = _dict(data, "the commit", where)
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise FormatError(f"{where}: no integer format_version; not a vlastore commit")
        if version > SNAPSHOT_FORMAT_VERSION:
            raise NewerFormatError(
                f"{where} was written in vlastore format version {version} (by vlastore "
                f"{data.get('vlastore_version', '?')}); this vlastore reads versions up to "
                f"{SNAPSHOT_FORMAT_VERSION}. Upgrade: pip install -U vlastore"
            )
        if version != SNAPSHOT_FORMAT_VERSION:
            raise FormatError(f"{where}: format_version {version} in a commit log; damaged")
        if not check_seal(data, where):
            raise FormatError(f"{where}: a commit without its checksum; damaged")
        commit = _int(data, "commit", where, 1, MAX_COMMIT)
        parent = _int(data, "parent", where, 1, MAX_COMMIT, default=None)
        if parent is not None and parent >= commit:
            raise FormatError(f"{where}: parent {parent} is not before commit {commit}")
        changes = data.get("changes", [])
        if not isinstance(changes, list):
            raise FormatError(f"{where}: changes must be a list")
        series = {
            validate_name(k, f"{where}: series key"): SeriesState.from_dict(v, f"{where} series {k!r}", k)
            for k, v in _dict(data.get("series", {}), "series", where).items()
        }
        families = {
            validate_name(k, f"{where}: family name"): FamilyState.from_dict(v, f"{where} family {k!r}", k)
            for k, v in _dict(data.get("families", {}), "families", where).items()
        }
        arrays_raw = _dict(data.get("arrays", {}), "arrays", where)
        arrays = {}
        for path, checksum in arrays_raw.items():
            check_object_path(path, f"{where} arrays")
            if not isinstance(checksum, str) or not re.fullmatch(r"crc32c:[0-9a-f]{8}", checksum):
                raise FormatError(f"{where}: checksum {checksum!r} of {path!r} is not crc32c:<8 hex digits>")
            arrays[path] = checksum
        return cls(
            commit=commit,
            parent=parent,
            time=_str(data, "time", where),
            vlastore_version=_str(data, "vlastore_version", where),
            changes=tuple(Change.from_dict(c, f"{where} change #{i}") for i, c in enumerate(changes)),
            next_episode_id=_int(data, "next_episode_id", where, 0, MAX_EPISODES * 16),
            catalog=CatalogRef.from_dict(data.get("catalog"), f"{where} catalog"),
            series=series,
            families=families,
            arrays=arrays,
            format_version=version,
            stats=None if data.get("stats") is None else StatsRef.from_dict(data["stats"], f"{where} stats"),
        )

    # ------------------------------------------------------------ helpers

    def folders(self) -> set[str]:
        """Every object folder this snapshot's catalog, statistics, series and families live in."""
        paths = {self.catalog.path}
        if self.catalog.tasks_path:
            paths.add(self.catalog.tasks_path)
        if self.stats is not None:
            paths.add(self.stats.path)
        for state in self.series.values():
            paths.update(s.path for s in state.segments)
        for family in self.families.values():
            for generation in family.generations.values():
                paths.add(generation.layout)
                paths.update(s.path for s in generation.segments)
                paths.update(s.tables for s in generation.segments if s.tables)
        return paths

    def referenced_paths(self) -> set[str]:
        """Every object folder this snapshot needs (gc keeps these for retained commits): its folders and arrays."""
        return self.folders() | set(self.arrays)

    def evolve(self, commit: int, time: str, changes: Iterable[Change], **fields: Any) -> Snapshot:
        """The next snapshot: this one with ``fields`` replaced, numbered ``commit``, parent = this one."""
        return replace(self, commit=commit, parent=self.commit, time=time, changes=tuple(changes), **fields)


def merge_arrays(*parts: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        out.update(part)
    return out
