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
    """How many shards the array holds."""


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

    def __init__(self, storage: Storage, family: str, info: GenerationInfo, layout: FamilyLayout, catalog: Catalog,
                 segments: Sequence[Segment], writable: bool = False) -> None:
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
        return (f"FamilyHandle({self.family!r}, generation {self.generation}, {self.layout.rows} rows, "
                f"{len(self.segments)} segment(s), {self.storage.location!r})")

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
        return shard_key(segment.path, local, self._ndim)

    def written_shards(self) -> np.ndarray:
        """Global numbers of the shards whose files exist (complete: shards are written atomically), ascending."""
        found: list[int] = []
        for segment in self.segments:
            for key, _size in self.storage.list(segment.path):
                local = shard_of_key(segment.path, key, self._ndim)  # anything else under the array is ignored
                if local is not None and local < segment.shards:
                    found.append(segment.first_shard + local)
        return np.array(sorted(set(found)), dtype=np.int64)

    def shard_index(self, shard: int) -> ShardIndex | None:
        """Parsed index of a shard, or None when the shard is not written.

        Raises:
            ChecksumError: the index is corrupt.
        """
        rps = self.layout.rows_per_shard
        tail = self.storage.get_range(self.shard_key(shard), -index_nbytes(rps))
        return None if tail is None else decode_index(tail, rps)

    def coverage(self) -> np.ndarray:
        """Bool per row: is it stored? (A row is stored when its first chunk is.)"""
        layout = self.layout
        present = np.zeros(layout.rows, dtype=bool)
        for shard in self.written_shards().tolist():
            try:
                index = self.shard_index(shard)
            except (ChecksumError, UnsafeFileError):  # unreadable: its rows count as absent (verify says why)
                continue
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
                generation is not None and generation != source.generation):
            raise ValueError(f"got the handle of {source.family!r} generation {source.generation} with family="
                             f"{family!r}, generation={generation!r}; give one or the other")
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
        raise FormatError(f"{where}: no '{GENERATION_KEY}' attribute (generation {generation} was never planned "
                          "completely, or the file is damaged)")
    info = GenerationInfo.from_dict(attrs[GENERATION_KEY], where=where)
    if info.generation != generation:
        raise FormatError(f"{where}: says generation {info.generation}, but it is generation {generation}; the "
                          "store is damaged")
    return info


def _read_layout(nodes: ZarrNodes, family: str, info: GenerationInfo, episodes: int) -> FamilyLayout:
    """A generation's row tables, each checked against its attributes before it is read (bounded sizes)."""
    gen = info.generation
    storage = nodes.storage
    values_meta = meta_key(values_path(family, gen))
    check_array_meta(nodes.read_json(values_meta), sharded_array_meta(info.spec, info.capacity),
                     storage.where(values_meta))
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


def open_family(nodes: ZarrNodes, family: str, generation: int, catalog: Catalog,
                info: GenerationInfo | None = None) -> FamilyHandle:
    """The handle of an existing generation: its attributes and row tables read and checked.

    Raises:
        FormatError: damaged metadata (the message names the file).
    """
    info = info if info is not None else read_generation_info(nodes, family, generation)
    layout = _read_layout(nodes, family, info, len(catalog))
    return FamilyHandle(nodes.storage, family, info, layout, catalog,
                        v1_segments(family, generation, layout.n_shards), writable=nodes.writable)


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
    nodes.create_sharded_array(values_path(family, generation), layout.capacity, spec.row_shape, spec.storage_dtype,
                               spec.rows_per_shard, spec.compression, attributes={"true_dtype": spec.dtype})
    # the generation's attributes go last: they mark the plan as complete
    nodes.set_attribute(base, GENERATION_KEY, info.to_dict())
    return FamilyHandle(nodes.storage, family, info, layout, catalog,
                        v1_segments(family, generation, layout.n_shards), writable=nodes.writable)
