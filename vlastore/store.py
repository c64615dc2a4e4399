"""A vlastore store: catalog, robot series and feature families in one zarr v3 group.

:class:`VLAStore` is the only module that knows the manifest as a whole. It
opens the storage (:mod:`vlastore.storage`), reads and checks the root
metadata, the catalog and the series (:mod:`vlastore.nodes`), and makes what
the lower layers take: a :class:`~vlastore.family.FamilyHandle` per family
generation, readers (:mod:`vlastore.read`) and writers (:mod:`vlastore.writer`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .catalog import Catalog
from .family import FamilyHandle, StaleGenerationError, open_family, plan_generation, read_generation_info, read_keys
from .format import (
    EPISODES_GROUP,
    FEATURES_GROUP,
    FORMAT_VERSION,
    MANIFEST_KEY,
    SERIES_GROUP,
    FamilyEntry,
    FamilySpec,
    FormatError,
    GenerationInfo,
    Manifest,
    Producer,
    SeriesInfo,
    episodes_path,
    generation_path,
    meta_key,
    series_path,
    validate_name,
    values_path,
)
from .integrity import check_catalog
from .layout import FamilyLayout, vlm_items
from .nodes import ZarrNodes
from .ranks import resolve_rank
from .read import FeatureReader
from .shardcodec import ShardIndex
from .stats import series_stats
from .storage import LocalStorage, Location, open_storage
from .storage.local import remove_store_files
from .version import __version__
from .writer import FamilyWriter

if TYPE_CHECKING:
    import torch

__all__ = ["VLAStore", "EpisodeData", "utc_now", "probe", "remove_store", "Location"]


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class EpisodeData:
    """One episode to put in a new store: its name and its robot series.

    ``series`` maps a key (``"state"``, ``"action"``, ...) to ``[steps, columns]``
    float arrays (1-D arrays are one column). ``steps`` is taken from the
    series; give it when the episode has none.
    """

    name: str
    series: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int | None = None

    def step_count(self) -> int:
        lengths = {k: len(v) for k, v in self.series.items()}
        if self.steps is not None:
            lengths.setdefault("steps=", self.steps)
        if not lengths:
            raise FormatError(f"episode {self.name!r}: give steps= or at least one series")
        if len(set(lengths.values())) != 1:
            raise FormatError(
                f"episode {self.name!r}: series have different lengths {lengths}; every series "
                "of an episode needs one row per step"
            )
        return next(iter(lengths.values()))


def _check_finite(values: np.ndarray, where: str, columns: Sequence[str] | None = None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row, *rest = np.argwhere(bad)[0].tolist()
        col = rest[0] if rest else 0
        col_name = f" column {columns[col]!r}" if columns and col < len(columns) else f" column {col}"
        raise FormatError(
            f"{where}: row {row}{col_name} is {values[tuple([row, *rest])]}; "
            "NaN/Inf are not stored unless allowed (allow_nonfinite=True)"
        )


def _stack_series(
    episodes: Sequence[EpisodeData],
    key: str,
    columns: Mapping[str, Sequence[str]] | None,
    allow_nonfinite: bool,
) -> tuple[np.ndarray, SeriesInfo]:
    """One series of every episode concatenated along time, with its manifest entry (checked)."""
    validate_name(key, "series key")
    parts = []
    for e in episodes:
        if key not in e.series:
            raise FormatError(f"episode {e.name!r} has no series {key!r}; every episode needs every series")
        arr = np.asarray(e.series[key])
        arr = arr.reshape(len(arr), -1) if arr.ndim != 2 else arr
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32)
        parts.append(arr)
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise FormatError(f"series {key!r} has different column counts across episodes: {sorted(widths)}")
    width = widths.pop()
    cols = tuple(columns[key]) if columns and key in columns else tuple(f"{key}_{i}" for i in range(width))
    if len(cols) != width:
        raise FormatError(f"series {key!r}: {len(cols)} column names for {width} columns")
    dtype = np.result_type(*[p.dtype for p in parts]) if parts else np.dtype(np.float32)
    if not allow_nonfinite:
        for e, p in zip(episodes, parts, strict=False):
            _check_finite(p, f"episode {e.name!r} series {key!r}", cols)
    stacked = np.concatenate(parts).astype(dtype) if parts else np.zeros((0, width), dtype)
    return stacked, SeriesInfo(cols, str(dtype))


def probe(location: Location, storage_options: dict[str, Any] | None = None) -> None:
    """Check that ``location`` holds a vlastore store (its root metadata only; nothing else is read).

    Raises:
        StoreNotFoundError: nothing there, or not a vlastore store. FormatError: damaged root metadata.
    """
    ZarrNodes.open(open_storage(location, storage_options))


def remove_store(location: str | os.PathLike[str]) -> int:
    """Delete a local vlastore store: its files only, and only if it holds nothing else.

    Returns the number of files removed.

    Raises:
        StoreNotFoundError: ``location`` is not a vlastore store (nothing is deleted).
        UnsafeFileError: the folder holds anything a store does not (another file,
            a symlink, a FIFO): nothing is deleted, the message names a few.
    """
    storage = LocalStorage(location)
    if storage.root.is_symlink():
        return remove_store_files(storage.root)  # refuses, naming the link
    ZarrNodes.open(storage)  # raises StoreNotFoundError unless it is a vlastore store
    return remove_store_files(storage.root)


class VLAStore:
    """A store on disk, in object storage or in any zarr store. Create with :meth:`create`, open with :meth:`open`.

    Args:
        nodes: the store's root, opened (see :meth:`open`).
        strict: raise on damaged catalog or series metadata; with ``False`` (vlastore verify) record each
            problem in :attr:`open_problems` and go on.
    """

    def __init__(self, nodes: ZarrNodes, strict: bool = True) -> None:
        self.nodes = nodes
        self.storage = nodes.storage
        self.writable = nodes.writable
        self.manifest = Manifest.from_dict(nodes.attrs[MANIFEST_KEY], where=self.storage.location)
        self.open_problems: list[tuple[str, str]] = []
        """With ``strict=False`` (vlastore verify): (path, problem) of what failed its check at open."""
        try:
            self.catalog = self._read_catalog()
        except FormatError as exc:
            if strict:
                raise
            self.open_problems.append(("episodes", str(exc)))
            # stand-in names, so the families can still be checked (verify reports rows by number then)
            self.catalog = Catalog([f"episode_{i}" for i in range(self.manifest.episodes)],
                                   np.zeros(self.manifest.episodes, dtype=np.int64))
        for key in self.manifest.series:
            try:
                self._series_meta(key)
            except FormatError as exc:
                if strict:
                    raise
                self.open_problems.append((series_path(key), str(exc)))
        self._infos: dict[tuple[str, int], GenerationInfo] = {}
        self._handles: dict[tuple[str, int], FamilyHandle] = {}
        self._readers: dict[tuple[str, int, str], FeatureReader] = {}
        self._keys: dict[tuple[str, int], tuple[str, ...]] = {}
        self._key_index: dict[tuple[str, int], dict[str, int]] = {}

    # -------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        location: Location,
        episodes: Sequence[EpisodeData],
        columns: Mapping[str, Sequence[str]] | None = None,
        allow_nonfinite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> VLAStore:
        """Create a store holding the catalog and robot series of ``episodes``.

        Args:
            location: a new (or empty) folder, an ``s3://bucket/prefix`` URL, a zarr ``Store`` or a
                :class:`~vlastore.storage.Storage`.
            episodes: in store order; names must be unique.
            columns: column names per series key; default ``<key>_0..``.
            allow_nonfinite: store NaN/Inf in series instead of refusing them.
            storage_options: for ``s3://`` URLs: endpoint, credentials, ... (``vlastore.storage.STORAGE_OPTIONS``).

        Raises:
            FormatError: bad names, duplicate names, inconsistent series; nothing is written.
            FileExistsError: ``location`` exists and is not empty.
        """
        episodes = list(episodes)
        catalog = Catalog([e.name for e in episodes], [e.step_count() for e in episodes])
        stacked: dict[str, np.ndarray] = {}
        series_info: dict[str, SeriesInfo] = {}
        for key in sorted({k for e in episodes for k in e.series}):
            stacked[key], series_info[key] = _stack_series(episodes, key, columns, allow_nonfinite)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            vlastore_version=__version__,
            created=utc_now(),
            episodes=len(catalog),
            steps=catalog.total_steps,
            series=series_info,
        )
        # the manifest goes last: a crash before it leaves a folder that opens as "not a store"
        nodes = ZarrNodes.create(open_storage(location, storage_options), attributes={})
        nodes.write_small_array(episodes_path("name"), np.asarray(catalog.names, dtype=str))
        nodes.write_small_array(episodes_path("steps"), catalog.steps)
        nodes.write_small_array(episodes_path("step_offsets"), catalog.step_offsets)
        nodes.create_group(SERIES_GROUP)
        nodes.create_group(FEATURES_GROUP)
        for key, data in stacked.items():
            nodes.write_small_array(series_path(key), data)
        nodes.set_root_attribute(MANIFEST_KEY, manifest.to_dict())
        return cls(nodes)

    @classmethod
    def open(cls, location: Location, writable: bool = False,
             storage_options: dict[str, Any] | None = None) -> VLAStore:
        """Open an existing store (read-only unless ``writable``).

        The manifest's checksum, the catalog and the series' metadata are checked
        here (a few small files); each family generation's metadata is checked when
        it is first used.

        Args:
            location: a folder, an ``s3://bucket/prefix`` URL, a zarr ``Store`` or a Storage.
            writable: allow changes (families, generations, writers).
            storage_options: for ``s3://`` URLs (``vlastore.storage.STORAGE_OPTIONS``).

        Raises:
            StoreNotFoundError: no store there. FormatError: written by a newer
                format, or damaged metadata (the message names the file).
        """
        return cls(ZarrNodes.open(open_storage(location, storage_options), writable=writable))

    # ----------------------------------------------------------- checked reads

    def _read_catalog(self) -> Catalog:
        episodes = self.manifest.episodes
        names = [str(n) for n in self.nodes.read_checked(episodes_path("name"), (episodes,), "string").tolist()]
        steps = self.nodes.read_checked(episodes_path("steps"), (episodes,), "int64")
        offsets = self.nodes.read_checked(episodes_path("step_offsets"), (episodes + 1,), "int64")
        check_catalog(self.manifest, names, steps, offsets, self.storage.where(EPISODES_GROUP))
        try:
            return Catalog(names, steps)
        except FormatError as exc:
            raise FormatError(f"{self.storage.where(episodes_path('name'))}: {exc}") from None

    def _series_shape(self, key: str) -> tuple[tuple[int, int], str]:
        info = self.manifest.series[key]
        return (self.manifest.steps, len(info.columns)), info.dtype

    def _series_meta(self, key: str) -> None:
        self.nodes.check_small_meta(series_path(key), *self._series_shape(key))

    def reload(self) -> None:
        """Re-read the manifest (after another process added a family or switched a generation)."""
        self.nodes.refresh()
        self.manifest = Manifest.from_dict(self.nodes.attrs[MANIFEST_KEY], where=self.location)

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(
                f"{self.location} is open read-only; use VLAStore.open(path, writable=True) to change it"
            )

    def _save_manifest(self, manifest: Manifest) -> None:
        self.nodes.set_root_attribute(MANIFEST_KEY, manifest.to_dict())
        self.manifest = manifest

    # ------------------------------------------------------------ properties

    @property
    def location(self) -> str:
        return self.storage.location

    @property
    def datasets(self) -> tuple[str, ...]:
        return self.catalog.names

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.manifest.families)

    @property
    def series_keys(self) -> tuple[str, ...]:
        return tuple(self.manifest.series)

    def __repr__(self) -> str:
        return (
            f"VLAStore({self.location!r}: {len(self.catalog)} episodes, {self.catalog.total_steps} steps, "
            f"series {list(self.series_keys)}, families {list(self.families)})"
        )

    # ---------------------------------------------------------------- series

    def _series_key(self, key: str) -> str:
        if key not in self.manifest.series:
            raise KeyError(f"unknown series {key!r}; the store has {list(self.manifest.series)}")
        return key

    def series_array(self, key: str) -> zarr.Array[Any]:
        """The zarr array of robot series ``key`` (all episodes along time), for lazy slicing."""
        return self.nodes.open_array(series_path(self._series_key(key)))

    def series(self, key: str, dataset: str | int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Steps ``start:stop`` of one episode's robot series ``key`` (``[n, columns]``)."""
        self._series_key(key)
        lo, hi = self.catalog.step_range(dataset)
        n = hi - lo
        stop = n if stop is None else stop
        if not (0 <= start <= stop <= n):
            raise IndexError(f"steps {start}:{stop} out of range for episode {dataset!r} with {n} steps")
        try:
            return np.asarray(self.series_array(key)[lo + start : lo + stop])
        except FormatError:
            raise
        except Exception as exc:  # zarr's codec errors on a damaged chunk
            raise FormatError(f"{self.storage.where(series_path(key))}: a chunk is damaged ({type(exc).__name__}: "
                              f"{exc}); run `vlastore verify`") from None

    def series_all(self, key: str) -> np.ndarray:
        """One robot series for all episodes, concatenated along time (small: robot states)."""
        return self.nodes.read_checked(series_path(self._series_key(key)), *self._series_shape(key))

    def columns(self, key: str) -> tuple[str, ...]:
        return self.manifest.series[key].columns

    def stats(self, key: str, episodes: Sequence[str | int] | None = None, **kwargs: Any) -> Any:
        """Exact statistics of series ``key`` (see :func:`vlastore.stats.series_stats`)."""
        return series_stats(self, key, episodes, **kwargs)

    # -------------------------------------------------------------- families

    def _entry(self, family: str) -> FamilyEntry:
        try:
            return self.manifest.families[family]
        except KeyError:
            raise KeyError(f"unknown feature family {family!r}; the store has {list(self.families)}") from None

    def _generation_number(self, family: str, generation: int | None) -> int:
        entry = self._entry(family)
        gen = entry.current_generation if generation is None else generation
        if gen not in entry.generations:
            raise KeyError(f"family {family!r} has no generation {gen}; it has {list(entry.generations)}")
        return gen

    def _dropped_since(self, family: str, generation: int) -> bool:
        """Whether the manifest on disk no longer lists ``generation`` (switched out and deleted since opening)."""
        try:
            meta = self.nodes.read_json(meta_key(""))
            attrs = meta.get("attributes", {}) if meta is not None else {}
            entry = Manifest.from_dict(attrs[MANIFEST_KEY], where=self.location).families.get(family)
        except (FormatError, KeyError, TypeError, AttributeError):
            return False
        return entry is None or generation not in entry.generations

    def _stale(self, family: str, generation: int, exc: FormatError) -> Exception:
        if not self._dropped_since(family, generation):
            return exc
        return StaleGenerationError(
            f"family {family!r} generation {generation} was deleted after this store was opened (a newer "
            "generation was switched in and this one was not kept). Call store.reload() (or "
            "VLADataset.refresh()), then read the current generation"
        )

    def generation(self, family: str, generation: int | None = None) -> GenerationInfo:
        """Manifest of one generation of a family (the current one by default).

        Raises:
            KeyError: unknown family or generation. FormatError: damaged attributes.
            StaleGenerationError: the generation was deleted after the store was opened.
        """
        gen = self._generation_number(family, generation)
        key = (family, gen)
        if key not in self._infos:
            try:
                self._infos[key] = read_generation_info(self.nodes, family, gen)
            except FormatError as exc:
                raise self._stale(family, gen, exc) from None
        return self._infos[key]

    def handle(self, family: str, generation: int | None = None) -> FamilyHandle:
        """What readers and writers of one generation take: storage, attributes, layout, catalog (cached).

        Raises:
            KeyError: unknown family or generation. FormatError: damaged metadata.
            StaleGenerationError: the generation was deleted after the store was opened.
        """
        info = self.generation(family, generation)
        key = (family, info.generation)
        if key not in self._handles:
            try:
                self._handles[key] = open_family(self.nodes, family, info.generation, self.catalog, info)
            except FormatError as exc:
                raise self._stale(family, info.generation, exc) from None
        return self._handles[key]

    def spec(self, family: str) -> FamilySpec:
        return self.generation(family).spec

    def layout(self, family: str, generation: int | None = None) -> FamilyLayout:
        return self.handle(family, generation).layout

    def add_family(
        self,
        family: str,
        spec: FamilySpec,
        items_per_episode: Sequence[int] | np.ndarray | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
        producer: Producer | None = None,
        keys: Sequence[str] | None = None,
    ) -> GenerationInfo:
        """Plan a feature family (its generation 1): every row's place, before any is written.

        Args:
            family: the family's name, e.g. ``"qwen_vl"``.
            spec: row shape, dtype, ragged or not, ...
            items_per_episode: rows per episode in catalog order; by default
                ``ceil(steps / spec.vlm_reuse_count)``.
            lengths: for ragged families, the length of every row.
            producer: model id, revision, fingerprint and parameters.
            keys: one string per row (e.g. image path) when ``spec.has_keys``.

        Calling it again with the same plan returns the existing generation, so a
        resumed ingestion can call it unconditionally. A different plan raises.
        """
        self._require_writable()
        validate_name(family, "family name")
        producer = producer or Producer()
        items = self._items(spec, items_per_episode)
        if family in self.manifest.families:
            existing = self.generation(family, self.manifest.families[family].generations[0])
            layout = self.layout(family, existing.generation)
            same = (
                existing.spec == spec
                and np.array_equal(np.diff(layout.episode_rows), items)
                and (not spec.ragged or np.array_equal(layout.lengths, np.asarray(lengths)))
            )
            if not same:
                raise FormatError(
                    f"family {family!r} already exists in {self.location} with a different plan "
                    f"(spec or rows per episode differ); use another family name, or "
                    f"new_generation() to rebuild it"
                )
            return self.generation(family)
        info = self._plan(family, 1, spec, items, lengths, producer, keys)
        families = dict(self.manifest.families)
        families[family] = FamilyEntry(current_generation=1, generations=(1,))
        self._save_manifest(_replace_families(self.manifest, families))
        return info

    def new_generation(
        self,
        family: str,
        producer: Producer,
        lengths: Sequence[int] | np.ndarray | None = None,
    ) -> GenerationInfo:
        """Plan a new generation of ``family`` beside the current one (same rows per episode).

        Readers keep using the current generation until :meth:`switch_generation`.
        """
        self._require_writable()
        self.reload()
        entry = self._entry(family)
        current = self.generation(family)
        layout = self.layout(family)
        gen = max(entry.generations) + 1
        keys = self.keys(family, current.generation) if current.spec.has_keys else None
        info = self._plan(family, gen, current.spec, np.diff(layout.episode_rows), lengths, producer, keys)
        families = dict(self.manifest.families)
        families[family] = FamilyEntry(entry.current_generation, (*entry.generations, gen))
        self._save_manifest(_replace_families(self.manifest, families))
        return info

    def switch_generation(self, family: str, generation: int, keep_previous: int | None = 1) -> None:
        """Point readers at ``generation`` (one atomic manifest write), then drop older ones.

        Args:
            family: the family.
            generation: the generation readers use from now on.
            keep_previous: how many of the older generations (the newest of them)
                to keep. The default, 1, keeps the one just replaced, so a reader
                still on it finishes its epoch and moves on at its next
                ``reload()``/``VLADataset.refresh()``; ``None`` keeps them all;
                0 deletes them at once (a reader on them then gets
                :class:`vlastore.reader.StaleGenerationError` for shards it had
                not mapped yet).
        """
        self._require_writable()
        self.reload()
        entry = self._entry(family)
        if generation not in entry.generations:
            raise KeyError(f"family {family!r} has no generation {generation}")
        older = sorted(g for g in entry.generations if g < generation)
        dropped = set() if keep_previous is None else set(older[: max(0, len(older) - keep_previous)])
        keep = tuple(g for g in entry.generations if g not in dropped)
        families = dict(self.manifest.families)
        families[family] = FamilyEntry(generation, keep)
        self._save_manifest(_replace_families(self.manifest, families))
        for old in entry.generations:
            if old not in keep:
                # the generation's zarr.json first: a reader that finds a shard gone then knows it is stale
                self.storage.delete(meta_key(generation_path(family, old)))
                self.nodes.delete(generation_path(family, old))
                for cache in (self._infos, self._handles, self._keys, self._key_index):
                    cache.pop((family, old), None)
                for verify in ("always", "once", "never"):
                    self._readers.pop((family, old, verify), None)

    def _items(self, spec: FamilySpec, items_per_episode: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if items_per_episode is None:
            if spec.vlm_reuse_count is None:
                raise FormatError("give items_per_episode, or a spec with vlm_reuse_count to derive it")
            return vlm_items(self.catalog.steps, spec.vlm_reuse_count)
        items = np.asarray(items_per_episode, dtype=np.int64)
        if items.shape != (len(self.catalog),):
            raise FormatError(
                f"items_per_episode has {items.size} entries; the store has {len(self.catalog)} episodes"
            )
        return items

    def _plan(self, family: str, gen: int, spec: FamilySpec, items: np.ndarray,
              lengths: Sequence[int] | np.ndarray | None, producer: Producer,
              keys: Sequence[str] | None) -> GenerationInfo:
        handle = plan_generation(self.nodes, family, gen, spec, producer, utc_now(), items, lengths, keys,
                                 self.catalog)
        self._infos[(family, gen)] = handle.info
        self._handles[(family, gen)] = handle
        return handle.info

    # ---------------------------------------------------------- shard access

    def values_path(self, family: str, generation: int | None = None) -> str:
        """Path of a generation's sharded ``values`` array (format v1: one per generation)."""
        return values_path(family, self.generation(family, generation).generation)

    def shard_key(self, family: str, shard: int, generation: int | None = None) -> str:
        return self.handle(family, generation).shard_key(shard)

    def shard_index(self, family: str, shard: int, generation: int | None = None) -> ShardIndex | None:
        """Parsed index of a shard, or None when the shard was not written yet.

        Raises:
            ChecksumError: the index is corrupt.
        """
        return self.handle(family, generation).shard_index(shard)

    def written_shards(self, family: str, generation: int | None = None) -> np.ndarray:
        """Shard numbers whose files exist (complete: shards are written atomically)."""
        return self.handle(family, generation).written_shards()

    def coverage(self, family: str, generation: int | None = None) -> np.ndarray:
        """Bool per row: is it stored? (A row is stored when its first chunk is.)"""
        return self.handle(family, generation).coverage()

    # ------------------------------------------------------------------ reads

    def row(self, family: str, dataset: str | int, index: int, generation: int | None = None) -> int:
        """Row number of ``(dataset, index)`` in a family (``index`` is e.g. ``vlm_idx``)."""
        return self.handle(family, generation).row(dataset, index)

    def keys(self, family: str, generation: int | None = None) -> tuple[str, ...]:
        """The string key of every row of a family created with ``FamilySpec(has_keys=True)``."""
        info = self.generation(family, generation)
        if not info.spec.has_keys:
            raise KeyError(f"family {family!r} has no row keys (it was created without has_keys=True)")
        cache_key = (family, info.generation)
        if cache_key not in self._keys:
            self._keys[cache_key] = read_keys(self.nodes, self.handle(family, info.generation))
        return self._keys[cache_key]

    def row_by_key(self, family: str, key: str, generation: int | None = None) -> int:
        """Row number of the row whose key is ``key`` (e.g. an image path relative to the data root)."""
        info = self.generation(family, generation)
        cache_key = (family, info.generation)
        index = self._key_index.get(cache_key)
        if index is None:
            index = {k: r for r, k in enumerate(self.keys(family, generation)) if k}
            self._key_index[cache_key] = index
        try:
            return index[key]
        except KeyError:
            sample = ", ".join(repr(k) for k in list(index)[:3])
            raise KeyError(f"family {family!r} has no row with key {key!r}; keys look like {sample}") from None

    def feature_by_key(self, family: str, key: str, generation: int | None = None) -> torch.Tensor:
        """One feature row looked up by its key (see :meth:`row_by_key`), as :meth:`feature` returns it."""
        return self.reader(family, generation).tensor(self.row_by_key(family, key, generation))

    def reader(self, family: str, generation: int | None = None, verify: str = "once") -> FeatureReader:
        """A :class:`vlastore.read.FeatureReader` for one generation (cached per generation and ``verify``)."""
        handle = self.handle(family, generation)
        key = (family, handle.generation, verify)
        if key not in self._readers:
            self._readers[key] = FeatureReader(handle, verify=verify)
        return self._readers[key]

    def feature(
        self, family: str, dataset: str | int, index: int, generation: int | None = None
    ) -> torch.Tensor:
        """One feature row as a torch tensor of the family's dtype (bfloat16 bit-exact).

        Raises:
            KeyError: unknown family or dataset. IndexError: ``index`` out of range.
            MissingRowError: the row was not written. ChecksumError: it is corrupt.
        """
        row = self.row(family, dataset, index, generation)
        return self.reader(family, generation).tensor(row)

    def writer(self, family: str, rank: int | None = None, world_size: int | None = None,
               generation: int | None = None, **kwargs: Any) -> FamilyWriter:
        """A :class:`vlastore.writer.FamilyWriter` owning shards ``s % world_size == rank``.

        ``rank``/``world_size`` default to torch.distributed's when a process group
        is initialised, else to a single writer (0 of 1).
        """
        rank, world_size = resolve_rank(rank, world_size)
        if not self.writable:
            raise PermissionError(f"{self.location} is open read-only; open it with writable=True to write rows")
        return FamilyWriter(self.handle(family, generation), rank=rank, world_size=world_size, **kwargs)


def _replace_families(manifest: Manifest, families: dict[str, FamilyEntry]) -> Manifest:
    return dataclasses.replace(manifest, families=families)
