"""Format 2 on storage: the arrays a commit names, written once and read back checked.

:mod:`vlastore.snapshot` is the commit document (pure); :mod:`vlastore.commitlog`
makes commits. This module writes and reads what a commit points at: the
portable catalog (``catalog/c<id>/``: names as UTF-8 bytes + offsets, no zarr
string dtype, so every zarr v3 reader opens it), the task table, series
segments, family segments (a sharded ``values`` array and its row tables) and
per-catalog layouts (``row_start``/``row_count`` per episode). Every array it
writes is recorded with the crc32c of its ``zarr.json``; every array it reads
is checked against that record first. :class:`~vlastore.store.VLAStore` is the
only caller.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from crc32c import crc32c

from .catalog import Catalog
from .family import FamilyHandle, v2_layout
from .family import Segment as HandleSegment
from .format import FamilySpec, FormatError, GenerationInfo, meta_key, shard_key
from .integrity import check_array_meta, sharded_array_meta
from .layout import pack_ragged
from .nodes import ZarrNodes
from .shardcodec import CRC_BYTES, MISSING, ChecksumError, crc_ok, decode_index, index_nbytes
from .snapshot import GenerationState, Segment, Snapshot, object_id

__all__ = [
    "CatalogData",
    "ArrayWriter",
    "SegmentRows",
    "read_catalog",
    "read_small",
    "read_row_map",
    "read_keys_v2",
    "attrs_json",
    "fps_value",
    "write_catalog",
    "read_generation",
    "new_segment",
    "write_layout",
    "pack_utf8",
    "unpack_utf8",
    "new_token",
    "check_meta_crc",
    "compact_generation",
]

MAX_ATTRS_BYTES = 1 << 20
"""One episode's attributes (JSON) at most; more is refused at ingest."""


def new_token() -> str:
    """6 random hex digits: keeps objects of two racing committers apart."""
    return secrets.token_hex(3)


def pack_utf8(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one uint8 array of UTF-8 bytes and int64 offsets (``len + 1``): portable to every zarr reader."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_utf8(data: np.ndarray, offsets: np.ndarray, where: str) -> list[str]:
    """Inverse of :func:`pack_utf8`, checked (offsets ascend inside the bytes, valid UTF-8)."""
    if (
        offsets.ndim != 1
        or offsets.size < 1
        or offsets[0] != 0
        or int(offsets[-1]) != data.size
        or (offsets.size > 1 and np.diff(offsets).min() < 0)
    ):
        raise FormatError(f"{where}: offsets do not cut the bytes in order; damaged")
    raw = data.tobytes()
    try:
        return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: not UTF-8 ({exc}); damaged") from None


class ArrayWriter:
    """Writes the new arrays of one commit attempt and records the crc32c of each one's ``zarr.json``."""

    def __init__(self, nodes: ZarrNodes, commit: int, token: str | None = None) -> None:
        self.nodes = nodes
        self.commit = commit
        self.token = token or new_token()
        self.arrays: dict[str, str] = {}

    def oid(self, letter: str) -> str:
        return letter + object_id(self.commit, self.token)

    def record(self, path: str, data: bytes | None = None) -> None:
        data = data if data is not None else self.nodes.storage.get(meta_key(path))
        if data is None:
            raise FormatError(f"{self.nodes.storage.where(path)}: vanished right after it was written")
        self.arrays[path] = f"crc32c:{crc32c(data):08x}"

    def small(self, path: str, data: np.ndarray) -> None:
        self.record(path, self.nodes.write_small_fast(path, data))


def check_meta_crc(nodes: ZarrNodes, path: str, arrays: dict[str, str]) -> bytes:
    """The array's ``zarr.json`` is the one the commit recorded (crc32c)."""
    expected = arrays.get(path)
    where = nodes.storage.where(meta_key(path))
    if expected is None:
        raise FormatError(f"{where}: the commit does not record this array's checksum; the commit is damaged")
    data = nodes.storage.get(meta_key(path))
    if data is None:
        raise FormatError(f"{where}: missing (removed by hand, or by gc while this snapshot was in use); damaged")
    if f"crc32c:{crc32c(data):08x}" != expected:
        raise FormatError(f"{where}: metadata checksum mismatch with the commit; damaged or edited")
    return data


def read_small(nodes: ZarrNodes, path: str, shape: tuple[int, ...], dtype: str, arrays: dict[str, str]) -> np.ndarray:
    """A small array whose ``zarr.json`` is the one the commit recorded, of the shape and type expected."""
    raw = check_meta_crc(nodes, path, arrays)
    where = nodes.storage.where(path)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{where}: zarr.json is not JSON; damaged") from None
    if not isinstance(meta, dict) or meta.get("shape") != list(shape) or meta.get("data_type") != dtype:
        got = (meta.get("shape"), meta.get("data_type")) if isinstance(meta, dict) else meta
        raise FormatError(f"{where}: shape and type {got}, expected {list(shape)} of {dtype}; damaged")
    codecs = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs", [])]
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    if (
        codecs == ["bytes", "zstd", "crc32c"]
        and isinstance(grid, list)
        and grid[1:] == list(shape[1:])
        and isinstance(grid[0], int)
        and grid[0] >= 1
        and shape
    ):
        data = nodes.read_small_fast(path, meta)  # zarr's bytes, read without its per-array overhead
    else:
        data = nodes.read_small_array(path)
    if data.shape != shape:
        raise FormatError(f"{where}: read shape {data.shape}, expected {shape}; damaged")
    return data


# ------------------------------------------------------------------ catalog


@dataclass
class CatalogData:
    """One catalog version in memory: per-episode columns, in catalog (= physical append) order."""

    names: list[str]
    episode_id: np.ndarray
    steps: np.ndarray
    step_start: np.ndarray
    fps: np.ndarray
    task: np.ndarray
    attrs: list[str]
    tasks: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls) -> CatalogData:
        z = np.zeros(0, dtype=np.int64)
        return cls([], z, z, z, np.zeros(0), z, [], [])

    def catalog(self) -> Catalog:
        return Catalog(self.names, self.steps)

    def take(self, keep: np.ndarray) -> CatalogData:
        idx = np.flatnonzero(keep)
        return CatalogData(
            [self.names[i] for i in idx.tolist()],
            self.episode_id[idx],
            self.steps[idx],
            self.step_start[idx],
            self.fps[idx],
            self.task[idx],
            [self.attrs[i] for i in idx.tolist()],
            list(self.tasks),
        )

    def extend(self, other: CatalogData) -> CatalogData:
        return CatalogData(
            self.names + other.names,
            np.concatenate([self.episode_id, other.episode_id]),
            np.concatenate([self.steps, other.steps]),
            np.concatenate([self.step_start, other.step_start]),
            np.concatenate([self.fps, other.fps]),
            np.concatenate([self.task, other.task]),
            self.attrs + other.attrs,
            list(other.tasks or self.tasks),
        )


_CATALOG_INT = ("episode_id", "steps", "step_start", "task")


def write_catalog(out: ArrayWriter, data: CatalogData) -> tuple[str, str]:
    """Write a catalog version and its task table; returns their folders."""
    base = f"catalog/{out.oid('c')}"
    name_bytes, name_offsets = pack_utf8(data.names)
    out.small(f"{base}/name_utf8", name_bytes)
    out.small(f"{base}/name_offsets", name_offsets)
    for column in _CATALOG_INT:
        out.small(f"{base}/{column}", np.asarray(getattr(data, column), dtype=np.int64))
    out.small(f"{base}/fps", np.asarray(data.fps, dtype=np.float64))
    attr_bytes, attr_offsets = pack_utf8(data.attrs)
    out.small(f"{base}/attrs_utf8", attr_bytes)
    out.small(f"{base}/attrs_offsets", attr_offsets)
    tasks = f"tasks/{out.oid('t')}"
    text, offsets = pack_utf8(data.tasks)
    out.small(f"{tasks}/text_utf8", text)
    out.small(f"{tasks}/text_offsets", offsets)
    return base, tasks


def _utf8(nodes: ZarrNodes, base: str, stem: str, count: int, arrays: dict[str, str]) -> list[str]:
    offsets = read_small(nodes, f"{base}/{stem}_offsets", (count + 1,), "int64", arrays)
    total = int(offsets[-1])
    if total < 0 or total > 1 << 34:
        raise FormatError(f"{nodes.storage.where(base)}: {stem} offsets end at {total}; damaged")
    data = read_small(nodes, f"{base}/{stem}_utf8", (total,), "uint8", arrays)
    return unpack_utf8(data, offsets, nodes.storage.where(f"{base}/{stem}_offsets"))


def read_catalog(nodes: ZarrNodes, snapshot: Snapshot) -> CatalogData:
    """The snapshot's catalog, every array checked against the commit and the columns against each other.

    Raises:
        FormatError: damaged, naming the array.
    """
    ref, arrays = snapshot.catalog, snapshot.arrays
    n, base = ref.episodes, ref.path
    names = _utf8(nodes, base, "name", n, arrays)
    ints = {c: read_small(nodes, f"{base}/{c}", (n,), "int64", arrays) for c in _CATALOG_INT}
    fps = read_small(nodes, f"{base}/fps", (n,), "float64", arrays)
    attrs = _utf8(nodes, base, "attrs", n, arrays)
    tasks = _utf8(nodes, ref.tasks_path, "text", ref.tasks, arrays) if ref.tasks_path else []
    where = nodes.storage.where(base)
    if int(ints["steps"].sum()) != ref.steps or (n and ints["steps"].min() < 0):
        raise FormatError(f"{where}: steps add up to {int(ints['steps'].sum())}, the commit says {ref.steps}; damaged")
    if n and (ints["task"].min() < -1 or ints["task"].max() >= len(tasks)):
        raise FormatError(f"{where}: a task index outside the task table ({len(tasks)} tasks); damaged")
    for key, state in snapshot.series.items():
        if n and (ints["step_start"].min() < 0 or int((ints["step_start"] + ints["steps"]).max()) > state.rows):
            raise FormatError(f"{where}: an episode's steps lie outside series {key!r} ({state.rows} steps); damaged")
    data = CatalogData(names, ints["episode_id"], ints["steps"], ints["step_start"], fps, ints["task"], attrs, tasks)
    try:
        data.catalog()  # names valid and unique
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    return data


# ----------------------------------------------------------------- families


@dataclass
class SegmentRows:
    """What a new family segment holds: rows per episode (segment order), ragged lengths, row keys."""

    items: np.ndarray
    lengths: np.ndarray | None = None
    keys: list[str] | None = None


def new_segment(
    out: ArrayWriter, family: str, generation: int, spec: FamilySpec, first_shard: int, rows: SegmentRows
) -> Segment | None:
    """Write a new segment (its empty ``values`` array and its tables); None when it has no rows."""
    total = int(np.asarray(rows.items, dtype=np.int64).sum())
    if total == 0:
        return None
    rps = spec.rows_per_shard
    base = f"features/{family}/gen-{generation:04d}/{out.oid('s')}"
    tables = None
    if spec.ragged:
        if rows.lengths is None or len(rows.lengths) != total:
            raise FormatError(f"family {family!r}: a ragged family needs one length per new row ({total})")
        lengths = np.asarray(rows.lengths, dtype=np.int64)
        starts = pack_ragged(lengths, rps)
        capacity = int(starts[-1] + lengths[-1])
        out.small(f"{base}/starts", starts)
        out.small(f"{base}/lengths", lengths)
        tables = base
    else:
        capacity = total
    if spec.has_keys:
        if rows.keys is None or len(rows.keys) != total:
            raise FormatError(f"family {family!r} has row keys: give one key per new row ({total})")
        key_bytes, key_offsets = pack_utf8(rows.keys)
        out.small(f"{base}/key_utf8", key_bytes)
        out.small(f"{base}/key_offsets", key_offsets)
        tables = base
    values = f"{base}/values"
    out.nodes.create_sharded_array(
        values,
        capacity,
        spec.row_shape,
        spec.storage_dtype,
        rps,
        spec.compression,
        attributes={"true_dtype": spec.dtype},
    )
    out.record(values)
    return Segment(values, first_shard, -(-capacity // rps), total, capacity, tables)


def write_layout(out: ArrayWriter, family: str, generation: int, row_start: np.ndarray, row_count: np.ndarray) -> str:
    base = f"features/{family}/gen-{generation:04d}/{out.oid('l')}"
    out.small(f"{base}/row_start", np.asarray(row_start, dtype=np.int64))
    out.small(f"{base}/row_count", np.asarray(row_count, dtype=np.int64))
    return base


def read_row_map(
    nodes: ZarrNodes, state: GenerationState, episodes: int, arrays: dict[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """``row_start``/``row_count`` of each catalog episode (physical rows)."""
    start = read_small(nodes, f"{state.layout}/row_start", (episodes,), "int64", arrays)
    count = read_small(nodes, f"{state.layout}/row_count", (episodes,), "int64", arrays)
    return start, count


def read_generation(
    nodes: ZarrNodes, family: str, state: GenerationState, catalog: Catalog, arrays: dict[str, str]
) -> FamilyHandle:
    """The handle of one generation of a format-2 snapshot, every table checked.

    Raises:
        FormatError: damaged metadata or tables (naming the array).
    """
    spec = state.spec
    where = nodes.storage.where(f"features/{family}/gen-{state.generation:04d}")
    checked: set[str] = set()
    for segment in state.segments:
        if segment.path not in checked:  # parts of one array (after a compaction): checked once
            _check_segment_array(nodes, spec, segment, state.segments, arrays)
            checked.add(segment.path)
    row_start, row_count = read_row_map(nodes, state, len(catalog), arrays)
    local_starts = local_lengths = None
    if spec.ragged:
        local_starts, local_lengths = [], []
        tables: dict[Any, Any] = {}
        for segment in state.segments:
            starts, lengths = _segment_rows(nodes, spec, segment, arrays, tables)
            local_starts.append(starts)
            local_lengths.append(lengths)
    layout, physical = v2_layout(
        spec,
        [HandleSegment(s.path, s.first_shard, s.shards, s.offset) for s in state.segments],
        [s.rows for s in state.segments],
        [s.capacity for s in state.segments],
        row_start,
        row_count,
        local_starts,
        local_lengths,
        where,
    )
    if layout.rows != state.rows:
        raise FormatError(f"{where}: the layout has {layout.rows} rows, the commit says {state.rows}; damaged")
    info = GenerationInfo(state.generation, spec, state.producer, layout.rows, layout.capacity, state.created)
    handle = FamilyHandle(
        nodes.storage,
        family,
        info,
        layout,
        catalog,
        [HandleSegment(s.path, s.first_shard, s.shards, s.offset) for s in state.segments],
        writable=nodes.writable,
    )
    handle.physical_rows = physical  # type: ignore[attr-defined]
    return handle


def _check_segment_array(
    nodes: ZarrNodes, spec: FamilySpec, segment: Segment, segments: Sequence[Segment], arrays: dict[str, str]
) -> None:
    """A segment's ``values`` array is the one the commit recorded, of the spec's type, and holds every part of it
    the snapshot uses (a short last shard only at the array's end)."""
    raw = check_meta_crc(nodes, segment.path, arrays)
    where = nodes.storage.where(meta_key(segment.path))
    parts = [s for s in segments if s.path == segment.path]
    rps = spec.rows_per_shard
    if len(parts) == 1 and segment.offset == 0:
        capacity = segment.capacity
    else:
        try:
            shape = json.loads(raw).get("shape")
            capacity = int(shape[0])
        except (ValueError, TypeError, AttributeError, IndexError, UnicodeDecodeError):
            raise FormatError(f"{where}: zarr.json has no shape; damaged") from None
        for part in parts:
            end = part.offset * rps + part.capacity
            if end > capacity or (part.capacity % rps and end != capacity):
                raise FormatError(f"{where}: a segment uses stored rows up to {end} of {capacity}; damaged")
    check_array_meta(nodes.read_json(meta_key(segment.path)), sharded_array_meta(spec, capacity), where)


def read_keys_v2(nodes: ZarrNodes, state: GenerationState, physical: np.ndarray, arrays: dict[str, str]) -> list[str]:
    keys: list[str] = []
    tables: dict[str, list[str]] = {}
    for segment in state.segments:
        assert segment.tables is not None
        if segment.tables not in tables:
            tables[segment.tables] = _utf8(nodes, segment.tables, "key", segment.array_rows, arrays)
        keys.extend(tables[segment.tables][segment.row_offset : segment.row_offset + segment.rows])
    return [keys[p] for p in physical.tolist()]


def fps_value(fps: float | None, name: str) -> float:
    """An episode's fps as stored: NaN when unknown, else a finite positive number (checked)."""
    if fps is None:
        return math.nan
    if isinstance(fps, bool) or not isinstance(fps, int | float | np.integer | np.floating):
        raise FormatError(f"episode {name!r}: fps must be a number, got {type(fps).__name__}")
    if not math.isfinite(fps) or fps <= 0:
        raise FormatError(f"episode {name!r}: fps is {fps}; give a positive number of frames per second, or None")
    return float(fps)


def attrs_json(attrs: dict[str, Any] | None, name: str) -> str:
    """An episode's free attributes as canonical JSON (checked: an object, bounded)."""
    if attrs is None:
        return "{}"
    if not isinstance(attrs, dict):
        raise FormatError(f"episode {name!r}: attrs must be a dict (JSON object), got {type(attrs).__name__}")
    try:
        text = json.dumps(attrs, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"episode {name!r}: attrs are not JSON ({exc})") from None
    if len(text.encode()) > MAX_ATTRS_BYTES:
        raise FormatError(f"episode {name!r}: attrs take more than {MAX_ATTRS_BYTES} bytes as JSON")
    return text


# --------------------------------------------------------------- compaction


@dataclass
class _Rewrite:
    """Rows of one generation being copied into a new array: where each comes from and goes to."""

    old_start: list[np.ndarray] = field(default_factory=list)
    """Global stored start of each copied row in the generation (old shard space)."""
    new_start: list[np.ndarray] = field(default_factory=list)
    """Its stored start in the new array."""
    lengths: list[np.ndarray] = field(default_factory=list)
    physical: list[np.ndarray] = field(default_factory=list)
    """Its old physical row (for its row key)."""


def _segment_rows(
    nodes: ZarrNodes, spec: FamilySpec, segment: Segment, arrays: dict[str, str], cache: dict[Any, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Stored start of each of a segment's rows, counted from the segment's first shard, and its length."""
    if not spec.ragged:
        return np.arange(segment.rows, dtype=np.int64), np.ones(segment.rows, dtype=np.int64)
    assert segment.tables is not None
    if segment.tables not in cache:
        n = segment.array_rows
        cache[segment.tables] = (
            read_small(nodes, f"{segment.tables}/starts", (n,), "int64", arrays),
            read_small(nodes, f"{segment.tables}/lengths", (n,), "int64", arrays),
        )
    starts, lengths = cache[segment.tables]
    rows = slice(segment.row_offset, segment.row_offset + segment.rows)
    return starts[rows] - segment.offset * spec.rows_per_shard, lengths[rows]


def _shards_to_rewrite(
    spec: FamilySpec, segments: Sequence[Segment], row_shard: np.ndarray, live: np.ndarray, merge_small: bool
) -> np.ndarray:
    """Bool per global shard: rewrite it (it holds rows no episode reaches, or it is one of a run of small
    segments that many appends left: each a partial shard)."""
    total = sum(s.shards for s in segments)
    rewrite = np.zeros(total, dtype=bool)
    rewrite[np.unique(row_shard[~live])] = True
    if merge_small:
        small = [s.shards == 1 and s.capacity < spec.rows_per_shard for s in segments]
        i = 0
        while i < len(segments):
            j = i
            while j < len(segments) and small[j]:
                j += 1
            if j - i >= 2:
                rewrite[segments[i].first_shard : segments[j - 1].first_shard + 1] = True
            i = max(j, i + 1)
    return rewrite


def compact_generation(
    out: ArrayWriter,
    family: str,
    state: GenerationState,
    row_start: np.ndarray,
    row_count: np.ndarray,
    arrays: dict[str, str],
    merge_small: bool = True,
) -> tuple[tuple[Segment, ...], np.ndarray] | None:
    """Rewrite the shards of a generation that hold rows no catalog episode reaches (and runs of small segments)
    into one new array; every other shard stays where it is, as part of its array.

    Rows keep their bytes (chunks are copied as stored, crc32c checked), missing rows stay missing (a row
    with a missing or damaged chunk is left out: it is missing in the new array, and a writer fills it).
    The physical order of the rows the catalog reaches is kept, so each episode's rows stay one run.

    Returns:
        The new segments and each episode's new ``row_start`` (``row_count`` is unchanged), or None when
        nothing needs rewriting.
    """
    spec, nodes = state.spec, out.nodes
    rps = spec.rows_per_shard
    segments = state.segments
    if not segments:
        return None
    cache: dict[Any, Any] = {}
    parts = [_segment_rows(nodes, spec, s, arrays, cache) for s in segments]
    stored = np.concatenate([s.first_shard * rps + p[0] for s, p in zip(segments, parts, strict=True)])
    lengths = np.concatenate([p[1] for p in parts])
    episode_rows = np.concatenate([[0], np.cumsum(row_count)]).astype(np.int64)
    physical = np.repeat(row_start - episode_rows[:-1], row_count) + np.arange(int(episode_rows[-1]), dtype=np.int64)
    live = np.zeros(len(stored), dtype=bool)
    live[physical] = True
    rewrite = _shards_to_rewrite(spec, segments, stored // rps, live, merge_small)
    if not rewrite.any():
        return None
    # every global shard, in order: kept runs become parts of their old array, rewritten runs parts of the new one
    shard_lo = np.searchsorted(stored, np.arange(len(rewrite) + 1, dtype=np.int64) * rps, side="left")
    seg_of_shard = np.repeat(np.arange(len(segments)), [s.shards for s in segments])
    phys_base = np.concatenate([[0], np.cumsum([s.rows for s in segments])]).astype(np.int64)
    new_path = f"features/{family}/gen-{state.generation:04d}/{out.oid('s')}"
    job = _Rewrite()
    pieces: list[Segment] = []
    first, array_shard, array_rows = 0, 0, 0
    g = 0
    while g < len(rewrite):
        end = g + 1
        # a kept run stays inside one array; a rewritten run may span segments (its rows go to one new array)
        while (
            end < len(rewrite) and rewrite[end] == rewrite[g] and (rewrite[g] or seg_of_shard[end] == seg_of_shard[g])
        ):
            end += 1
        lo, hi = int(shard_lo[g]), int(shard_lo[end])
        if not rewrite[g]:
            seg = segments[int(seg_of_shard[g])]
            local0 = g - seg.first_shard
            last = seg.first_shard + seg.shards == end
            capacity = seg.capacity - local0 * rps if last else (end - g) * rps
            pieces.append(
                Segment(
                    seg.path,
                    first,
                    end - g,
                    hi - lo,
                    capacity,
                    seg.tables,
                    seg.offset + local0,
                    seg.row_offset + lo - int(phys_base[int(seg_of_shard[g])]) if seg.tables else 0,
                    seg.array_rows if seg.tables else None,
                )
            )
            first += end - g
        else:
            rows = lo + np.flatnonzero(live[lo:hi])
            if rows.size:
                lens = lengths[rows]
                local = pack_ragged(lens, rps) if spec.ragged else np.arange(rows.size, dtype=np.int64)
                capacity = int(local[-1] + lens[-1])
                shards = -(-capacity // rps)
                job.old_start.append(stored[rows])
                job.new_start.append(array_shard * rps + local)
                job.lengths.append(lens)
                job.physical.append(rows)
                tables = new_path if (spec.ragged or spec.has_keys) else None
                pieces.append(
                    Segment(f"{new_path}/values", first, shards, rows.size, capacity, tables, array_shard, array_rows)
                )
                first += shards
                array_shard += shards
                array_rows += rows.size
        g = end
    if job.old_start:
        _write_rewrite(out, family, state, segments, new_path, job, arrays, cache)
        pieces = [
            replace(p, table_rows=array_rows if p.tables else None) if p.path == f"{new_path}/values" else p
            for p in pieces
        ]
    new_index = np.cumsum(live) - 1
    new_start = np.where(row_count > 0, new_index[np.minimum(row_start, max(len(live) - 1, 0))], 0)
    return tuple(pieces), new_start.astype(np.int64)


def _write_rewrite(
    out: ArrayWriter,
    family: str,
    state: GenerationState,
    segments: Sequence[Segment],
    new_path: str,
    job: _Rewrite,
    arrays: dict[str, str],
    cache: dict[Any, Any],
) -> None:
    """The new array of a compaction: its tables, metadata and shard files (chunks copied as they are)."""
    spec, nodes = state.spec, out.nodes
    rps = spec.rows_per_shard
    old_start, new_start = np.concatenate(job.old_start), np.concatenate(job.new_start)
    lengths, physical = np.concatenate(job.lengths), np.concatenate(job.physical)
    if spec.ragged:
        out.small(f"{new_path}/starts", new_start)
        out.small(f"{new_path}/lengths", lengths)
    if spec.has_keys:
        keys: list[str] = []
        for seg in segments:
            assert seg.tables is not None
            if ("keys", seg.tables) not in cache:
                cache[("keys", seg.tables)] = _utf8(nodes, seg.tables, "key", seg.array_rows, arrays)
            keys.extend(cache[("keys", seg.tables)][seg.row_offset : seg.row_offset + seg.rows])
        key_bytes, key_offsets = pack_utf8([keys[p] for p in physical.tolist()])
        out.small(f"{new_path}/key_utf8", key_bytes)
        out.small(f"{new_path}/key_offsets", key_offsets)
    values = f"{new_path}/values"
    capacity = int(new_start[-1] + lengths[-1])
    attributes = {"true_dtype": spec.dtype}
    nodes.create_sharded_array(values, capacity, spec.row_shape, spec.storage_dtype, rps, spec.compression, attributes)
    out.record(values)
    ndim = 1 + len(spec.row_shape)
    n_index = index_nbytes(rps)
    seg_first = np.asarray([s.first_shard for s in segments], dtype=np.int64)
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}
    old_shards = old_start // rps
    cuts = np.flatnonzero(np.diff(old_shards)) + 1
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(old_shards)], strict=True):
        shard = int(old_shards[lo])
        seg = segments[int(np.searchsorted(seg_first, shard, side="right")) - 1]
        data = nodes.storage.get(shard_key(seg.path, shard - seg.first_shard + seg.offset, ndim))
        index = None
        if data is not None and len(data) >= n_index:
            buf = np.frombuffer(data, dtype=np.uint8)
            try:
                index = decode_index(buf[-n_index:], rps, buf.size - n_index)
            except ChecksumError:
                index = None  # a damaged shard: its rows are missing in the copy (verify names it)
        if index is not None:
            for r in range(lo, hi):
                chunks = _intact_chunks(buf, index, int(old_start[r]) - shard * rps, int(lengths[r]))
                if chunks is not None:
                    target = int(new_start[r])
                    for j, chunk in enumerate(chunks):
                        pending.setdefault((target + j) // rps, []).append(((target + j) % rps, chunk))
        done = [s for s in pending if s < int(new_start[hi - 1]) // rps]  # new shards no later row can reach
        for s in done:
            nodes.storage.put(shard_key(values, s, ndim), _assemble_shard(pending.pop(s), rps))
    for s in sorted(pending):
        nodes.storage.put(shard_key(values, s, ndim), _assemble_shard(pending[s], rps))


def _intact_chunks(buf: np.ndarray, index: Any, first: int, count: int) -> list[np.ndarray] | None:
    """The stored bytes (payload and crc32c) of ``count`` chunks from ``first``; None unless all are there, intact."""
    chunks = []
    for c in range(first, first + count):
        if not index.present[c]:
            return None
        off, nb = int(index.offsets[c]), int(index.nbytes[c])
        raw = buf[off : off + nb]
        if raw.size != nb or not crc_ok(raw):
            return None
        chunks.append(raw)
    return chunks


def _assemble_shard(chunks: list[tuple[int, np.ndarray]], rps: int) -> bytes:
    """A shard file of chunks given as stored bytes: back to back in chunk order, then the index and its crc."""
    chunks.sort(key=lambda c: c[0])
    offsets = np.full(rps, MISSING, dtype="<u8")
    nbytes = np.full(rps, MISSING, dtype="<u8")
    pos = 0
    for c, raw in chunks:
        offsets[c], nbytes[c] = pos, raw.size
        pos += raw.size
    index = np.stack([offsets, nbytes], axis=1).tobytes()
    return b"".join([*(raw.tobytes() for _, raw in chunks), index, crc32c(index).to_bytes(CRC_BYTES, "little")])
