"""A vlastore store: catalog, robot series and feature families in one zarr v3 group."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.store import Store

from . import __version__
from .catalog import Catalog
from .format import (
    FORMAT_VERSION,
    GENERATION_KEY,
    MANIFEST_KEY,
    FamilyEntry,
    FamilySpec,
    FormatError,
    GenerationInfo,
    Manifest,
    Producer,
    SeriesInfo,
    episodes_path,
    family_path,
    generation_path,
    series_path,
    shard_key,
    validate_name,
)
from .integrity import (
    ALL_CHUNKS_KEY,
    check_array_meta,
    check_catalog,
    sharded_array_meta,
    small_array_meta,
    small_chunk_rows,
)
from .layout import FamilyLayout, vlm_items
from .shardcodec import ChecksumError, ShardIndex, decode_index, index_nbytes
from .storage import Storage, UnsafeFileError

if TYPE_CHECKING:
    import torch

    from .writer import FamilyWriter

__all__ = ["VLAStore", "EpisodeData", "utc_now"]

Location = str | os.PathLike[str] | Store


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


class VLAStore:
    """A store on disk (or any zarr store). Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, storage: Storage, writable: bool, strict: bool = True) -> None:
        self.storage = storage
        self.writable = writable
        self.manifest = Manifest.from_dict(storage.attrs[MANIFEST_KEY], where=storage.location)
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
        self._generations: dict[tuple[str, int], GenerationInfo] = {}
        self._layouts: dict[tuple[str, int], FamilyLayout] = {}
        self._readers: dict[tuple[str, int], Any] = {}
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
    ) -> VLAStore:
        """Create a store holding the catalog and robot series of ``episodes``.

        Args:
            location: a new (or empty) folder, a URL, or a zarr ``Store``.
            episodes: in store order; names must be unique.
            columns: column names per series key; default ``<key>_0..``.
            allow_nonfinite: store NaN/Inf in series instead of refusing them.

        Raises:
            FormatError: bad names, duplicate names, inconsistent series; nothing is written.
            FileExistsError: ``location`` exists and is not empty.
        """
        episodes = list(episodes)
        catalog = Catalog([e.name for e in episodes], [e.step_count() for e in episodes])
        keys = sorted({k for e in episodes for k in e.series})
        series_info: dict[str, SeriesInfo] = {}
        stacked: dict[str, np.ndarray] = {}
        for key in keys:
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
            stacked[key] = np.concatenate(parts).astype(dtype) if parts else np.zeros((0, width), dtype)
            series_info[key] = SeriesInfo(cols, str(dtype))

        manifest = Manifest(
            format_version=FORMAT_VERSION,
            vlastore_version=__version__,
            created=utc_now(),
            episodes=len(catalog),
            steps=catalog.total_steps,
            series=series_info,
        )
        # the manifest goes last: a crash before it leaves a folder that opens as "not a store"
        storage = Storage.create(location, attributes={})
        storage.write_small_array(episodes_path("name"), np.asarray(catalog.names, dtype=str))
        storage.write_small_array(episodes_path("steps"), catalog.steps)
        storage.write_small_array(episodes_path("step_offsets"), catalog.step_offsets)
        storage.create_group("series")
        storage.create_group("features")
        for key, data in stacked.items():
            storage.write_small_array(series_path(key), data)
        storage.set_root_attribute(MANIFEST_KEY, manifest.to_dict())
        return cls(storage, writable=True)

    @classmethod
    def open(cls, location: Location, writable: bool = False) -> VLAStore:
        """Open an existing store (read-only unless ``writable``).

        The manifest's checksum, the catalog and the series' metadata are checked
        here (a few small files); each family generation's metadata is checked when
        it is first used.

        Raises:
            StoreNotFoundError: no store there. FormatError: written by a newer
                format, or damaged metadata (the message names the file).
        """
        return cls(Storage.open(location, writable=writable), writable=writable)

    # ----------------------------------------------------------- checked reads

    def _check_small_meta(self, path: str, shape: tuple[int, ...], data_type: str) -> None:
        """A small array's ``zarr.json`` is what the manifest implies, and every chunk file is there.

        (zarr reads an absent chunk as the fill value: a deleted chunk would read as zeros. Arrays written
        before every chunk got a file, without the ``vlastore_chunks`` attribute, are read as they are.)
        """
        meta_key = f"{path}/zarr.json"
        meta = self.storage.read_json(meta_key)
        check_array_meta(meta, small_array_meta(shape, data_type), self.storage.where(meta_key))
        assert meta is not None
        if shape and shape[0] and meta.get("attributes", {}).get(ALL_CHUNKS_KEY) == "all":
            tail = "/0" * (len(shape) - 1)
            for chunk in range(-(-shape[0] // small_chunk_rows(shape))):
                if not self.storage.key_exists(f"{path}/c/{chunk}{tail}"):
                    raise FormatError(f"{self.storage.where(path)}: chunk file c/{chunk}{tail} is missing; the "
                                      "store is damaged (run `vlastore verify`)")

    def _small(self, path: str, shape: tuple[int, ...], data_type: str) -> np.ndarray:
        """A small array whose ``zarr.json`` is first checked against the shape and type the manifest implies."""
        self._check_small_meta(path, shape, data_type)
        data = self.storage.read_small_array(path)
        if data.shape != shape:
            raise FormatError(f"{self.storage.where(path)}: read shape {data.shape}, expected {shape}")
        return data

    def _read_catalog(self) -> Catalog:
        episodes = self.manifest.episodes
        names = [str(n) for n in self._small(episodes_path("name"), (episodes,), "string").tolist()]
        steps = self._small(episodes_path("steps"), (episodes,), "int64")
        offsets = self._small(episodes_path("step_offsets"), (episodes + 1,), "int64")
        check_catalog(self.manifest, names, steps, offsets, self.storage.where("episodes"))
        try:
            return Catalog(names, steps)
        except FormatError as exc:
            raise FormatError(f"{self.storage.where(episodes_path('name'))}: {exc}") from None

    def _series_meta(self, key: str) -> None:
        info = self.manifest.series[key]
        self._check_small_meta(series_path(key), (self.manifest.steps, len(info.columns)), info.dtype)

    def reload(self) -> None:
        """Re-read the manifest (after another process added a family or switched a generation)."""
        self.storage.refresh()
        self.manifest = Manifest.from_dict(self.storage.attrs[MANIFEST_KEY], where=self.location)

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(
                f"{self.location} is open read-only; use VLAStore.open(path, writable=True) to change it"
            )

    def _save_manifest(self, manifest: Manifest) -> None:
        self.storage.set_root_attribute(MANIFEST_KEY, manifest.to_dict())
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

    def series(self, key: str, dataset: str | int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Steps ``start:stop`` of one episode's robot series ``key`` (``[n, columns]``)."""
        if key not in self.manifest.series:
            raise KeyError(f"unknown series {key!r}; the store has {list(self.manifest.series)}")
        lo, hi = self.catalog.step_range(dataset)
        n = hi - lo
        stop = n if stop is None else stop
        if not (0 <= start <= stop <= n):
            raise IndexError(f"steps {start}:{stop} out of range for episode {dataset!r} with {n} steps")
        try:
            return np.asarray(self.storage.open_array(series_path(key))[lo + start : lo + stop])
        except FormatError:
            raise
        except Exception as exc:  # zarr's codec errors on a damaged chunk
            raise FormatError(f"{self.storage.where(series_path(key))}: a chunk is damaged ({type(exc).__name__}: "
                              f"{exc}); run `vlastore verify`") from None

    def series_all(self, key: str) -> np.ndarray:
        """One robot series for all episodes, concatenated along time (small: robot states)."""
        if key not in self.manifest.series:
            raise KeyError(f"unknown series {key!r}; the store has {list(self.manifest.series)}")
        info = self.manifest.series[key]
        return self._small(series_path(key), (self.manifest.steps, len(info.columns)), info.dtype)

    def columns(self, key: str) -> tuple[str, ...]:
        return self.manifest.series[key].columns

    def stats(self, key: str, episodes: Sequence[str | int] | None = None, **kwargs: Any) -> Any:
        """Exact statistics of series ``key`` (see :func:`vlastore.stats.series_stats`)."""
        from .stats import series_stats

        return series_stats(self, key, episodes, **kwargs)

    # -------------------------------------------------------------- families

    def _entry(self, family: str) -> FamilyEntry:
        try:
            return self.manifest.families[family]
        except KeyError:
            raise KeyError(f"unknown feature family {family!r}; the store has {list(self.families)}") from None

    def generation(self, family: str, generation: int | None = None) -> GenerationInfo:
        """Manifest of one generation of a family (the current one by default)."""
        entry = self._entry(family)
        gen = entry.current_generation if generation is None else generation
        if gen not in entry.generations:
            raise KeyError(f"family {family!r} has no generation {gen}; it has {list(entry.generations)}")
        key = (family, gen)
        if key not in self._generations:
            path = generation_path(family, gen)
            where = f"{self.storage.where(path)}/zarr.json"
            attrs = self.storage.node_attrs(path)
            if GENERATION_KEY not in attrs:
                raise FormatError(f"{where}: no '{GENERATION_KEY}' attribute (generation {gen} was never planned "
                                  "completely, or the file is damaged)")
            info = GenerationInfo.from_dict(attrs[GENERATION_KEY], where=where)
            if info.generation != gen:
                raise FormatError(f"{where}: says generation {info.generation}, but it is generation {gen}; the "
                                  "store is damaged")
            self._generations[key] = info
        return self._generations[key]

    def spec(self, family: str) -> FamilySpec:
        return self.generation(family).spec

    def layout(self, family: str, generation: int | None = None) -> FamilyLayout:
        info = self.generation(family, generation)
        key = (family, info.generation)
        if key not in self._layouts:
            self._layouts[key] = self._read_layout(family, info)
        return self._layouts[key]

    def _read_layout(self, family: str, info: GenerationInfo) -> FamilyLayout:
        """A generation's row tables, each checked against its attributes before it is read (bounded sizes)."""
        base = generation_path(family, info.generation)
        values_meta = f"{base}/values/zarr.json"
        check_array_meta(self.storage.read_json(values_meta), sharded_array_meta(info.spec, info.capacity),
                         self.storage.where(values_meta))
        episode_rows = self._small(f"{base}/episode_rows", (self.manifest.episodes + 1,), "int64")
        starts = lengths = None
        if info.spec.ragged:
            starts = self._small(f"{base}/starts", (info.rows,), "int64")
            lengths = self._small(f"{base}/lengths", (info.rows,), "int64")
        layout = FamilyLayout(info.spec, episode_rows, starts, lengths, where=self.storage.where(base))
        if (layout.rows, layout.capacity) != (info.rows, info.capacity):
            raise FormatError(
                f"{self.storage.where(base)}: the row tables give {layout.rows} rows and {layout.capacity} stored "
                f"rows, the generation attributes {info.rows} and {info.capacity}; the store is damaged"
            )
        return layout

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
        info = self._write_generation(family, 1, spec, items, lengths, producer, keys)
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
        info = self._write_generation(
            family, gen, current.spec, np.diff(layout.episode_rows), lengths, producer, keys
        )
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
                self.storage.delete(generation_path(family, old))
                for cache in (self._generations, self._layouts, self._readers, self._keys, self._key_index):
                    cache.pop((family, old), None)

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

    def _write_generation(
        self,
        family: str,
        gen: int,
        spec: FamilySpec,
        items: np.ndarray,
        lengths: Sequence[int] | np.ndarray | None,
        producer: Producer,
        keys: Sequence[str] | None,
    ) -> GenerationInfo:
        layout = FamilyLayout.plan(spec, items, lengths)
        if spec.has_keys != (keys is not None):
            raise FormatError(
                f"family {family!r}: spec.has_keys={spec.has_keys} but keys were "
                f"{'given' if keys is not None else 'not given'}"
            )
        if keys is not None and len(keys) != layout.rows:
            raise FormatError(f"family {family!r}: {len(keys)} keys for {layout.rows} rows; give one per row")
        info = GenerationInfo(gen, spec, producer, layout.rows, layout.capacity, utc_now())
        base = generation_path(family, gen)
        # anything left at this path is an interrupted plan or a generation whose deletion was killed midway
        # (its zarr.json may be gone while shard files remain): remove it all, or old shards would be read
        # as rows of the new generation
        if self.storage.exists(base) or next(iter(self.storage.list_keys(base)), None) is not None:
            self.storage.delete(base)
        self.storage.create_group(family_path(family))
        self.storage.write_small_array(f"{base}/episode_rows", layout.episode_rows)
        if spec.ragged:
            self.storage.write_small_array(f"{base}/starts", layout.starts)
            self.storage.write_small_array(f"{base}/lengths", layout.lengths)
        if keys is not None:
            self.storage.write_small_array(f"{base}/keys", np.asarray(list(keys), dtype=str))
        self.storage.create_sharded_array(
            f"{base}/values",
            layout.capacity,
            spec.row_shape,
            spec.storage_dtype,
            spec.rows_per_shard,
            spec.compression,
            attributes={"true_dtype": spec.dtype},
        )
        # the generation's attributes go last: they mark the plan as complete
        self.storage.group[base].attrs[GENERATION_KEY] = info.to_dict()
        self._generations[(family, gen)] = info
        self._layouts[(family, gen)] = layout
        return info

    # ---------------------------------------------------------- shard access

    def values_path(self, family: str, generation: int | None = None) -> str:
        return f"{generation_path(family, self.generation(family, generation).generation)}/values"

    def shard_key(self, family: str, shard: int, generation: int | None = None) -> str:
        ndim = 1 + len(self.generation(family, generation).spec.row_shape)
        return shard_key(self.values_path(family, generation), shard, ndim)

    def shard_index(self, family: str, shard: int, generation: int | None = None) -> ShardIndex | None:
        """Parsed index of a shard, or None when the shard was not written yet.

        Raises:
            ChecksumError: the index is corrupt.
        """
        layout = self.layout(family, generation)
        key = self.shard_key(family, shard, generation)
        tail = self.storage.read_range(key, -index_nbytes(layout.rows_per_shard))
        return None if tail is None else decode_index(tail, layout.rows_per_shard)

    def written_shards(self, family: str, generation: int | None = None) -> np.ndarray:
        """Shard numbers whose files exist (complete: shards are written atomically)."""
        values = self.values_path(family, generation)
        layout = self.layout(family, generation)
        tail = ["0"] * len(layout.spec.row_shape)
        shards = set()
        for key in self.storage.list_keys(f"{values}/c"):
            parts = key[len(values) + 3 :].split("/")
            # only keys this layout can have: "<shard>/0/.." with shard < n_shards (anything else is ignored)
            if parts[1:] == tail and parts[0].isdigit() and len(parts[0]) <= 18 and str(int(parts[0])) == parts[0]:
                shard = int(parts[0])
                if shard < layout.n_shards:
                    shards.add(shard)
        return np.array(sorted(shards), dtype=np.int64)

    def coverage(self, family: str, generation: int | None = None) -> np.ndarray:
        """Bool per row: is it stored? (A row is stored when its first chunk is.)"""
        layout = self.layout(family, generation)
        present = np.zeros(layout.rows, dtype=bool)
        for shard in self.written_shards(family, generation).tolist():
            try:
                index = self.shard_index(family, shard, generation)
            except (ChecksumError, UnsafeFileError):  # unreadable: its rows count as absent (verify says why)
                continue
            if index is None:
                continue
            rows = layout.shard_rows(shard)
            first_chunk = layout.start_of(rows) - shard * layout.rows_per_shard
            present[rows] = index.present[first_chunk]
        return present

    # ------------------------------------------------------------------ reads

    def row(self, family: str, dataset: str | int, index: int, generation: int | None = None) -> int:
        """Row number of ``(dataset, index)`` in a family (``index`` is e.g. ``vlm_idx``)."""
        e = self.catalog.resolve(dataset)
        layout = self.layout(family, generation)
        try:
            return layout.row(e, int(index))
        except IndexError as exc:  # say which family and episode, not just "this episode"
            raise IndexError(f"family {family!r}, dataset {self.catalog.names[e]!r}: {exc}") from None

    def keys(self, family: str, generation: int | None = None) -> tuple[str, ...]:
        """The string key of every row of a family created with ``FamilySpec(has_keys=True)``."""
        info = self.generation(family, generation)
        if not info.spec.has_keys:
            raise KeyError(f"family {family!r} has no row keys (it was created without has_keys=True)")
        cache_key = (family, info.generation)
        if cache_key not in self._keys:
            path = f"{generation_path(family, info.generation)}/keys"
            self._keys[cache_key] = tuple(str(k) for k in self._small(path, (info.rows,), "string").tolist())
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

    def reader(self, family: str, generation: int | None = None) -> Any:
        """A :class:`vlastore.reader.FeatureReader` for one generation (cached)."""
        from .reader import FeatureReader

        gen = self.generation(family, generation).generation
        key = (family, gen)
        if key not in self._readers:
            self._readers[key] = FeatureReader(self, family, gen)
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
        from .writer import FamilyWriter

        return FamilyWriter(self, family, rank=rank, world_size=world_size, generation=generation, **kwargs)


def _replace_families(manifest: Manifest, families: dict[str, FamilyEntry]) -> Manifest:
    return dataclasses.replace(manifest, families=families)
