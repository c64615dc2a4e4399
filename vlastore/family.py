"""One generation of one feature family: what readers and writers need, nothing more.

A :class:`FamilyHandle` holds the storage, the generation's attributes
(:class:`~vlastore.format.GenerationInfo`), its row layout, the catalog (for
names in messages) and the *segments* its shards live in. Readers
(:mod:`vlastore.read`) and writers (:mod:`vlastore.writer`) take a handle;
:class:`~vlastore.store.VLAStore` makes them (:func:`open_family`,
:func:`plan_generation`) and is the only module that knows the manifest.

Segments. A generation's shards are numbered globally (``shard = stored row //
rows_per_shard``); a segment is one sharded array holding a run of them
(``first_shard`` .. ``first_shard + shards - 1``, numbered from 0 inside the
array). Format v1 has exactly one segment per generation, starting at shard 0;
every shard is found through :meth:`FamilyHandle.locate`, so a format where
appends add segments changes only how the segments are listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .catalog import Catalog
from .format import (
    GENERATION_KEY,
    FamilySpec,
    FormatError,
    GenerationInfo,
    Producer,
    family_path,
    generation_array_path,
    generation_path,
    meta_key,
    shard_key,
    shard_of_key,
    values_path,
)
from .integrity import check_array_meta, sharded_array_meta
from .layout import FamilyLayout
from .nodes import ZarrNodes
from .shardcodec import ChecksumError, ShardIndex, decode_index, index_nbytes
from .storage import Storage, UnsafeFileError

__all__ = [
    "Segment",
    "FamilyHandle",
    "HandleSource",
    "StaleGenerationError",
    "open_family",
    "plan_generation",
    "read_generation_info",
    "read_keys",
    "resolve_handle",
    "v1_segments",
]


class StaleGenerationError(RuntimeError):
    """The generation this reader was opened on has been deleted; reload the store and read the current one."""


@dataclass(frozen=True)
class Segment:
    """A run of a generation's shards stored in one sharded array."""

    path: str
    """The sharded ``values`` array."""
    first_shard: int
    """Global number of the array's shard 0."""
    shards: int
    """How many shards of the array it uses."""
    offset: int = 0
    """The array's shard number of the segment's first shard (format 2: compaction keeps part of an array)."""


def v1_segments(family: str, generation: int, n_shards: int) -> tuple[Segment, ...]:
    """Format v1: one ``values`` array per generation, holding every shard."""
    return (Segment(values_path(family, generation), 0, n_shards),)


class FamilyHandle:
    """One generation of one family: storage, attributes, layout, catalog and segments.

    Args:
        storage: where the store's bytes are.
        family: the family's name.
        info: the generation's attributes (spec, producer, rows).
        layout: row numbering and shard geometry.
        catalog: the store's episodes (names in messages, ``(dataset, index)`` addressing).
        segments: where the shards are; their shard runs cover ``0 .. layout.n_shards - 1`` in order.
        writable: whether writers may write it (the store was opened writable).
    """

    def __init__(
        self,
        storage: Storage,
        family: str,
        info: GenerationInfo,
        layout: FamilyLayout,
        catalog: Catalog,
        segments: Sequence[Segment],
        writable: bool = False,
    ) -> None:
        self.storage = storage
        self.family = family
        self.info = info
        self.layout = layout
        self.catalog = catalog
        self.segments = tuple(segments)
        self.writable = writable
        self._ndim = 1 + len(info.spec.row_shape)
        self._starts = np.asarray([s.first_shard for s in self.segments], dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"FamilyHandle({self.family!r}, generation {self.generation}, {self.layout.rows} rows, "
            f"{len(self.segments)} segment(s), {self.storage.location!r})"
        )

    @property
    def generation(self) -> int:
        return self.info.generation

    @property
    def spec(self) -> FamilySpec:
        return self.info.spec

    @property
    def location(self) -> str:
        return self.storage.location

    # --------------------------------------------------------------- shards

    def locate(self, shard: int) -> tuple[Segment, int]:
        """The segment holding global shard ``shard``, and the shard's number inside it.

        Raises:
            IndexError: no segment holds it.
        """
        i = int(np.searchsorted(self._starts, shard, side="right")) - 1
        if i < 0 or not 0 <= shard - self.segments[i].first_shard < self.segments[i].shards:
            raise IndexError(f"shard {shard} out of range: family {self.family!r} has {self.layout.n_shards} shards")
        segment = self.segments[i]
        return segment, shard - segment.first_shard

    def shard_key(self, shard: int) -> str:
        """Storage key of global shard ``shard``."""
        segment, local = self.locate(shard)
        return shard_key(segment.path, local + segment.offset, self._ndim)

    def written_shards(self) -> np.ndarray:
        """Global numbers of the shards whose files exist (complete: shards are written atomically), ascending."""
        found: list[int] = []
        by_array: dict[str, list[Segment]] = {}
        for segment in self.segments:  # several segments may use parts of one array: list it once
            by_array.setdefault(segment.path, []).append(segment)
        for path, parts in by_array.items():
            for key, _size in self.storage.list(path):
                local = shard_of_key(path, key, self._ndim)  # anything else under the array is ignored
                if local is None:
                    continue
                for segment in parts:
                    if 0 <= local - segment.offset < segment.shards:
                        found.append(segment.first_shard + local - segment.offset)
        return np.array(sorted(set(found)), dtype=np.int64)

    def shard_index(self, shard: int) -> ShardIndex | None:
        """Parsed index of a shard, or None when the shard is not written.

        Raises:
            ChecksumError: the index is corrupt.
        """
        rps = self.layout.rows_per_shard
        tail = self.storage.get_range(self.shard_key(shard), -index_nbytes(rps))
        return None if tail is None else decode_index(tail, rps)

    def _index_or_none(self, shard: int) -> ShardIndex | None:
        try:
            return self.shard_index(shard)
        except (ChecksumError, UnsafeFileError):  # unreadable: its rows count as absent (verify says why)
            return None

    def coverage(self) -> np.ndarray:
        """Bool per row: is it stored? (A row is stored when its first chunk is.)"""
        layout = self.layout
        present = np.zeros(layout.rows, dtype=bool)
        shards = self.written_shards().tolist()
        # one small read per shard: on object storage they overlap (a round trip each, not one after another)
        for shard, index in zip(shards, self.storage.parallel_map(self._index_or_none, shards), strict=True):
            if index is None:
                continue
            rows = layout.shard_rows(shard)
            first_chunk = layout.start_of(rows) - shard * layout.rows_per_shard
            present[rows] = index.present[first_chunk]
        return present

    def is_deleted(self) -> bool:
        """Whether the generation was deleted (a newer one was switched in and this one not kept)."""
        return not self.storage.exists(meta_key(generation_path(self.family, self.generation)))

    def stale_error(self) -> StaleGenerationError:
        return StaleGenerationError(
            f"family {self.family!r} generation {self.generation} was deleted (a newer generation was switched "
            "in and this one was not kept); this reader was opened before. Call store.reload() and "
            "store.reader(family) again, or VLADataset.refresh() at the epoch boundary, then read again"
        )

    # ------------------------------------------------------------------ rows

    def row(self, dataset: str | int, index: int) -> int:
        """Row number of ``(dataset, index)`` (``index`` is e.g. ``vlm_idx``)."""
        e = self.catalog.resolve(dataset)
        try:
            return self.layout.row(e, int(index))
        except IndexError as exc:  # say which family and episode, not just "this episode"
            raise IndexError(f"family {self.family!r}, dataset {self.catalog.names[e]!r}: {exc}") from None

    def describe(self, row: int) -> str:
        """``('episode_name', vlm_idx=3)`` for a row number."""
        e, item = self.layout.address(row)
        return f"({self.catalog.names[e]!r}, {self.spec.index_name}={item})"

    def describe_shard(self, shard: int) -> str:
        """The first and last rows of a shard, described."""
        rows = self.layout.shard_rows(shard)
        if rows.size == 0:
            return "none"
        return f"{self.describe(int(rows[0]))} .. {self.describe(int(rows[-1]))}"


class HandleSource(Protocol):
    """What makes handles: a :class:`~vlastore.store.VLAStore` is one."""

    def handle(self, family: str, generation: int | None = None) -> FamilyHandle: ...


def resolve_handle(source: FamilyHandle | HandleSource, family: str | None, generation: int | None) -> FamilyHandle:
    """A handle given as is, or made by ``source`` (a store) for ``family`` and ``generation``.

    Raises:
        ValueError: a handle together with a family or generation other than its own.
    """
    if isinstance(source, FamilyHandle):
        if (family is not None and family != source.family) or (
            generation is not None and generation != source.generation
        ):
            raise ValueError(
                f"got the handle of {source.family!r} generation {source.generation} with family="
                f"{family!r}, generation={generation!r}; give one or the other"
            )
        return source
    if family is None:
        raise TypeError("give a family handle, or a store and a family name")
    return source.handle(family, generation)


# ---------------------------------------------------------------- reading


def read_generation_info(nodes: ZarrNodes, family: str, generation: int) -> GenerationInfo:
    """A generation's attributes, checksum-verified and validated.

    Raises:
        FormatError: missing, damaged, or not the generation asked for.
    """
    path = generation_path(family, generation)
    where = nodes.storage.where(meta_key(path))
    attrs = nodes.node_attrs(path)
    if GENERATION_KEY not in attrs:
        raise FormatError(
            f"{where}: no '{GENERATION_KEY}' attribute (generation {generation} was never planned "
            "completely, or the file is damaged)"
        )
    info = GenerationInfo.from_dict(attrs[GENERATION_KEY], where=where)
    if info.generation != generation:
        raise FormatError(
            f"{where}: says generation {info.generation}, but it is generation {generation}; the store is damaged"
        )
    return info


def _read_layout(nodes: ZarrNodes, family: str, info: GenerationInfo, episodes: int) -> FamilyLayout:
    """A generation's row tables, each checked against its attributes before it is read (bounded sizes)."""
    gen = info.generation
    storage = nodes.storage
    values_meta = meta_key(values_path(family, gen))
    check_array_meta(
        nodes.read_json(values_meta), sharded_array_meta(info.spec, info.capacity), storage.where(values_meta)
    )
    episode_rows = nodes.read_checked(generation_array_path(family, gen, "episode_rows"), (episodes + 1,), "int64")
    starts = lengths = None
    if info.spec.ragged:
        starts = nodes.read_checked(generation_array_path(family, gen, "starts"), (info.rows,), "int64")
        lengths = nodes.read_checked(generation_array_path(family, gen, "lengths"), (info.rows,), "int64")
    base = storage.where(generation_path(family, gen))
    layout = FamilyLayout(info.spec, episode_rows, starts, lengths, where=base)
    if (layout.rows, layout.capacity) != (info.rows, info.capacity):
        raise FormatError(
            f"{base}: the row tables give {layout.rows} rows and {layout.capacity} stored rows, the generation "
            f"attributes {info.rows} and {info.capacity}; the store is damaged"
        )
    return layout


def open_family(
    nodes: ZarrNodes, family: str, generation: int, catalog: Catalog, info: GenerationInfo | None = None
) -> FamilyHandle:
    """The handle of an existing generation: its attributes and row tables read and checked.

    Raises:
        FormatError: damaged metadata (the message names the file).
    """
    info = info if info is not None else read_generation_info(nodes, family, generation)
    layout = _read_layout(nodes, family, info, len(catalog))
    return FamilyHandle(
        nodes.storage,
        family,
        info,
        layout,
        catalog,
        v1_segments(family, generation, layout.n_shards),
        writable=nodes.writable,
    )


def read_keys(nodes: ZarrNodes, handle: FamilyHandle) -> tuple[str, ...]:
    """The string key of every row of a family created with ``FamilySpec(has_keys=True)``."""
    path = generation_array_path(handle.family, handle.generation, "keys")
    return tuple(str(k) for k in nodes.read_checked(path, (handle.info.rows,), "string").tolist())


# ---------------------------------------------------------------- planning


def plan_generation(
    nodes: ZarrNodes,
    family: str,
    generation: int,
    spec: FamilySpec,
    producer: Producer,
    created: str,
    items: np.ndarray,
    lengths: Sequence[int] | np.ndarray | None,
    keys: Sequence[str] | None,
    catalog: Catalog,
) -> FamilyHandle:
    """Write a new generation's plan: row tables and the empty ``values`` array, its attributes last.

    Raises:
        FormatError: a bad plan (see :meth:`FamilyLayout.plan`), keys given for a family without them (or the
            reverse), or not one per row. Nothing is written then.
    """
    layout = FamilyLayout.plan(spec, items, lengths)
    if spec.has_keys != (keys is not None):
        raise FormatError(
            f"family {family!r}: spec.has_keys={spec.has_keys} but keys were "
            f"{'given' if keys is not None else 'not given'}"
        )
    if keys is not None and len(keys) != layout.rows:
        raise FormatError(f"family {family!r}: {len(keys)} keys for {layout.rows} rows; give one per row")
    info = GenerationInfo(generation, spec, producer, layout.rows, layout.capacity, created)
    base = generation_path(family, generation)
    # anything left at this path is an interrupted plan or a generation whose deletion was killed midway
    # (its zarr.json may be gone while shard files remain): remove it all, or old shards would be read
    # as rows of the new generation
    if nodes.exists(base) or next(iter(nodes.storage.list(base)), None) is not None:
        nodes.delete(base)
    nodes.create_group(family_path(family))
    tables = {"episode_rows": layout.episode_rows}
    if spec.ragged:
        tables.update(starts=layout.starts, lengths=layout.lengths)
    if keys is not None:
        tables["keys"] = np.asarray(list(keys), dtype=str)
    for name, table in tables.items():
        nodes.write_small_array(generation_array_path(family, generation, name), table)
    nodes.create_sharded_array(
        values_path(family, generation),
        layout.capacity,
        spec.row_shape,
        spec.storage_dtype,
        spec.rows_per_shard,
        spec.compression,
        attributes={"true_dtype": spec.dtype},
    )
    # the generation's attributes go last: they mark the plan as complete
    nodes.set_attribute(base, GENERATION_KEY, info.to_dict())
    return FamilyHandle(
        nodes.storage,
        family,
        info,
        layout,
        catalog,
        v1_segments(family, generation, layout.n_shards),
        writable=nodes.writable,
    )


# ------------------------------------------------------------ format 2


class SegmentedLayout(FamilyLayout):
    """A layout whose rows sit anywhere in the stored row space (format 2, after appends and removes).

    Rows are numbered episode by episode in catalog order, as in :class:`FamilyLayout`;
    ``starts[row]`` is the row's first stored row (ascending, no two rows overlap,
    none crosses a shard boundary), so rows of removed episodes and the rest of a
    segment's last shard are simply never addressed. ``shard_nrows`` gives each
    global shard's stored rows (a segment's last shard may be short).

    Raises:
        FormatError: the tables break these rules.
    """

    def __init__(
        self,
        spec: FamilySpec,
        episode_rows: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        shard_nrows: np.ndarray,
        where: str = "layout",
    ) -> None:
        self.spec = spec
        self.episode_rows = np.asarray(episode_rows, dtype=np.int64)
        if (
            self.episode_rows.ndim != 1
            or self.episode_rows.size < 1
            or self.episode_rows[0] != 0
            or (self.episode_rows.size > 1 and np.diff(self.episode_rows).min() < 0)
        ):
            raise FormatError(f"{where}: row counts per episode must be >= 0; the layout is damaged")
        self.rows = int(self.episode_rows[-1])
        self.rows_per_shard = rps = spec.rows_per_shard
        self._stored: np.ndarray = np.asarray(starts, dtype=np.int64)
        self._starts = self._stored
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._shard_nrows = np.asarray(shard_nrows, dtype=np.int64)
        self.n_shards = len(self._shard_nrows)
        self.capacity = int((self.n_shards - 1) * rps + self._shard_nrows[-1]) if self.n_shards else 0
        if self._stored.shape != (self.rows,) or self.lengths.shape != (self.rows,):
            raise FormatError(
                f"{where}: {self._stored.size} starts and {self.lengths.size} lengths for "
                f"{self.rows} rows; the layout is damaged"
            )
        if self.rows:
            ends = self._stored + self.lengths
            if (
                self.lengths.min() < 1
                or self._stored[0] < 0
                or int(ends[-1]) > self.n_shards * rps
                or (self.rows > 1 and (self._stored[1:] < ends[:-1]).any())
                or (self._stored // rps != (ends - 1) // rps).any()
            ):
                raise FormatError(
                    f"{where}: row positions overlap, go backwards or cross a shard; the layout is damaged"
                )
            last = (ends - 1) // rps
            if (ends - last * rps > self._shard_nrows[last]).any():
                raise FormatError(f"{where}: a row lies past the end of its segment; the layout is damaged")
        self._row_shards: np.ndarray | None = None
        self._shard_row_offsets: np.ndarray | None = None

    @property
    def starts(self) -> np.ndarray:
        return self._stored

    @property
    def row_shards(self) -> np.ndarray:
        if self._row_shards is None:
            self._row_shards = self._stored // self.rows_per_shard
        shards: np.ndarray = self._row_shards
        return shards

    @property
    def shard_row_offsets(self) -> np.ndarray:
        if self._shard_row_offsets is None:
            edges = np.arange(self.n_shards + 1, dtype=np.int64) * self.rows_per_shard
            self._shard_row_offsets = np.searchsorted(self._stored, edges, side="left").astype(np.int64)
        offsets: np.ndarray = self._shard_row_offsets
        return offsets

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return self.row_shards[rows]

    def start_of(self, rows: np.ndarray) -> np.ndarray:
        return self._stored[rows]

    def shard_rows(self, shard: int) -> np.ndarray:
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range: the family has {self.n_shards} shards")
        lo, hi = self.shard_row_offsets[shard], self.shard_row_offsets[shard + 1]
        return np.arange(lo, hi, dtype=np.int64)

    def shard_nrows(self, shard: int) -> int:
        return int(self._shard_nrows[shard])

    def rows_of_chunks(self, shard: int, chunks: np.ndarray) -> np.ndarray:
        stored = shard * self.rows_per_shard + np.asarray(chunks, dtype=np.int64)
        r = np.searchsorted(self._stored, stored, side="right") - 1
        safe = np.maximum(r, 0)
        inside = (r >= 0) & (stored < self._stored[safe] + self.lengths[safe])
        return np.where(inside, r, -1)


def v2_layout(
    spec: FamilySpec,
    segments: Sequence[Segment],
    seg_rows: Sequence[int],
    seg_capacity: Sequence[int],
    row_start: np.ndarray,
    row_count: np.ndarray,
    local_starts: Sequence[np.ndarray] | None,
    local_lengths: Sequence[np.ndarray] | None,
    where: str,
) -> tuple[FamilyLayout, np.ndarray]:
    """The layout of one generation in a format-2 snapshot, and each row's physical row number.

    Physical rows are the segments' rows concatenated in order; episode ``e`` has physical
    rows ``row_start[e] : row_start[e] + row_count[e]`` (after a compaction they may run on into the next
    segment: its physical order is kept). When the rows
    of the catalog are exactly the stored rows from 0 (a store never appended to or
    pruned), the plain :class:`FamilyLayout` is used (the fast paths of fixed families).

    Raises:
        FormatError: an episode's rows outside the segments, or tables that disagree.
    """
    rps = spec.rows_per_shard
    seg_rows_arr = np.asarray(seg_rows, dtype=np.int64)
    phys_base = np.concatenate([[0], np.cumsum(seg_rows_arr)]).astype(np.int64)
    row_start = np.asarray(row_start, dtype=np.int64)
    row_count = np.asarray(row_count, dtype=np.int64)
    episode_rows = np.concatenate([[0], np.cumsum(row_count)]).astype(np.int64)
    total = int(episode_rows[-1])
    if row_count.size and (row_count.min() < 0 or row_start.min() < 0):
        raise FormatError(f"{where}: negative row numbers; the layout is damaged")
    nonempty = row_count > 0
    if nonempty.any() and (row_start[nonempty] + row_count[nonempty] > phys_base[-1]).any():
        raise FormatError(f"{where}: an episode's rows lie past the segments' rows; the layout is damaged")
    physical = np.repeat(row_start - episode_rows[:-1], row_count) + np.arange(total, dtype=np.int64)
    seg_caps = np.asarray(seg_capacity, dtype=np.int64)
    shard_nrows = np.concatenate(
        [np.minimum(rps, cap - np.arange(-(-cap // rps), dtype=np.int64) * rps) for cap in seg_caps.tolist()]
        or [np.zeros(0, dtype=np.int64)]
    ).astype(np.int64)
    first_shard = np.asarray([s.first_shard for s in segments], dtype=np.int64)
    if spec.ragged:
        assert local_starts is not None and local_lengths is not None
        stored = np.concatenate(
            [first_shard[k] * rps + np.asarray(local_starts[k], dtype=np.int64) for k in range(len(segments))]
            or [np.zeros(0, dtype=np.int64)]
        )
        lengths = np.concatenate(
            [np.asarray(x, dtype=np.int64) for x in local_lengths] or [np.zeros(0, dtype=np.int64)]
        )
        starts, lens = stored[physical], lengths[physical]
    else:
        seg_phys = np.searchsorted(phys_base, physical, side="right") - 1
        starts = first_shard[seg_phys] * rps + physical - phys_base[seg_phys] if total else physical
        lens = np.ones(total, dtype=np.int64)
    identity = (
        len(segments) == 1
        and segments[0].first_shard == 0
        and segments[0].offset == 0
        and np.array_equal(physical, np.arange(total))
        and total == int(seg_rows_arr[0])
    )
    if identity and not spec.ragged and int(seg_caps[0]) == total:
        return FamilyLayout(spec, episode_rows, where=where), physical
    if identity and spec.ragged and total and int(seg_caps[0]) == int(starts[-1] + lens[-1]):
        return FamilyLayout(spec, episode_rows, starts, lens, where=where), physical
    return SegmentedLayout(spec, episode_rows, starts, lens, shard_nrows, where=where), physical
