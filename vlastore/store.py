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
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .catalog import Catalog
from .commitlog import CommitConflictError, CommitLog, SnapshotNotFoundError
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
    NewerFormatError,
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
from .living import (
    ArrayWriter,
    CatalogData,
    SegmentRows,
    attrs_json,
    compact_generation,
    fps_value,
    new_segment,
    pack_utf8,
    read_catalog,
    read_generation,
    read_keys_v2,
    read_row_map,
    read_small,
    write_catalog,
    write_layout,
)
from .nodes import ZarrNodes
from .ranks import resolve_rank
from .read import FeatureReader
from .shardcodec import ShardIndex
from .snapshot import (
    LOG_PREFIX,
    SERIES_SEGMENTS,
    SNAPSHOT_FORMAT_VERSION,
    CatalogRef,
    Change,
    FamilyState,
    GenerationState,
    SeriesSegment,
    SeriesState,
    Snapshot,
    StatsRef,
    log_key,
)
from .snapshot import Segment as SnapshotSegment
from .stats import DEFAULT_QUANTILES, FeatureStats, feature_stats, series_stats
from .storage import LocalStorage, Location, open_storage
from .storage.local import remove_store_files
from .storedstats import pick, prune_cache, read_stored, with_stats
from .version import __version__
from .writer import FamilyWriter

if TYPE_CHECKING:
    import torch

__all__ = [
    "VLAStore",
    "EpisodeData",
    "SegmentRows",
    "utc_now",
    "probe",
    "remove_store",
    "upgrade_store",
    "Location",
    "SnapshotNotFoundError",
    "CommitConflictError",
    "DEFAULT_FORMAT_VERSION",
]

DEFAULT_FORMAT_VERSION = 1
"""Format of stores made when not asked (:meth:`VLAStore.create`, ``vlastore ingest ... --out``): still 1 until
the tests that read format-1 paths directly are moved to the API (issue 11); every creation path already takes
this one constant, so making 2 the default is this line. ``format_version=2`` / ``--format-version 2`` makes a
living store (commits, appends, removes, snapshots)."""


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
    task: str | None = None
    """Task / instruction text (format 2 keeps it in the task table; batches can carry it)."""
    fps: float | None = None
    attrs: dict[str, Any] | None = None
    """Free per-episode attributes (a JSON object)."""

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


def upgrade_store(location: Location, storage_options: dict[str, Any] | None = None) -> int | None:
    """Make a format-1 store a format-2 store, in place; returns the commit made (None: already format 2).

    Writes the portable catalog, the row tables of format 2 and commit 1, which points at the
    format-1 series and ``values`` arrays as they are (nothing is copied); the root ``zarr.json``
    is rewritten last, in one atomic replace. A kill before that leaves a format-1 store that reads
    as before (the extra folders are ignored; a rerun starts over); after it, a format-2 store.

    Raises:
        StoreNotFoundError: no store there. FormatError: the store is damaged (run ``vlastore verify``).
    """
    return _upgrade(VLAStore.open(location, writable=True, storage_options=storage_options))


def _upgrade(store: VLAStore) -> int | None:
    """:func:`upgrade_store` on a store opened writable (the object itself still shows format 1 after it)."""
    if store.snapshot is not None:
        return None
    nodes, storage = store.nodes, store.storage
    storage.delete_prefix(LOG_PREFIX)  # commits of an upgrade killed before its last step: start over
    out = ArrayWriter(nodes, 1)
    cat = store.catalog
    n = len(cat)
    data = CatalogData(
        list(cat.names),
        np.arange(n, dtype=np.int64),
        cat.steps,
        cat.step_offsets[:-1],
        np.full(n, np.nan),
        np.full(n, -1, dtype=np.int64),
        ["{}"] * n,
        [],
    )
    cat_path, tasks_path = write_catalog(out, data)
    series = {}
    for key, info in store.manifest.series.items():
        store._series_meta(key)
        out.record(series_path(key))
        series[key] = SeriesState(info.columns, info.dtype, (SeriesSegment(series_path(key), cat.total_steps),))
    families = {}
    for family, entry in store.manifest.families.items():
        gens = {}
        for gen in entry.generations:
            handle = store.handle(family, gen)
            layout, spec = handle.layout, handle.spec
            tables = None
            if spec.ragged or spec.has_keys:
                tables = f"{generation_path(family, gen)}/{out.oid('t')}"
                if spec.ragged:
                    out.small(f"{tables}/starts", layout.starts)
                    out.small(f"{tables}/lengths", layout.lengths)
                if spec.has_keys:
                    key_bytes, key_offsets = pack_utf8(list(store.keys(family, gen)))
                    out.small(f"{tables}/key_utf8", key_bytes)
                    out.small(f"{tables}/key_offsets", key_offsets)
            values = values_path(family, gen)
            out.record(values)
            segment = SnapshotSegment(values, 0, layout.n_shards, layout.rows, layout.capacity, tables)
            layout_path = write_layout(out, family, gen, layout.episode_rows[:-1], np.diff(layout.episode_rows))
            gens[gen] = GenerationState(
                gen,
                spec,
                handle.info.producer,
                handle.info.created,
                (segment,),
                layout_path,
                layout.rows,
                layout.capacity,
            )
        families[family] = FamilyState(entry.current_generation, gens)
    snapshot = Snapshot(
        commit=1,
        parent=None,
        time=utc_now(),
        vlastore_version=__version__,
        changes=(Change("upgrade", {"from_format": 1}),),
        next_episode_id=n,
        catalog=CatalogRef(cat_path, n, cat.total_steps, tasks_path, 0),
        series=series,
        families=families,
        arrays=dict(out.arrays),
    )
    snapshot = with_stats(nodes, None, None, snapshot, data, out)
    snapshot = dataclasses.replace(snapshot, arrays=dict(out.arrays))
    CommitLog(storage).write(snapshot)
    nodes.set_root_attribute(
        MANIFEST_KEY,
        {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "created": store.manifest.created,
            "store_id": out.token,
            "upgraded": snapshot.time,
        },
    )
    return 1


class VLAStore:
    """A store on disk, in object storage or in any zarr store. Create with :meth:`create`, open with :meth:`open`.

    Args:
        nodes: the store's root, opened (see :meth:`open`).
        strict: raise on damaged catalog or series metadata; with ``False`` (vlastore verify) record each
            problem in :attr:`open_problems` and go on.
    """

    _catdata: CatalogData
    """Format 2: the catalog of the snapshot shown, with its metadata columns."""

    def __init__(self, nodes: ZarrNodes, strict: bool = True, snapshot: int | None = None) -> None:
        self.nodes = nodes
        self.storage = nodes.storage
        self.writable = nodes.writable
        self.open_problems: list[tuple[str, str]] = []
        self._segment_cache: dict[str, np.ndarray] = {}
        """Format 2: series segments read for the statistics of a commit, kept for the next one (immutable)."""
        """With ``strict=False`` (vlastore verify): (path, problem) of what failed its check at open."""
        self._reset_caches()
        root = nodes.attrs[MANIFEST_KEY]
        version = root.get("format_version") if isinstance(root, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > SNAPSHOT_FORMAT_VERSION:
            raise NewerFormatError(
                f"{self.storage.location} was written in vlastore format version {version} (by vlastore "
                f"{root.get('vlastore_version', '?')}); this vlastore reads versions up to {SNAPSHOT_FORMAT_VERSION}. "
                "Upgrade: pip install -U vlastore"
            )
        self.format_version = SNAPSHOT_FORMAT_VERSION if version == SNAPSHOT_FORMAT_VERSION else 1
        self.snapshot: Snapshot | None = None
        """The commit this store object shows (format 2); None for a format-1 store."""
        self._log: CommitLog | None = None
        if self.format_version == SNAPSHOT_FORMAT_VERSION:
            self._root = root
            self._log = CommitLog(self.storage)
            shown = self._log.head() if snapshot is None else self._read_snapshot(snapshot)
            try:
                self._adopt(shown)
            except FormatError as exc:
                if strict:
                    raise
                self.open_problems.append((shown.catalog.path, str(exc)))
                # stand-in names, so the series and families can still be checked (verify reports rows by number)
                n, zero = shown.catalog.episodes, np.zeros(shown.catalog.episodes, np.int64)
                names = [f"episode_{i}" for i in range(n)]
                stand_in = CatalogData(names, zero, zero, zero, np.full(n, np.nan), zero - 1, ["{}"] * n)
                self._written_path = shown.catalog.path  # _adopt takes the stand-in instead of reading the catalog
                self._adopt(shown, stand_in)
            return
        if snapshot not in (None, 0):
            raise SnapshotNotFoundError(
                f"{self.storage.location} is a format-1 store: it has only snapshot 0 "
                "(`vlastore upgrade` makes it a store with commits)"
            )
        self.manifest = Manifest.from_dict(root, where=self.storage.location)
        try:
            self.catalog = self._read_catalog()
        except FormatError as exc:
            if strict:
                raise
            self.open_problems.append(("episodes", str(exc)))
            # stand-in names, so the families can still be checked (verify reports rows by number then)
            self.catalog = Catalog(
                [f"episode_{i}" for i in range(self.manifest.episodes)],
                np.zeros(self.manifest.episodes, dtype=np.int64),
            )
        for key in self.manifest.series:
            try:
                self._series_meta(key)
            except FormatError as exc:
                if strict:
                    raise
                self.open_problems.append((series_path(key), str(exc)))

    def _reset_caches(self) -> None:
        self._infos: dict[tuple[str, int], GenerationInfo] = {}
        self._handles: dict[tuple[str, int], FamilyHandle] = {}
        self._readers: dict[tuple[str, int, str], FeatureReader] = {}
        self._keys: dict[tuple[str, int], tuple[str, ...]] = {}
        self._key_index: dict[tuple[str, int], dict[str, int]] = {}
        self._series_cache: dict[str, np.ndarray] = {}
        self._stored_stats: dict[str, tuple[np.ndarray, StatsRef] | None] = {}
        self._feature_stats: dict[tuple[Any, ...], tuple[bytes, FeatureStats]] = {}

    def _adopt(self, snapshot: Snapshot, catalog: CatalogData | None = None) -> None:
        """Show ``snapshot`` (format 2): its catalog read and checked (or the one this process just wrote for
        it), a manifest view of it, caches dropped."""
        if self.snapshot is not None and snapshot.catalog.path == self.snapshot.catalog.path:
            catalog = self._catdata  # objects never change: the same catalog version is the same data
        elif catalog is None or snapshot.catalog.path != getattr(self, "_written_path", None):
            catalog = read_catalog(self.nodes, snapshot)
        self._catdata = catalog
        self.catalog = self._catdata.catalog()
        self.snapshot = snapshot
        self.manifest = Manifest(
            format_version=SNAPSHOT_FORMAT_VERSION,
            vlastore_version=snapshot.vlastore_version,
            created=str(self._root.get("created", "")),
            episodes=len(self.catalog),
            steps=self.catalog.total_steps,
            series={k: SeriesInfo(v.columns, v.dtype) for k, v in snapshot.series.items()},
            families={
                f: FamilyEntry(st.current_generation, tuple(sorted(st.generations)))
                for f, st in snapshot.families.items()
            },
        )
        self._reset_caches()

    # -------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        location: Location,
        episodes: Sequence[EpisodeData],
        columns: Mapping[str, Sequence[str]] | None = None,
        allow_nonfinite: bool = False,
        storage_options: dict[str, Any] | None = None,
        format_version: int = DEFAULT_FORMAT_VERSION,
    ) -> VLAStore:
        """Create a store holding the catalog and robot series of ``episodes``.

        Args:
            location: a new (or empty) folder, an ``s3://bucket/prefix`` URL, a zarr ``Store`` or a
                :class:`~vlastore.storage.Storage`.
            episodes: in store order; names must be unique.
            columns: column names per series key; default ``<key>_0..``.
            allow_nonfinite: store NaN/Inf in series instead of refusing them.
            storage_options: for ``s3://`` URLs: endpoint, credentials, ... (``vlastore.storage.STORAGE_OPTIONS``).
            format_version: 2 (default: commits, appends, snapshots) or 1 (write-once, the older layout).

        Raises:
            FormatError: bad names, duplicate names, inconsistent series; nothing is written.
            FileExistsError: ``location`` exists and is not empty.
        """
        episodes = list(episodes)
        if format_version == SNAPSHOT_FORMAT_VERSION:
            return cls._create_v2(open_storage(location, storage_options), episodes, columns, allow_nonfinite)
        if format_version != FORMAT_VERSION:
            raise ValueError(f"format_version={format_version}: vlastore writes format 1 or 2")
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
    def open(
        cls,
        location: Location,
        writable: bool = False,
        storage_options: dict[str, Any] | None = None,
        snapshot: int | None = None,
    ) -> VLAStore:
        """Open an existing store (read-only unless ``writable``).

        The manifest's checksum, the catalog and the series' metadata are checked
        here (a few small files); each family generation's metadata is checked when
        it is first used.

        Args:
            location: a folder, an ``s3://bucket/prefix`` URL, a zarr ``Store`` or a Storage.
            writable: allow changes (families, generations, writers).
            storage_options: for ``s3://`` URLs (``vlastore.storage.STORAGE_OPTIONS``).
            snapshot: a commit number (``store.snapshot_id``, ``vlastore log``) to open as it was then
                (format 2; exact reproduction of a run until ``vlastore gc`` removes it); default: the newest.

        Raises:
            StoreNotFoundError: no store there. FormatError: written by a newer
                format, or damaged metadata (the message names the file).
            SnapshotNotFoundError: no such snapshot.
        """
        return cls(ZarrNodes.open(open_storage(location, storage_options), writable=writable), snapshot=snapshot)

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

    def reload(self, snapshot: int | None = None) -> None:
        """Move to the newest state (after another process appended, removed, added a family or switched a
        generation). Format 2: the newest commit, or commit ``snapshot``; objects of the old snapshot stay
        readable until gc."""
        if self._log is not None:
            target = self._log.head() if snapshot is None else self._read_snapshot(snapshot)
            if self.snapshot is None or target.commit != self.snapshot.commit:
                self._adopt(target)
            return
        if snapshot not in (None, 0):
            raise SnapshotNotFoundError(f"{self.location} is a format-1 store: it has only snapshot 0")
        self.nodes.refresh()
        self.manifest = Manifest.from_dict(self.nodes.attrs[MANIFEST_KEY], where=self.location)

    def _read_snapshot(self, snapshot: int) -> Snapshot:
        """Commit ``snapshot``; 0 (what a format-1 store shows) is the commit that upgraded it, when there is one."""
        assert self._log is not None
        if snapshot == 0:
            first = self._log.read(1)
            if any(change.op == "upgrade" for change in first.changes):
                return first
        return self._log.read(snapshot)

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
        """The zarr array of robot series ``key`` (all episodes along time), for lazy slicing.

        Format 2: the series of the snapshot's episodes in catalog order, in memory (its segments gathered).
        """
        if self.snapshot is not None:
            return self.series_all(key)  # type: ignore[return-value]
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
            raise FormatError(
                f"{self.storage.where(series_path(key))}: a chunk is damaged ({type(exc).__name__}: "
                f"{exc}); run `vlastore verify`"
            ) from None

    def series_all(self, key: str) -> np.ndarray:
        """One robot series for all episodes, concatenated along time (small: robot states)."""
        if self.snapshot is not None:
            return self._series_v2(self._series_key(key))
        return self.nodes.read_checked(series_path(self._series_key(key)), *self._series_shape(key))

    def _physical_series(self, snapshot: Snapshot, key: str) -> np.ndarray:
        """Every segment of a series concatenated (removed episodes' steps included)."""
        state = snapshot.series[key]
        parts = [
            read_small(self.nodes, seg.path, (seg.rows, len(state.columns)), state.dtype, snapshot.arrays)
            for seg in state.segments
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(state.columns)), dtype=state.dtype)

    def _series_v2(self, key: str) -> np.ndarray:
        if key not in self._series_cache:
            assert self.snapshot is not None
            physical = self._physical_series(self.snapshot, key)
            cat = self._catdata
            offsets = self.catalog.step_offsets
            index = np.repeat(cat.step_start - offsets[:-1], cat.steps) + np.arange(int(offsets[-1]), dtype=np.int64)
            values = physical[index]
            values.setflags(write=False)
            self._series_cache[key] = values
        return self._series_cache[key]

    def columns(self, key: str) -> tuple[str, ...]:
        return self.manifest.series[key].columns

    def stats(self, key: str, episodes: Sequence[str | int] | None = None, **kwargs: Any) -> Any:
        """Exact statistics of series ``key`` (see :func:`vlastore.stats.series_stats`).

        Over the whole store (``episodes=None``), format 2: read from the statistics stored with the
        snapshot's commit (count, mean, std, min, max, q01 q10 q50 q90 q99; checked against the commit,
        a mismatch raises FormatError); other quantiles, subsets, format-1 stores and commits written
        without statistics: computed from the data.
        """
        self._series_key(key)
        if episodes is None and self.snapshot is not None and set(kwargs) <= {"quantiles", "method"}:
            if key not in self._stored_stats:
                self._stored_stats[key] = read_stored(self.nodes, self.snapshot, key)
            stored = self._stored_stats[key]
            if stored is not None:
                array, ref = stored
                quantiles, method = kwargs.get("quantiles", DEFAULT_QUANTILES), kwargs.get("method", "linear")
                found = pick(array, ref, quantiles, method, self.columns(key))
                if found is not None:
                    return found
        return series_stats(self, key, episodes, **kwargs)

    def feature_stats(
        self, family: str, generation: int | None = None, episodes: Sequence[str | int] | None = None
    ) -> FeatureStats:
        """Mean/std/min/max per dimension of a feature family over the rows written (float64; missing rows are
        left out and counted: ``.rows`` rows, ``.count`` vectors). Computed on demand
        (:func:`vlastore.stats.feature_stats`) and kept while the snapshot and the rows written stay the same.
        """
        gen = self._generation_number(family, generation)
        present = np.packbits(self.coverage(family, gen)).tobytes()
        chosen = None if episodes is None else tuple(self.catalog.resolve(e) for e in episodes)
        cache_key = (family, gen, chosen)
        cached = self._feature_stats.get(cache_key)
        if cached is None or cached[0] != present:
            cached = (present, feature_stats(self, family, gen, None if chosen is None else list(chosen)))
            self._feature_stats[cache_key] = cached
        return cached[1]

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
        if self.snapshot is not None:  # a snapshot's objects stay until gc; gc never drops a retained snapshot's
            return False
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
        if self.snapshot is not None:
            return self.handle(family, gen).info
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
        if self.snapshot is not None:
            gen = self._generation_number(family, generation)
            if (family, gen) not in self._handles:
                state = self.snapshot.families[family].generations[gen]
                handle = read_generation(self.nodes, family, state, self.catalog, self.snapshot.arrays)
                self._handles[(family, gen)] = handle
                self._infos[(family, gen)] = handle.info
            return self._handles[(family, gen)]
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
        if self.snapshot is not None:
            self.reload()
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
        if self.snapshot is not None:
            self._commit(
                lambda head, cat, out: self._add_family_v2(
                    head, cat, out, family, spec, items_per_episode, lengths, producer, keys
                )
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
        if self.snapshot is not None:
            counts = np.diff(layout.episode_rows)
            self._commit(
                lambda head, cat, out: self._new_generation_v2(
                    head, cat, out, family, gen, counts, lengths, producer, keys
                )
            )
            return self.generation(family, gen)
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
        if self.snapshot is not None:  # readers of older snapshots keep the dropped ones until gc
            self._commit(lambda head, cat, out: self._switch_v2(head, family, generation, dropped))
            return
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
            raise FormatError(f"items_per_episode has {items.size} entries; the store has {len(self.catalog)} episodes")
        return items

    def _plan(
        self,
        family: str,
        gen: int,
        spec: FamilySpec,
        items: np.ndarray,
        lengths: Sequence[int] | np.ndarray | None,
        producer: Producer,
        keys: Sequence[str] | None,
    ) -> GenerationInfo:
        handle = plan_generation(self.nodes, family, gen, spec, producer, utc_now(), items, lengths, keys, self.catalog)
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
            if self.snapshot is not None:
                handle = self.handle(family, info.generation)
                state = self.snapshot.families[family].generations[info.generation]
                self._keys[cache_key] = tuple(
                    read_keys_v2(
                        self.nodes,
                        state,
                        handle.physical_rows,  # type: ignore[attr-defined]
                        self.snapshot.arrays,
                    )
                )
            else:
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

    def feature(self, family: str, dataset: str | int, index: int, generation: int | None = None) -> torch.Tensor:
        """One feature row as a torch tensor of the family's dtype (bfloat16 bit-exact).

        Raises:
            KeyError: unknown family or dataset. IndexError: ``index`` out of range.
            MissingRowError: the row was not written. ChecksumError: it is corrupt.
        """
        row = self.row(family, dataset, index, generation)
        return self.reader(family, generation).tensor(row)

    def writer(
        self,
        family: str,
        rank: int | None = None,
        world_size: int | None = None,
        generation: int | None = None,
        **kwargs: Any,
    ) -> FamilyWriter:
        """A :class:`vlastore.writer.FamilyWriter` owning shards ``s % world_size == rank``.

        ``rank``/``world_size`` default to torch.distributed's when a process group
        is initialised, else to a single writer (0 of 1).
        """
        rank, world_size = resolve_rank(rank, world_size)
        if not self.writable:
            raise PermissionError(f"{self.location} is open read-only; open it with writable=True to write rows")
        return FamilyWriter(self.handle(family, generation), rank=rank, world_size=world_size, **kwargs)

    # ------------------------------------------------------- format 2: commits

    @property
    def snapshot_id(self) -> int:
        """The commit this object shows (format 2); 0 for a format-1 store (its only state)."""
        return self.snapshot.commit if self.snapshot is not None else 0

    def refresh(self) -> None:
        """Move to the newest commit (same as :meth:`reload`)."""
        self.reload()

    def log(self) -> list[dict[str, Any]]:
        """Every commit, oldest first: ``{"commit", "time", "episodes", "steps", "changes"}``."""
        if self._log is None:
            return [
                {
                    "commit": 0,
                    "time": self.manifest.created,
                    "episodes": len(self.catalog),
                    "steps": self.catalog.total_steps,
                    "changes": ["format 1 store (no commits)"],
                }
            ]
        return self._log.describe()

    def episode_info(self, episode: str | int) -> dict[str, Any]:
        """An episode's metadata: task text, fps (None when unknown), attributes (format 2)."""
        e = self.catalog.resolve(episode)
        if self.snapshot is None:
            return {"task": None, "task_index": -1, "fps": None, "attrs": {}}
        cat = self._catdata
        t = int(cat.task[e])
        fps = float(cat.fps[e])
        return {
            "task": cat.tasks[t] if t >= 0 else None,
            "task_index": t,
            "fps": None if np.isnan(fps) else fps,
            "attrs": json.loads(cat.attrs[e]),
        }

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task table (format 2): every task text, indexed by ``episode_info(...)["task_index"]``."""
        return tuple(self._catdata.tasks) if self.snapshot is not None else ()

    def episode_tasks(self) -> np.ndarray:
        """Task index of every catalog episode (-1: none)."""
        if self.snapshot is None:
            return np.full(len(self.catalog), -1, dtype=np.int64)
        return self._catdata.task

    def episode_fps(self) -> np.ndarray:
        """Recorded fps of every catalog episode (NaN: unknown; format 1 records none)."""
        if self.snapshot is None:
            return np.full(len(self.catalog), np.nan)
        return np.asarray(self._catdata.fps, dtype=np.float64)

    def upgrade(self) -> bool:
        """Make this format-1 store a format-2 store in place (as ``vlastore upgrade``; atomic) and show it.

        The first change of a format-1 store (append, remove, replace) does this itself: a store made by an
        older vlastore keeps reading unchanged until then. Its content becomes commit 1, which
        ``open(path, snapshot=0)`` also opens, so a run that recorded snapshot 0 reopens the same data.

        Returns:
            True when the store was upgraded, False when it already was format 2.
        """
        self._require_writable()
        if self._log is not None:
            return False
        self.nodes.refresh()  # another process may have upgraded it since this one opened it: never twice
        root = self.nodes.attrs[MANIFEST_KEY]
        upgraded_here = not (isinstance(root, dict) and root.get("format_version") == SNAPSHOT_FORMAT_VERSION)
        if upgraded_here:
            _upgrade(self)
            self.nodes.refresh()
        VLAStore.__init__(self, self.nodes)
        return upgraded_here

    def _require_v2(self, what: str) -> CommitLog:
        if self._log is None and what == "this change" and self.writable:
            self.upgrade()
        if self._log is None:
            raise FormatError(
                f"{self.location} is a format-1 store: {what} needs format 2; run "
                f"`vlastore upgrade {self.location}` first"
            )
        return self._log

    def _commit(self, apply: Any) -> Snapshot | None:
        """Commit ``apply(head, catalog, writer) -> (changes, fields)`` on the head (re-applied after a lost race).

        ``apply`` returns None when there is nothing to change; then nothing is committed.
        """
        self._require_writable()
        log_ = self._require_v2("this change")

        def change(head: Snapshot | None, number: int) -> Snapshot:
            if head is None:
                raise CommitConflictError(f"{self.location}: the commit log is empty; the store is damaged")
            # the snapshot this object shows is usually the head: its catalog is in memory already
            cat = (
                self._catdata
                if self.snapshot is not None and head.commit == self.snapshot.commit
                else read_catalog(self.nodes, head)
            )
            out = ArrayWriter(self.nodes, number)
            result = apply(head, cat, out)
            if result is None:
                raise _Nothing(head)
            changes, fields = result
            draft = head.evolve(number, utc_now(), changes, vlastore_version=__version__, **fields)
            # statistics of the new snapshot, stored with it (the head's when it shows the same episodes)
            written = self._written_catalog if draft.catalog.path == getattr(self, "_written_path", None) else None
            draft = with_stats(
                self.nodes,
                head,
                cat,
                dataclasses.replace(draft, arrays={**head.arrays, **out.arrays}),
                written,
                out,
                self._segment_cache,
            )
            arrays = _used_arrays(draft, {**head.arrays, **out.arrays})
            return dataclasses.replace(draft, arrays=arrays)

        self._written_catalog: CatalogData | None = None
        try:
            snapshot = log_.commit(change)
        except _Nothing as exc:
            self._adopt(exc.head)
            return None
        self._adopt(snapshot, self._written_catalog)
        prune_cache(self._segment_cache, snapshot)
        return snapshot

    @classmethod
    def _create_v2(
        cls,
        storage: Any,
        episodes: list[EpisodeData],
        columns: Mapping[str, Sequence[str]] | None,
        allow_nonfinite: bool,
    ) -> VLAStore:
        catalog = Catalog([e.name for e in episodes], [e.step_count() for e in episodes])
        del catalog  # names checked
        keys = sorted({k for e in episodes for k in e.series})
        empty = Snapshot(
            commit=1,
            parent=None,
            time=utc_now(),
            vlastore_version=__version__,
            changes=(),
            next_episode_id=0,
            catalog=CatalogRef("catalog/none", 0, 0),
            series={},
            families={},
            arrays={},
        )
        checked = _prepare_rows(empty, CatalogData.empty(), episodes, columns, allow_nonfinite, keys=keys)
        nodes = ZarrNodes.create(storage, attributes={})  # every check passed: a refused store writes nothing
        out = ArrayWriter(nodes, 1)
        cat, series, _ = _write_rows(checked, out)
        cat_path, tasks_path = write_catalog(out, cat)
        snapshot = dataclasses.replace(
            empty,
            changes=(Change("create", {"episodes": len(episodes)}),),
            next_episode_id=len(episodes),
            catalog=CatalogRef(cat_path, len(cat.names), int(cat.steps.sum()), tasks_path, len(cat.tasks)),
            series=series,
            arrays=dict(out.arrays),
        )
        snapshot = with_stats(nodes, None, None, snapshot, cat, out)
        snapshot = dataclasses.replace(snapshot, arrays=dict(out.arrays))
        CommitLog(nodes.storage).write(snapshot)
        # the root attribute goes last: a crash before it leaves a folder that opens as "not a store"
        nodes.set_root_attribute(
            MANIFEST_KEY, {"format_version": SNAPSHOT_FORMAT_VERSION, "created": snapshot.time, "store_id": out.token}
        )
        return cls(nodes)

    def add_episodes(
        self,
        episodes: Sequence[EpisodeData],
        replace: bool = False,
        rows: Mapping[str, Mapping[int, SegmentRows] | SegmentRows] | None = None,
        columns: Mapping[str, Sequence[str]] | None = None,
        allow_nonfinite: bool = False,
    ) -> Snapshot | None:
        """Append episodes in one commit (format 2).

        An episode already in the store with identical steps, series and metadata is skipped; with
        different data it is refused, naming it, unless ``replace`` (then its old steps and feature rows
        become unreachable, and it is appended again: its feature rows are missing until written).
        Every family generation gets a new segment with the new episodes' rows, missing until a writer
        (``build-features``, ``ingest ... --into``) fills them; existing shard files are not touched.

        Args:
            episodes: the episodes, with every series the store has.
            replace: swap episodes whose data differ.
            rows: for families whose rows per episode cannot be derived (no ``vlm_reuse_count``, ragged,
                or row keys): ``{family: SegmentRows}`` for the new episodes in the order given (all
                generations), or ``{family: {generation: SegmentRows}}``.
            columns, allow_nonfinite: as in :meth:`create` (columns must match the store's).

        Returns:
            The new snapshot, or None when every episode was already there (nothing committed).

        Raises:
            FormatError: an episode differs (without ``replace``), or series/rows do not fit the store.
            CommitConflictError: other writers kept committing first.
        """
        episodes = list(episodes)
        Catalog([e.name for e in episodes], [e.step_count() for e in episodes])  # names valid, unique, steps

        def apply(head: Snapshot, cat: CatalogData, out: ArrayWriter) -> Any:
            present = {n: i for i, n in enumerate(cat.names)}
            physical: dict[str, np.ndarray] = {}  # each series read once per attempt, only if an episode is there
            new, replaced = [], []
            for e in episodes:
                if e.name not in present:
                    new.append(e)
                    continue
                diff = self._difference(head, cat, present[e.name], e, physical)
                if diff is None:
                    continue
                if not replace:
                    raise FormatError(
                        f"episode {e.name!r} is already in {self.location} with different data ({diff}); "
                        "pass --replace (add_episodes(..., replace=True) in Python) to swap it, or rename it"
                    )
                replaced.append(e)
                new.append(e)
            if not new:
                return None
            gone = {e.name for e in replaced}
            keep = np.asarray([n not in gone for n in cat.names], dtype=bool)
            kept = cat.take(keep)
            grown, series, _ = _append_rows(head, kept, out, new, columns, allow_nonfinite, keys=sorted(head.series))
            families = {}
            for family, fstate in head.families.items():
                gens = {}
                for gen, state in fstate.generations.items():
                    seg_rows = _rows_for(family, gen, state.spec, new, rows)
                    start, count = read_row_map(self.nodes, state, len(cat.names), head.arrays)
                    seg = new_segment(out, family, gen, state.spec, state.shards, seg_rows)
                    segments = state.segments + ((seg,) if seg is not None else ())
                    base = sum(s.rows for s in state.segments)
                    items = np.asarray(seg_rows.items, dtype=np.int64)
                    new_start = base + np.concatenate([[0], np.cumsum(items)[:-1]]).astype(np.int64)
                    row_start = np.concatenate([start[keep], new_start])
                    row_count = np.concatenate([count[keep], items])
                    gens[gen] = _generation(
                        state, segments, write_layout(out, family, gen, row_start, row_count), int(row_count.sum())
                    )
                families[family] = FamilyState(fstate.current_generation, gens)
            cat_path, tasks_path = self._write_catalog(out, grown)
            changes = [Change("append", {"episodes": [e.name for e in new if e.name not in gone]})]
            if replaced:
                changes.append(Change("replace", {"episodes": sorted(gone)}))
            return changes, {
                "next_episode_id": head.next_episode_id + len(new),
                "catalog": CatalogRef(cat_path, len(grown.names), int(grown.steps.sum()), tasks_path, len(grown.tasks)),
                "series": series,
                "families": families,
            }

        return self._commit(apply)

    def _write_catalog(self, out: ArrayWriter, data: CatalogData) -> tuple[str, str]:
        paths = write_catalog(out, data)
        self._written_catalog, self._written_path = data, paths[0]  # adopted without reading it back
        return paths

    def _difference(
        self, head: Snapshot, cat: CatalogData, e: int, episode: EpisodeData, physical: dict[str, np.ndarray]
    ) -> str | None:
        """What differs between stored episode ``e`` and ``episode`` (None: identical)."""
        steps = episode.step_count()
        if int(cat.steps[e]) != steps:
            return f"{int(cat.steps[e])} steps stored, {steps} given"
        if set(episode.series) != set(head.series):
            return f"series {sorted(episode.series)} given, {sorted(head.series)} stored"
        lo = int(cat.step_start[e])
        for key in sorted(head.series):
            if key not in physical:
                physical[key] = self._physical_series(head, key)
            stored = physical[key][lo : lo + steps]
            given = np.asarray(episode.series[key]).reshape(steps, -1)
            if stored.shape != given.shape or not np.array_equal(stored, given.astype(stored.dtype), equal_nan=True):
                return f"series {key!r} differs"
        t = int(cat.task[e])
        if (cat.tasks[t] if t >= 0 else None) != episode.task:
            return "task differs"
        fps = float(cat.fps[e])
        if (None if np.isnan(fps) else fps) != (None if episode.fps is None else float(episode.fps)):
            return "fps differs"
        if cat.attrs[e] != attrs_json(episode.attrs, episode.name):
            return "attrs differ"
        return None

    def remove_episodes(self, names: Sequence[str]) -> Snapshot | None:
        """Remove episodes in one commit (format 2): new readers no longer see them; their steps and rows stay
        on disk, unreachable, until ``gc``. Names not in the store raise KeyError (nothing is removed)."""
        names = list(names)

        def apply(head: Snapshot, cat: CatalogData, out: ArrayWriter) -> Any:
            present = set(cat.names)
            missing = [n for n in names if n not in present]
            if missing:
                raise KeyError(
                    f"{self.location} has no episode {missing[0]!r} ({len(missing)} of the names given "
                    "are not there); nothing removed"
                )
            gone = set(names)
            if not gone:
                return None
            keep = np.asarray([n not in gone for n in cat.names], dtype=bool)
            kept = cat.take(keep)
            families = {}
            for family, fstate in head.families.items():
                gens = {}
                for gen, state in fstate.generations.items():
                    start, count = read_row_map(self.nodes, state, len(cat.names), head.arrays)
                    gens[gen] = _generation(
                        state,
                        state.segments,
                        write_layout(out, family, gen, start[keep], count[keep]),
                        int(count[keep].sum()),
                    )
                families[family] = FamilyState(fstate.current_generation, gens)
            cat_path, tasks_path = self._write_catalog(out, kept)
            return [Change("remove", {"episodes": sorted(gone)})], {
                "catalog": CatalogRef(cat_path, len(kept.names), int(kept.steps.sum()), tasks_path, len(kept.tasks)),
                "families": families,
            }

        return self._commit(apply)

    def _add_family_v2(
        self,
        head: Snapshot,
        cat: CatalogData,
        out: ArrayWriter,
        family: str,
        spec: FamilySpec,
        items_per_episode: Any,
        lengths: Any,
        producer: Producer,
        keys: Any,
    ) -> Any:
        if family in head.families:
            raise CommitConflictError(f"family {family!r} was added by another writer meanwhile; reopen the store")
        catalog = cat.catalog()
        if items_per_episode is None:
            if spec.vlm_reuse_count is None:
                raise FormatError("give items_per_episode, or a spec with vlm_reuse_count to derive it")
            items = vlm_items(catalog.steps, spec.vlm_reuse_count)
        else:
            items = np.asarray(items_per_episode, dtype=np.int64)
            if items.shape != (len(catalog),):
                raise FormatError(f"items_per_episode has {items.size} entries; the store has {len(catalog)} episodes")
        state = _plan_v2(out, family, 1, spec, producer, items, lengths, keys)
        families = {**head.families, family: FamilyState(1, {1: state})}
        return [Change("add_family", {"family": family, "generation": 1})], {"families": families}

    def _new_generation_v2(
        self,
        head: Snapshot,
        cat: CatalogData,
        out: ArrayWriter,
        family: str,
        gen: int,
        counts: np.ndarray,
        lengths: Any,
        producer: Producer,
        keys: Any,
    ) -> Any:
        fstate = head.families[family]
        if gen in fstate.generations or len(cat.names) != len(counts):
            raise CommitConflictError(
                f"family {family!r} changed meanwhile (another writer); reopen the store and plan the generation again"
            )
        spec = fstate.generations[fstate.current_generation].spec
        state = _plan_v2(out, family, gen, spec, producer, counts, lengths, keys)
        families = {**head.families, family: FamilyState(fstate.current_generation, {**fstate.generations, gen: state})}
        return [Change("new_generation", {"family": family, "generation": gen})], {"families": families}

    def _switch_v2(self, head: Snapshot, family: str, generation: int, dropped: set[int]) -> Any:
        fstate = head.families[family]
        if generation not in fstate.generations:
            raise KeyError(f"family {family!r} has no generation {generation}")
        gens = {g: s for g, s in fstate.generations.items() if g not in dropped or g == generation}
        return [Change("switch_generation", {"family": family, "generation": generation})], {
            "families": {**head.families, family: FamilyState(generation, gens)}
        }

    # -------------------------------------------------------------- compact

    def compact(self, features: bool = True, merge_small: bool = True) -> Snapshot | None:
        """Compact the snapshot's data in one commit; returns None when nothing needed it.

        * Series with more than one segment are rewritten as one segment of the catalog's episodes (series
          are small robot states): steps of removed episodes become unreferenced.
        * With ``features``, every family generation's shards that hold rows no catalog episode reaches
          (removed or replaced episodes) are rewritten into one new array, and with ``merge_small`` also runs
          of small segments (each a partial shard, as many appends leave them). Shards holding none of
          those stay where they are: the new commit uses them as parts of their old arrays. Rows keep their
          bytes; missing rows stay missing. A writer still filling an old snapshot's rows meanwhile may see
          them missing in the new commit (they are written again).

        ``gc`` then deletes what no kept commit uses, so the space of removed rows comes back.
        """

        def apply(head: Snapshot, cat: CatalogData, out: ArrayWriter) -> Any:
            changes: list[Change] = []
            fields: dict[str, Any] = {}
            if any(len(state.segments) > 1 for state in head.series.values()):
                changes.append(self._compact_series(head, cat, out, fields))
            if features:
                families, compacted = self._compact_families(head, out, merge_small)
                if compacted:
                    fields["families"] = families
                    changes.append(Change("compact", {"families": compacted}))
            return (changes, fields) if changes else None

        return self._commit(apply)

    def _compact_series(self, head: Snapshot, cat: CatalogData, out: ArrayWriter, fields: dict[str, Any]) -> Change:
        offsets = np.concatenate([[0], np.cumsum(cat.steps)]).astype(np.int64)
        index = np.repeat(cat.step_start - offsets[:-1], cat.steps) + np.arange(int(offsets[-1]), dtype=np.int64)
        series = {}
        for key, state in head.series.items():
            path = f"{SERIES_SEGMENTS}/{key}/{out.oid('s')}"
            values = self._physical_series(head, key)[index]
            out.small(path, values)
            series[key] = SeriesState(state.columns, state.dtype, (SeriesSegment(path, len(values)),))
        moved = CatalogData(cat.names, cat.episode_id, cat.steps, offsets[:-1], cat.fps, cat.task, cat.attrs, cat.tasks)
        cat_path, tasks_path = self._write_catalog(out, moved)
        fields["series"] = series
        fields["catalog"] = CatalogRef(cat_path, len(moved.names), int(moved.steps.sum()), tasks_path, len(moved.tasks))
        return Change("compact", {"series": sorted(series)})

    def _compact_families(
        self, head: Snapshot, out: ArrayWriter, merge_small: bool
    ) -> tuple[dict[str, FamilyState], list[str]]:
        families: dict[str, FamilyState] = {}
        compacted: list[str] = []
        for family, fstate in head.families.items():
            gens = dict(fstate.generations)
            for gen, state in fstate.generations.items():
                start, count = read_row_map(self.nodes, state, head.catalog.episodes, head.arrays)
                result = compact_generation(out, family, state, start, count, head.arrays, merge_small)
                if result is None:
                    continue
                segments, new_start = result
                layout = write_layout(out, family, gen, new_start, count)
                gens[gen] = _generation(state, segments, layout, int(count.sum()))
                compacted.append(f"{family}/{gen}")
            families[family] = FamilyState(fstate.current_generation, gens)
        return families, compacted

    # ------------------------------------------------------------- gc

    def gc(
        self, retention_s: float = 24 * 3600, keep: int = 1, dry_run: bool = False, compact: bool = False
    ) -> dict[str, Any]:
        """Delete commits older than ``retention_s`` (always keeping the newest ``keep``) and every object no
        kept commit uses (format 2).

        Commits go first, then objects, so a kill at any point leaves every kept commit whole. Objects
        written for commits newer than the head seen here (a committer in flight) are never touched.
        With ``compact``, the head is first compacted (:meth:`compact`: series made of many segments
        rewritten as one, feature shards holding rows of removed episodes and runs of small segments
        rewritten into a new array), so the shards it replaced are deleted once no kept commit uses them.
        Shard files of an array that kept commits use only in part are deleted one by one.

        Returns:
            ``{"commits": deleted, "objects": deleted, "bytes": freed, "kept": [commit numbers]}``.
        """
        self._require_writable()
        log_ = self._require_v2("gc")
        if compact and not dry_run:
            self.compact()
        numbers = log_.numbers()
        if not numbers:
            return {"commits": 0, "objects": 0, "bytes": 0, "kept": []}
        head = numbers[-1]
        now = _dt.datetime.now(_dt.UTC)
        kept = set(numbers[-max(1, keep) :])
        for number in numbers:
            try:
                snap = log_.read(number)
                age = (now - _dt.datetime.fromisoformat(snap.time)).total_seconds()
            except (FormatError, SnapshotNotFoundError, ValueError):
                continue
            if age <= retention_s:
                kept.add(number)
        first_kept = min(kept)
        kept = {n for n in numbers if n >= first_kept}  # a suffix: a reader can always move forward
        folders, parts = _kept_objects([log_.read(number) for number in sorted(kept)])
        doomed_commits = [n for n in numbers if n not in kept]
        doomed: list[tuple[str, int]] = []
        for prefix in ("catalog", "tasks", SERIES_SEGMENTS, "features", "stats"):
            for key, size in self.storage.list(prefix):
                if _collectable(key, folders, head, parts):
                    doomed.append((key, size))
        if not dry_run:
            for number in doomed_commits:
                self.storage.delete(log_key(number))
            for key, _size in doomed:
                self.storage.delete(key)
        return {
            "commits": len(doomed_commits),
            "objects": len(doomed),
            "bytes": sum(s for _, s in doomed),
            "kept": sorted(kept),
        }


class _Nothing(Exception):  # noqa: N818 - control flow: the change found nothing to do
    def __init__(self, head: Snapshot) -> None:
        super().__init__("nothing to commit")
        self.head = head


_OBJECT_PART = re.compile(r"^[cstl](\d{8,20})-[0-9a-f]{6}\Z")
_GEN_PART = re.compile(r"^gen-\d{4,7}\Z")


def _kept_objects(snapshots: Sequence[Snapshot]) -> tuple[set[str], dict[str, list[tuple[int, int]]]]:
    """The folders and arrays kept commits use, and for each values array the shards they use
    (``(first array shard, shards)`` per segment)."""
    folders: set[str] = set()
    parts: dict[str, list[tuple[int, int]]] = {}
    for snap in snapshots:
        folders |= set(_used_arrays(snap, {p: "" for p in snap.arrays}))
        folders |= snap.folders()
        for fstate in snap.families.values():
            for state in fstate.generations.values():
                for seg in state.segments:
                    parts.setdefault(seg.path, []).append((seg.offset, seg.shards))
    return folders, parts


def _unused_shard(key: str, array: str, parts: Mapping[str, list[tuple[int, int]]]) -> bool:
    """Whether ``key`` is a shard file of values array ``array`` that no kept segment uses (after a compaction
    kept commits may use only some shards of an array)."""
    used = parts.get(array)
    rest = key[len(array) + 1 :].split("/")
    if used is None or len(rest) < 2 or rest[0] != "c" or not rest[1].isdigit() or any(p != "0" for p in rest[2:]):
        return False
    shard = int(rest[1])
    return not any(first <= shard < first + count for first, count in used)


def _collectable(key: str, folders: set[str], head: int, used: Mapping[str, list[tuple[int, int]]]) -> bool:
    """Whether gc may delete ``key``: inside a format-2 object (or a generation folder) no kept commit uses,
    written for a commit no newer than ``head``, or a shard file of a kept array that no kept segment uses.
    Group metadata and anything else is left alone."""
    parts = key.split("/")
    for i in range(len(parts), 0, -1):  # the key's folders, innermost first: a set lookup each
        folder = "/".join(parts[:i])
        if folder in folders:
            return _unused_shard(key, folder, used)
    for i, part in enumerate(parts):
        match = _OBJECT_PART.match(part)
        if match:
            return int(match.group(1)) <= head and i < len(parts) - 1
    if len(parts) >= 4 and parts[0] == "features" and _GEN_PART.match(parts[2]):
        gen = "/".join(parts[:3])  # a dropped generation of format 1 (an upgraded store): none of it is used
        return not any(f.startswith(gen + "/") for f in folders)
    return False


def _used_arrays(snapshot: Snapshot, arrays: Mapping[str, str]) -> dict[str, str]:
    """The array checksums a snapshot needs: those under the folders it references."""
    folders = snapshot.folders()
    return {p: c for p, c in sorted(arrays.items()) if p in folders or any(p.startswith(f + "/") for f in folders)}


def _generation(state: GenerationState, segments: tuple[Any, ...], layout: str, rows: int) -> GenerationState:
    last = segments[-1] if segments else None
    capacity = last.first_shard * state.spec.rows_per_shard + last.capacity if last is not None else 0
    return dataclasses.replace(state, segments=tuple(segments), layout=layout, rows=rows, capacity=capacity)


def _plan_v2(
    out: ArrayWriter,
    family: str,
    gen: int,
    spec: FamilySpec,
    producer: Producer,
    items: np.ndarray,
    lengths: Any,
    keys: Any,
) -> GenerationState:
    """A new generation: one segment with the rows of every catalog episode, and its layout."""
    items = np.asarray(items, dtype=np.int64)
    if spec.ragged != (lengths is not None):
        raise FormatError(
            "a ragged family needs the length of every row at planning time"
            if spec.ragged
            else "lengths are only for ragged families (FamilySpec(ragged=True))"
        )
    if spec.has_keys != (keys is not None):
        raise FormatError(
            f"family {family!r}: spec.has_keys={spec.has_keys} but keys were "
            f"{'given' if keys is not None else 'not given'}"
        )
    FamilyLayout.plan(spec, items, lengths)  # the same checks as format 1 (lengths per row, shard fit)
    seg = new_segment(
        out,
        family,
        gen,
        spec,
        0,
        SegmentRows(items, None if lengths is None else np.asarray(lengths), None if keys is None else list(keys)),
    )
    row_start = np.concatenate([[0], np.cumsum(items)[:-1]]).astype(np.int64)
    layout = write_layout(out, family, gen, row_start, items)
    segments = (seg,) if seg is not None else ()
    state = GenerationState(gen, spec, producer, utc_now(), segments, layout, int(items.sum()), 0)
    return _generation(state, segments, layout, int(items.sum()))


def _rows_for(
    family: str, gen: int, spec: FamilySpec, new: Sequence[EpisodeData], rows: Mapping[str, Any] | None
) -> SegmentRows:
    given = (rows or {}).get(family)
    if isinstance(given, Mapping):
        given = given.get(gen)
    if given is not None:
        items = np.asarray(given.items, dtype=np.int64)
        if items.shape != (len(new),):
            raise FormatError(f"rows for family {family!r}: {items.size} counts for {len(new)} new episodes")
        return given  # type: ignore[no-any-return]
    if spec.vlm_reuse_count is None or spec.ragged or spec.has_keys:
        raise FormatError(
            f"family {family!r} needs the rows of the new episodes (it is ragged, has row keys, or has no "
            f"vlm_reuse_count): pass rows={{{family!r}: SegmentRows(items, lengths, keys)}}, or use the ingest "
            "command that plans them"
        )
    return SegmentRows(vlm_items(np.asarray([e.step_count() for e in new]), spec.vlm_reuse_count))


def _append_rows(
    head: Snapshot,
    cat: CatalogData,
    out: ArrayWriter,
    new: Sequence[EpisodeData],
    columns: Mapping[str, Sequence[str]] | None,
    allow_nonfinite: bool,
    keys: Sequence[str],
) -> tuple[CatalogData, dict[str, SeriesState], None]:
    """New series segments and catalog entries for ``new`` (appended after ``cat``)."""
    return _write_rows(_prepare_rows(head, cat, new, columns, allow_nonfinite, keys), out)


@dataclass
class _NewRows:
    """Episodes to append, every check passed, nothing written yet (see :func:`_prepare_rows`)."""

    head: Snapshot
    cat: CatalogData
    added: CatalogData
    stacked: dict[str, tuple[np.ndarray, SeriesInfo]]
    """Series key -> the new steps of every episode, stacked, and the series' columns and dtype."""


def _prepare_rows(
    head: Snapshot,
    cat: CatalogData,
    new: Sequence[EpisodeData],
    columns: Mapping[str, Sequence[str]] | None,
    allow_nonfinite: bool,
    keys: Sequence[str],
) -> _NewRows:
    """Check ``new`` and stack its series, writing nothing: a refused episode leaves no object behind."""
    steps = np.asarray([e.step_count() for e in new], dtype=np.int64)
    extra = sorted({k for e in new for k in e.series} - set(keys))
    if extra:
        raise FormatError(
            f"episode series {extra} are not in the store (it has {sorted(keys)}); every episode "
            "needs exactly the store's series"
        )
    base = 0
    stacked: dict[str, tuple[np.ndarray, SeriesInfo]] = {}
    for key in keys:
        old = head.series.get(key)
        cols = columns if columns is not None or old is None else {key: old.columns}
        data, info = _stack_series(new, key, cols, allow_nonfinite)
        if old is not None:
            if info.columns != old.columns:
                raise FormatError(
                    f"series {key!r}: columns {list(info.columns)} given, the store has {list(old.columns)}"
                )
            data, info = data.astype(old.dtype), SeriesInfo(old.columns, old.dtype)
            base = old.rows
        stacked[key] = (data, info)
    if not keys:  # no series: steps still get positions, past every earlier one
        base = int((cat.step_start + cat.steps).max()) if len(cat.names) else 0
    tasks = list(cat.tasks)
    index = {t: i for i, t in enumerate(tasks)}
    task_ids = []
    for e in new:
        if e.task is None:
            task_ids.append(-1)
            continue
        if not isinstance(e.task, str):
            raise FormatError(f"episode {e.name!r}: task must be a string")
        if e.task not in index:
            index[e.task] = len(tasks)
            tasks.append(e.task)
        task_ids.append(index[e.task])
    added = CatalogData(
        [e.name for e in new],
        head.next_episode_id + np.arange(len(new), dtype=np.int64),
        steps,
        base + np.cumsum(steps) - steps,  # each episode starts where the one before it ends
        np.asarray([fps_value(e.fps, e.name) for e in new], dtype=np.float64),
        np.asarray(task_ids, dtype=np.int64),
        [attrs_json(e.attrs, e.name) for e in new],
        tasks,
    )
    return _NewRows(head, cat, added, stacked)


def _write_rows(rows: _NewRows, out: ArrayWriter) -> tuple[CatalogData, dict[str, SeriesState], None]:
    """Write the series segments of checked episodes; returns the grown catalog and the series of the commit."""
    series: dict[str, SeriesState] = dict(rows.head.series)
    for key, (data, info) in rows.stacked.items():
        path = f"{SERIES_SEGMENTS}/{key}/{out.oid('s')}"
        out.small(path, data)
        old = rows.head.series.get(key)
        previous = old.segments if old is not None else ()
        series[key] = SeriesState(info.columns, info.dtype, (*previous, SeriesSegment(path, len(data))))
    return rows.cat.extend(rows.added), series, None


def _replace_families(manifest: Manifest, families: dict[str, FamilyEntry]) -> Manifest:
    return dataclasses.replace(manifest, families=families)
