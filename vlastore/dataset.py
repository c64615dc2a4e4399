"""The training reader: a PyTorch ``Dataset`` of ``(episode, step)`` samples.

Each sample holds the requested feature families at ``vlm_idx = step //
vlm_reuse_count``, a robot-state window of ``n_obs_steps`` past steps, an
action chunk of ``horizon`` steps (or any step/second offsets per key:
``delta_steps=``, ``delta_timestamps=``) and ``<key>_is_pad`` masks at episode
edges::

    ds = VLADataset("data.vla", features=["qwen_vl"], n_obs_steps=2, horizon=8)
    loader = ds.dataloader(batch_size=64, shuffle=True, num_workers=4, resumable=True)
    ds.stats["state"].mean, ds.stats["action"]["q99"]   # exact, over this dataset's episodes

Batches go through :meth:`VLADataset.__getitems__` (one gather per shard) and
:func:`collate`. docs/reading.md has the details.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import transport
from .format import TIMESTAMP_SERIES
from .loader import ResumableVLADataLoader, VLADataLoader
from .read.sources import register_verifier
from .reader import FeatureReader, MissingRowError, to_tensor
from .sampler import ResumableDataLoader, ResumableSampler
from .stats import DEFAULT_QUANTILES, SeriesStats, summarize
from .store import VLAStore
from .windows import (
    DEFAULT_TOLERANCE_S,
    EdgePadding,
    WindowPlan,
    action_deltas,
    feature_rows,
    obs_deltas,
    sample_table,
    split_episodes,
)

__all__ = ["VLADataset", "Batch", "BatchedSamples", "collate", "FingerprintMismatchError", "MissingFeaturesError"]

log = logging.getLogger(__name__)

ON_MISSING = ("raise", "skip")


class FingerprintMismatchError(ValueError):
    """The current generation of a family was produced by other weights than expected."""


class MissingFeaturesError(MissingRowError):
    """Rows the dataset needs have not been written."""


class Batch(dict):
    """A collated batch: ``{key: tensor or list}``, a plain dict.

    Only its way out of a DataLoader worker differs: it is registered with
    :mod:`vlastore.transport`, so a worker copies its tensors into a
    shared-memory slot and the training process copies them out with one
    memcpy, where PyTorch would make one shared-memory segment per tensor
    (measured here: ~2.4 ms for a 300 KB batch) and plain pickling costs a
    pickle, a pipe transfer and an unpickle (~0.75 ms). ``copy``, ``pickle``
    and ``torch.save`` see a plain dict.
    """

    _arrays: dict[str, tuple[torch.Tensor, np.ndarray, bool]] | None = None
    """``{key: (tensor as made, its numpy array, bfloat16?)}``: lets the transport skip torch's attribute calls."""

    @classmethod
    def of_arrays(
        cls, arrays: Mapping[str, np.ndarray], bfloat16: Sequence[str] = (), episode_names: list[str] | None = None
    ) -> Batch:
        """A batch of tensors sharing memory with ``arrays`` (``bfloat16`` keys: uint16 bits viewed as such)."""
        batch = cls()
        made: dict[str, tuple[torch.Tensor, np.ndarray, bool]] = {}
        from_numpy = torch.from_numpy
        for key, array in arrays.items():
            if not array.flags.writeable:  # decompressed or fetched bytes: torch wants writable memory
                array = array.copy()
            tensor = from_numpy(array)
            is_bf16 = key in bfloat16
            if is_bf16:
                tensor = tensor.view(torch.bfloat16)
            batch[key] = tensor
            made[key] = (tensor, array, is_bf16)
            if key == "index" and episode_names is not None:
                batch["episode"] = episode_names
        batch._arrays = made
        return batch

    def transport_arrays(self) -> dict[str, tuple[np.ndarray, bool]]:
        """``{key: (numpy array, bfloat16?)}`` of the tensors still as :meth:`of_arrays` made them."""
        made = self._arrays
        if not made:
            return {}
        return {key: (array, is_bf16) for key, (tensor, array, is_bf16) in made.items() if self.get(key) is tensor}

    def __getstate__(self) -> None:  # pickle and copy carry the items only
        return None


transport.register(Batch)


class BatchedSamples(Sequence):
    """What :meth:`VLADataset.__getitems__` returns: the batch, already stacked.

    :func:`collate` returns :attr:`batch` as it is. Any other collate function
    sees a sequence of per-sample dicts (views into the batch, made on demand),
    each with its ``episode`` name as :meth:`VLADataset.__getitem__` gives it.
    """

    def __init__(self, batch: Batch, ragged: Sequence[str], names: Sequence[str] | np.ndarray | None = None) -> None:
        self.batch = batch
        self.ragged = tuple(ragged)
        self.names = names

    def __len__(self) -> int:
        return len(self.batch["index"])

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        sample: dict[str, Any] = {}
        for key, value in self.batch.items():
            if key.endswith("_is_pad") and key[: -len("_is_pad")] in self.ragged:
                continue
            if key in self.ragged:
                value = value[i, : int(self.batch[f"{key}_length"][i])]
            elif isinstance(value, torch.Tensor):
                value = value[i] if value.ndim > 1 else value[i].item()
            else:
                value = value[i]
            sample[key] = value
            if key == "index" and "episode" not in self.batch and self.names is not None:
                sample["episode"] = self.names[int(self.batch["episode_index"][i])]
        return sample


def collate(samples: BatchedSamples | Sequence[Mapping[str, Any]]) -> Batch:
    """Collate for :class:`VLADataset`: pass a prebatched batch through, or stack samples.

    Ragged features (a sample carries ``<key>_length``) are zero-padded to the
    longest in the batch with a ``<key>_is_pad`` mask ``[B, L_max]``.
    """
    if isinstance(samples, BatchedSamples):
        return samples.batch
    if not samples:
        raise ValueError("collate got an empty batch")
    first = samples[0]
    out = Batch()
    for key in first:
        values = [s[key] for s in samples]
        if f"{key}_length" in first:
            lengths = [len(v) for v in values]
            padded = values[0].new_zeros((len(values), max(lengths), *values[0].shape[1:]))
            is_pad = torch.ones((len(values), max(lengths)), dtype=torch.bool)
            for i, v in enumerate(values):
                padded[i, : len(v)] = v
                is_pad[i, : len(v)] = False
            out[key] = padded
            out[f"{key}_is_pad"] = is_pad
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = list(values)
    return out


def _per_family(value: Any, families: Sequence[str], what: str) -> dict[str, Any]:
    if value is None or not isinstance(value, Mapping):
        return {f: value for f in families}
    unknown = set(value) - set(families)
    if unknown:
        raise ValueError(f"{what} names families {sorted(unknown)} that are not read; features={list(families)}")
    return {f: value.get(f) for f in families}


_CATALOG_STATE = (
    "episode_ids",
    "_plan",
    "_padding",
    "_series",
    "_names",
    "_task_index",
    "_task_texts",
    "_table",
    "_readers",
)


class VLADataset(Dataset):
    """One sample per ``(episode, step)`` of a vlastore store.

    Args:
        store: a path/URL, a zarr ``Store`` or an open :class:`VLAStore`.
        features: feature families to read (default: every family with a
            ``vlm_reuse_count``).
        obs_keys: robot series read as a window of ``n_obs_steps`` past steps.
        action_keys: robot series read as a chunk of ``horizon`` steps from ``step``.
        n_obs_steps: length of the observation window (ends at ``step``).
        horizon: length of the action chunk (starts at ``step``).
        delta_steps: ``{key: step offsets}`` read around ``step`` (any ints,
            e.g. ``[-4, -2, 0]``), overriding the short form for that key; a
            key not in ``obs_keys``/``action_keys`` is read too.
        delta_timestamps: ``{key: offsets in seconds}`` as LeRobot's, through
            ``timestamps`` when given, else ``fps``; with neither, through the fps
            every episode has recorded (``ingest --fps``, LeRobot import), else the
            store's ``timestamp`` series.
        fps: frame rate of every episode, or one per catalog episode (default:
            the recorded ones).
        timestamps: per-step times in seconds: the name of a one-column
            series, or an array ``[total_steps]``.
        tolerance_s: how far a delta may be from a multiple of ``1/fps`` (or a
            step's time from the time asked for), as LeRobot's.
        vlm_reuse_count: override of the families' manifest value: an int for
            all, or ``{family: int}``.
        episodes: episode names or positions to use (default: all).
        on_missing: ``"raise"`` (default) when a needed feature row is not
            written, or ``"skip"`` to drop those samples.
        expect_fingerprint: refuse features whose producer fingerprint differs:
            one string for all families, or ``{family: fingerprint}``.
        series_in_ram: hold the robot series in memory (they are small); else
            read them from the store per batch.
        verify: crc32c checking of feature rows: ``"always"``, ``"once"``
            (per chunk and process, the default) or ``"never"``.
        batch_episode_names: batches also carry ``episode``, the list of
            episode names: a Python list per batch, so off by default
            (``ds.episode_name(batch["episode_index"][i])`` names one on
            demand). Single samples always carry it.
        batch_task: batches (and samples) also carry ``task_index`` (int64, -1: none) and ``task`` (a list
            of texts, None where none) from the store's episode metadata (format 2; format 1 has none).
        storage_options: for an ``s3://`` store: endpoint, credentials, ...
            (``vlastore.storage.STORAGE_OPTIONS``) and the node cache options.
        cache_dir: for an ``s3://`` store: a node-local folder where whole
            shards are downloaded once per node and then memory-mapped (also
            ``VLASTORE_CACHE``; size limit ``cache_max_bytes`` in
            ``storage_options`` or ``VLASTORE_CACHE_BYTES``). Without one, rows
            are read with ranged requests. See docs/remote.md.

    Raises:
        KeyError: unknown family, series or episode.
        MissingFeaturesError: rows needed are missing and ``on_missing="raise"``.
        FingerprintMismatchError: a family was produced by other weights.
    """

    def __init__(
        self,
        store: VLAStore | str | os.PathLike[str] | Any,
        features: Sequence[str] | None = None,
        obs_keys: Sequence[str] = ("state",),
        action_keys: Sequence[str] = ("action",),
        n_obs_steps: int = 2,
        horizon: int = 8,
        vlm_reuse_count: int | Mapping[str, int] | None = None,
        episodes: Sequence[str | int] | None = None,
        on_missing: str = "raise",
        expect_fingerprint: str | Mapping[str, str] | None = None,
        series_in_ram: bool = True,
        verify: str = "once",
        delta_steps: Mapping[str, Sequence[int]] | None = None,
        delta_timestamps: Mapping[str, Sequence[float]] | None = None,
        fps: float | Sequence[float] | None = None,
        timestamps: str | np.ndarray | None = None,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        batch_episode_names: bool = False,
        batch_task: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.store = store if isinstance(store, VLAStore) else _open_store(store, storage_options, cache_dir)
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing={on_missing!r}: use one of {ON_MISSING}")
        if features is None:
            features = [f for f in self.store.families if self.store.spec(f).vlm_reuse_count is not None]
        self.features = tuple(features)
        for family in self.features:
            self.store.generation(family)  # KeyError naming the families there are
        self.obs_keys = tuple(obs_keys)
        self.action_keys = tuple(action_keys)
        clash = set(self.obs_keys) & set(self.action_keys)
        if clash:
            raise ValueError(f"series {sorted(clash)} are both obs_keys and action_keys; a key can be only one")
        self.delta_steps = {k: list(v) for k, v in (delta_steps or {}).items()}
        self.delta_timestamps = {k: list(v) for k, v in (delta_timestamps or {}).items()}
        self.window_keys = tuple(
            dict.fromkeys([*self.obs_keys, *self.action_keys, *self.delta_steps, *self.delta_timestamps])
        )
        for key in self.window_keys:
            if key not in self.store.manifest.series:
                raise KeyError(
                    f"unknown series {key!r}; the store has {list(self.store.series_keys)} "
                    "(set obs_keys=/action_keys=/delta_steps= to the ones you need, or () for none)"
                )
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        self.fps = fps
        self.timestamps = timestamps
        self.tolerance_s = tolerance_s
        self.on_missing = on_missing
        self.series_in_ram = series_in_ram
        self.verify = verify
        self.batch_episode_names = bool(batch_episode_names)
        self.batch_task = bool(batch_task)
        self._reuse_override = _per_family(vlm_reuse_count, self.features, "vlm_reuse_count")
        self.expect_fingerprint = _per_family(expect_fingerprint, self.features, "expect_fingerprint")
        catalog = self.store.catalog
        # episodes asked for by name: a refresh onto a newer snapshot (format 2) finds them again by name
        self._episodes_arg = None if episodes is None else [catalog.names[catalog.resolve(e)] for e in episodes]
        self._stats: dict[tuple[str, tuple[float, ...], str], SeriesStats] = {}
        n_candidates = self._build_catalog_state()
        # Shared with DataLoader workers (shared memory survives fork and spawn), so refresh() in the
        # main process reaches persistent workers: [counter, snapshot, generation of each family].
        self._sync = torch.zeros(2 + len(self.features), dtype=torch.int64).share_memory_()
        self._sync[1] = self.store.snapshot_id
        self._keep = torch.ones(n_candidates, dtype=torch.bool).share_memory_()
        self._sync_np = self._sync.numpy()  # the same memory; reading it costs ~100x less than a tensor index
        self._seen = -1
        self._readers: dict[str, FeatureReader] = {}
        self._refresh_local(None, check=True)
        self._seen = int(self._sync[0])

    def _build_catalog_state(self) -> int:
        """Everything that follows the store's catalog: episodes, window plan, series in RAM, names.

        Returns the number of candidate samples.
        """
        catalog = self.store.catalog
        if self._episodes_arg is None:
            chosen: Sequence[int] = range(len(catalog))
        else:  # episodes removed since are dropped
            chosen = [catalog.index(n) for n in self._episodes_arg if n in catalog]
        self.episode_ids = np.asarray(list(chosen), dtype=np.int64)
        n_candidates = int(np.asarray(catalog.steps)[self.episode_ids].sum())
        self._plan = self._window_plan(self.n_obs_steps, self.horizon)
        self._stats.clear()
        # Series in RAM are laid out with copies of each episode's edge steps around it (EdgePadding), as
        # far as the windows reach: a batch's windows are then one add and one gather per key, no clamping.
        self._padding: EdgePadding | None = None
        if self.series_in_ram and self.window_keys:
            self._padding = EdgePadding.build(catalog.step_offsets, *self._plan.reach(self.episode_ids))
        self._series: dict[str, Any] = {}
        for key in self.window_keys:
            if self._padding is not None:
                self._series[key] = self._padding.pad(self.store.series_all(key))
            else:
                self._series[key] = self.store.series_array(key)
        self._names = np.asarray(catalog.names, dtype=object)
        self._task_index = np.asarray(self.store.episode_tasks(), dtype=np.int64)
        self._task_texts = np.asarray([*self.store.tasks, None], dtype=object)  # index -1 (no task): None
        return n_candidates

    def _window_plan(self, n_obs_steps: int, horizon: int) -> WindowPlan:
        steps: dict[str, Any] = {}
        for key in self.window_keys:
            if key in self.delta_timestamps:
                continue
            if key in self.delta_steps:
                steps[key] = self.delta_steps[key]
            elif key in self.obs_keys:
                steps[key] = obs_deltas(n_obs_steps)
            elif key in self.action_keys:
                steps[key] = action_deltas(horizon)
        times = None
        fps, timestamps = self.fps, self.timestamps
        if self.delta_timestamps and fps is None and timestamps is None:
            fps, timestamps = self._stored_time_base()
        if timestamps is not None and self.delta_timestamps:
            times = self._timestamps_array(timestamps)
        if fps is not None and not np.isscalar(fps) and len(fps) != len(self.store.catalog):  # type: ignore[arg-type]
            raise ValueError(
                f"fps has {len(fps)} values but the store has {len(self.store.catalog)} "  # type: ignore[arg-type]
                "episodes; give one fps, or one per catalog episode"
            )
        plan = WindowPlan.build(
            steps,
            self.delta_timestamps,
            fps=fps,
            timestamps=times,
            tolerance_s=self.tolerance_s,
            episodes=self.episode_ids,
        )
        episodes, candidate_steps = self._candidates()
        plan.check_grid(self.store.catalog.step_offsets, episodes, candidate_steps, self.store.catalog.names)
        return plan

    def _stored_time_base(self) -> tuple[Sequence[float] | None, str | None]:
        """What the store knows of time, for ``delta_timestamps`` given without ``fps``/``timestamps``.

        Every episode's recorded fps (format 2 keeps it from ingest) comes first, as LeRobot
        turns seconds into steps by fps; else the per-step ``timestamp`` series (ingest keeps a
        ``timestamp`` column, LeRobot import its ``timestamp`` feature); else neither, and the
        window plan says what to give.
        """
        recorded = self.store.episode_fps()
        if len(recorded) and np.isfinite(recorded).all() and (recorded > 0).all():
            return recorded.tolist(), None
        if TIMESTAMP_SERIES in self.store.manifest.series:
            return None, TIMESTAMP_SERIES
        return None, None

    def _timestamps_array(self, timestamps: str | np.ndarray) -> np.ndarray:
        total = self.store.catalog.total_steps
        if isinstance(timestamps, str):
            values = np.asarray(self.store.series_all(timestamps))
            if values.ndim == 2 and values.shape[1] != 1:
                raise ValueError(f"timestamps={timestamps!r} has {values.shape[1]} columns; name a one-column series")
            values = values.reshape(-1)
        else:
            values = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if len(values) != total:
            raise ValueError(f"timestamps has {len(values)} values but the store has {total} steps; give one per step")
        return values.astype(np.float64)

    # ------------------------------------------------------------ generations

    def _reuse(self, family: str) -> int:
        reuse = self._reuse_override[family] or self.store.spec(family).vlm_reuse_count
        if reuse is None:
            raise ValueError(
                f"family {family!r} has no vlm_reuse_count in its manifest; pass vlm_reuse_count={{{family!r}: n}}"
            )
        return int(reuse)

    def _candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """``(episode, step)`` of every step of the dataset's episodes (made when needed, not kept)."""
        return sample_table(self.store.catalog.steps, self.episode_ids)

    def _refresh_local(self, generations: Mapping[str, int] | None, check: bool) -> dict[str, tuple[int, int]]:
        """Open readers on ``generations`` (default: current), check them, recompute which samples exist.

        Builds :attr:`_table`, one row per sample: its index, episode, step, each family's
        ``vlm_idx``, each family's feature row, and its position on the padded series axis. A
        batch reads all of them with one gather.
        """
        readers: dict[str, FeatureReader] = {}
        episodes, steps = self._candidates()
        keep = np.ones(len(episodes), dtype=bool)
        n_families = len(self.features)
        table = np.empty((len(episodes), 3 + 2 * n_families + 1), dtype=np.int64)
        table[:, 1] = episodes
        table[:, 2] = steps
        if self._padding is not None:  # each sample's own step on the padded series axis
            np.add(self._padding.starts[episodes], steps, out=table[:, -1])
        else:
            table[:, -1] = 0
        for i, family in enumerate(self.features):
            gen = None if generations is None else generations[family]
            reader = FeatureReader(self.store, family, gen, verify=self.verify)
            rows, vlm_idx = feature_rows(reader.layout.episode_rows, episodes, steps, self._reuse(family))
            table[:, 3 + i] = vlm_idx
            table[:, 3 + n_families + i] = rows
            if check:
                self._check_fingerprint(reader)
                present = self.store.coverage(family, reader.generation)
                fingerprint = reader.info.producer.fingerprint
                log.info(
                    "features %s: %s/%s rows present (generation %d, fingerprint %s)",
                    family,
                    f"{int(present.sum()):,}",
                    f"{len(present):,}",
                    reader.generation,
                    (fingerprint[:8] + "...") if len(fingerprint) > 8 else (fingerprint or "unknown"),
                )
                keep &= self._check_missing(reader, present, rows)
            readers[family] = reader
        self._readers = readers
        if check:
            self._keep.copy_(torch.from_numpy(keep))
        kept = self._keep.numpy()
        self._table = table if kept.all() else table[kept]
        self._table[:, 0] = np.arange(len(self._table))  # a negative index gathers its sample's true position
        return {f: (r.generation, r.layout.rows) for f, r in readers.items()}

    def _check_fingerprint(self, reader: FeatureReader) -> None:
        expected = self.expect_fingerprint[reader.family]
        found = reader.info.producer.fingerprint
        if expected is not None and found != expected:
            producer = reader.info.producer
            raise FingerprintMismatchError(
                f"family {reader.family!r} generation {reader.generation} in {self.store.location} was produced "
                f"by {producer.model or 'an unknown model'} with fingerprint {found or '(none)'!r}, but "
                f"expect_fingerprint={expected!r}; rebuild the features with the weights you train with, "
                "or pass the fingerprint they have"
            )

    def _check_missing(self, reader: FeatureReader, present: np.ndarray, rows: np.ndarray) -> np.ndarray:
        ok = present[rows]
        if ok.all():
            return ok
        missing_rows = np.unique(rows[~ok])
        examples = ", ".join(reader.describe(int(r)) for r in missing_rows[:5])
        more = f" (and {len(missing_rows) - 5} more)" if len(missing_rows) > 5 else ""
        if self.on_missing == "raise":
            raise MissingFeaturesError(
                f"family {reader.family!r} generation {reader.generation}: {len(missing_rows):,} rows this dataset "
                f"needs are not written: {examples}{more}; finish writing them, or pass on_missing='skip' to "
                f"leave out the {int((~ok).sum()):,} samples that need them"
            )
        log.warning(
            "features %s: skipping %s samples whose rows are missing, e.g. %s",
            reader.family,
            f"{int((~ok).sum()):,}",
            examples,
        )
        return ok

    def refresh(self, expect_fingerprint: str | Mapping[str, str] | None = None) -> dict[str, tuple[int, int]]:
        """Switch to the families' current generations (call between epochs).

        Re-reads the manifest, checks fingerprints (``expect_fingerprint``
        replaces the one given at construction when not None) and coverage,
        and reopens the readers. DataLoader workers, persistent ones included,
        follow on their next batch. Readers (and tensors) from the old
        generation keep working while their shards are mapped.

        Returns:
            ``{family: (generation, rows)}`` now in use.

        Raises:
            FingerprintMismatchError, MissingFeaturesError: nothing is switched.
        """
        if expect_fingerprint is not None:
            self.expect_fingerprint = _per_family(expect_fingerprint, self.features, "expect_fingerprint")
        old_snapshot = self.store.snapshot_id
        saved = {k: getattr(self, k) for k in _CATALOG_STATE}
        old_keep, keep_before = self._keep, self._keep.clone()
        self.store.reload()
        try:
            if self.store.snapshot_id != old_snapshot:  # format 2: episodes may have been added or removed
                n_candidates = self._build_catalog_state()
                if n_candidates != len(old_keep):
                    self._keep = torch.ones(n_candidates, dtype=torch.bool).share_memory_()
            result = self._refresh_local(None, check=True)
        except Exception:  # nothing switched: the old state, snapshot and mask
            for k, v in saved.items():
                setattr(self, k, v)
            self._keep = old_keep
            old_keep.copy_(keep_before)
            self.store.reload(old_snapshot or None)
            raise
        for i, family in enumerate(self.features):
            self._sync[2 + i] = self._readers[family].generation
        self._sync[1] = self.store.snapshot_id
        self._sync[0] += 1
        self._seen = int(self._sync[0])
        if len(self._table) != len(saved["_table"]):
            log.info(
                "refresh changed the number of samples from %d to %d (new or removed episodes, or rows); "
                "samplers that take len(dataset) per epoch follow",
                len(saved["_table"]),
                len(self._table),
            )
        return result

    reload = refresh

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_sync_np"]  # rebuilt over the (shared) tensor on arrival
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sync_np = self._sync.numpy()

    def _follow(self) -> None:
        """In a worker: adopt the snapshot and generations the main process switched to in refresh()."""
        seen = int(self._sync_np[0])
        if seen == self._seen:
            return
        snapshot = int(self._sync_np[1])
        generations = {f: int(self._sync[2 + i]) for i, f in enumerate(self.features)}
        if snapshot != self.store.snapshot_id:
            self.store.reload(snapshot or None)
            n_candidates = self._build_catalog_state()
            if n_candidates != len(self._keep):  # the main process's new mask is not shared with this worker
                self._keep = torch.ones(n_candidates, dtype=torch.bool)
            self._refresh_local(generations, check=True)
        else:
            self.store.reload(snapshot or None)
            self._refresh_local(generations, check=False)
        self._seen = seen

    @property
    def generations(self) -> dict[str, int]:
        """Generation read for each family."""
        return {f: r.generation for f, r in self._readers.items()}

    # ---------------------------------------------------------------- samples

    def __len__(self) -> int:
        return len(self._table)

    def _pick(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[K, B]`` int64: the table rows of the samples (negative indices counted from the end).

        One gather for all per-sample numbers, turned so that each number is a contiguous
        row: a tensor (or a reader's row list) without a copy.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            idx = idx.reshape(-1)
        try:
            picked = self._table.take(idx, axis=0)
        except IndexError:
            raise IndexError(f"sample index out of range: the dataset has {len(self._table)} samples") from None
        return np.ascontiguousarray(picked.T)

    def _window_arrays(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """``{key: values [B, W, cols], key_is_pad: [B, W]}`` for the samples of ``ids`` (see :meth:`_pick`).

        Keys with the same offsets share one ``is_pad`` array.
        """
        out: dict[str, np.ndarray] = {}
        if not self.window_keys:
            return out
        episodes, steps = ids[1], ids[2]
        offsets = self.store.catalog.step_offsets
        if self._padding is not None:
            blocks = self._plan.padded_indices(self._padding, ids[-1], offsets, episodes, steps)
        else:
            blocks = self._plan.block_indices(offsets, episodes, steps)
        block_of = self._plan.block_of
        for key in self.window_keys:
            index, is_pad = blocks[block_of[key]]
            series = self._series[key]
            if self._padding is not None:
                out[key] = series.take(index, axis=0)
            else:
                flat, inverse = np.unique(index, return_inverse=True)
                out[key] = np.ascontiguousarray(np.asarray(series.oindex[flat, :])[inverse.reshape(index.shape)])
            out[f"{key}_is_pad"] = is_pad
        return out

    def episode_name(self, episode_index: int) -> str:
        """The name of the episode at ``episode_index`` (a batch's ``episode_index`` entries)."""
        return self.store.catalog.names[int(episode_index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: features (zero-copy views on local raw stores), windows, pad masks, ids."""
        self._follow()
        ids = self._pick([index])[:, 0].tolist()
        e, step = ids[1], ids[2]
        sample: dict[str, Any] = {"index": ids[0], "episode": self._names[e], "episode_index": e, "step": step}
        if self.batch_task:
            sample["task_index"] = int(self._task_index[e])
            sample["task"] = self._task_texts[self._task_index[e]]
        n_families = len(self.features)
        for i, (family, reader) in enumerate(self._readers.items()):
            value = to_tensor(reader.row(ids[3 + n_families + i]), reader.spec.dtype)
            sample[family] = value
            sample[f"{family}_{reader.spec.index_name}"] = ids[3 + i]
            if reader.spec.ragged:
                sample[f"{family}_length"] = len(value)
        for key, window in self._window_arrays(np.asarray(ids, dtype=np.int64)[:, None]).items():
            sample[key] = torch.from_numpy(window[0])
        return sample

    def __getitems__(self, indices: Sequence[int]) -> BatchedSamples:
        """A batch in one go: per-sample numbers in one gather, feature rows in one gather per family,
        the windows of every key in one fused numpy pass."""
        self._follow()
        ids = self._pick(indices)
        episodes, steps = ids[1], ids[2]
        arrays: dict[str, np.ndarray] = {"index": ids[0], "episode_index": episodes, "step": steps}
        names = self._names[episodes].tolist() if self.batch_episode_names else None
        bfloat16: list[str] = []
        ragged = []
        n_families = len(self.features)
        for i, (family, reader) in enumerate(self._readers.items()):
            rows = ids[3 + n_families + i]
            if reader.spec.ragged:
                values, lengths = reader.gather_padded(rows)
                arrays[family] = values
                arrays[f"{family}_length"] = lengths
                arrays[f"{family}_is_pad"] = np.arange(values.shape[1])[None, :] >= lengths[:, None]
                ragged.append(family)
            else:
                arrays[family] = reader.gather(rows)
            if reader.spec.dtype == "bfloat16":
                bfloat16.append(family)
            arrays[f"{family}_{reader.spec.index_name}"] = ids[3 + i]
        arrays.update(self._window_arrays(ids))
        if self.batch_task:
            arrays["task_index"] = self._task_index[episodes]
        batch = Batch.of_arrays(arrays, bfloat16, names)
        if self.batch_task:
            batch["task"] = self._task_texts[arrays["task_index"]].tolist()
        return BatchedSamples(batch, ragged, self._names)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    # ------------------------------------------------------- node cache (s3://)

    def prefetch(self, indices: Sequence[int] | np.ndarray, skip: set[tuple[str, int]] | None = None) -> int:
        """Start downloading the shards the samples ``indices`` read into the node cache, in the order they are
        first needed, in background threads of this process; returns how many shards were queued.

        Only for a store opened with a node cache (``cache_dir=``); otherwise nothing happens (0). Shards
        already cached, or being downloaded by another process of the node, are skipped, and so are the
        ``(family, shard)`` pairs in ``skip``, to which the ones queued now are added. ``dataloader()``
        calls it for the batches its sampler yields next.
        """
        prefetch = getattr(self.store.storage, "prefetch", None)
        if prefetch is None or not self._readers:
            return 0
        skip = set() if skip is None else skip
        if len(skip) >= sum(reader.layout.n_shards for reader in self._readers.values()):
            return 0  # every shard was queued already this epoch
        self._follow()
        ids = self._pick(indices)
        n_families = len(self.features)
        firsts: list[int] = []
        keys: list[str] = []
        for i, (family, reader) in enumerate(self._readers.items()):
            rows = ids[3 + n_families + i]
            rows = rows[(rows >= 0) & (rows < reader.layout.rows)]
            register_verifier(reader.handle)  # downloads made here are checked as the reader's are
            shards, first = np.unique(reader.layout.shard_of(rows), return_index=True)
            for shard, position in zip(shards.tolist(), first.tolist(), strict=True):
                if (family, shard) not in skip:
                    skip.add((family, shard))
                    firsts.append(position)
                    keys.append(reader.handle.shard_key(shard))
        if not keys:
            return 0
        queued = [keys[j] for j in np.argsort(np.asarray(firsts, dtype=np.int64), kind="stable").tolist()]
        prefetch(queued)
        return len(queued)

    # ----------------------------------------------------------------- subsets

    def _options(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "obs_keys": self.obs_keys,
            "action_keys": self.action_keys,
            "n_obs_steps": self.n_obs_steps,
            "horizon": self.horizon,
            "on_missing": self.on_missing,
            "vlm_reuse_count": dict(self._reuse_override),
            "series_in_ram": self.series_in_ram,
            "expect_fingerprint": dict(self.expect_fingerprint),
            "verify": self.verify,
            "delta_steps": self.delta_steps,
            "delta_timestamps": self.delta_timestamps,
            "fps": self.fps,
            "timestamps": self.timestamps,
            "tolerance_s": self.tolerance_s,
            "batch_task": self.batch_task,
        }

    def subset(self, episodes: Sequence[str | int]) -> VLADataset:
        """The same dataset restricted to ``episodes`` (names or positions)."""
        return VLADataset(self.store, episodes=episodes, **self._options())

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[VLADataset, VLADataset]:
        """Split by episode into ``(train, val)``: no episode appears in both."""
        train, val = split_episodes(len(self.episode_ids), val_fraction, seed)
        return self.subset(self.episode_ids[train].tolist()), self.subset(self.episode_ids[val].tolist())

    @property
    def episode_names(self) -> list[str]:
        return [self.store.catalog.names[e] for e in self.episode_ids.tolist()]

    # -------------------------------------------------------------- statistics

    @property
    def stats(self) -> Mapping[str, SeriesStats]:
        """Exact statistics of every robot series over this dataset's episodes: ``ds.stats["state"].mean``.

        Computed on first access per key (count, mean, std, min, max, q01,
        q99; see :mod:`vlastore.stats`) and kept. Other quantiles:
        :meth:`series_stats`.
        """
        return _StatsView(self)

    def series_stats(
        self, key: str, quantiles: Sequence[float] = DEFAULT_QUANTILES, method: str = "linear"
    ) -> SeriesStats:
        """Exact statistics of series ``key`` over this dataset's episodes (quantiles as ``np.quantile``'s)."""
        if key not in self.store.manifest.series:
            raise KeyError(f"unknown series {key!r}; the store has {list(self.store.series_keys)}")
        cache_key = (key, tuple(float(q) for q in quantiles), method)
        stored = self.store.snapshot is not None and self.store.snapshot.stats is not None
        if (
            cache_key not in self._stats
            and stored
            and np.array_equal(self.episode_ids, np.arange(len(self.store.catalog)))
        ):
            # every episode of the store: the statistics stored with its commit (format 2), else computed
            self._stats[cache_key] = self.store.stats(key, quantiles=tuple(quantiles), method=method)
        if cache_key not in self._stats:
            padding, padded = self._padding, self._series.get(key)
            # the series as stored is the padded copy less its copies
            values = self.store.series_all(key) if padding is None or padded is None else padded[~padding.is_pad]
            self._stats[cache_key] = summarize(
                values,
                self.store.catalog.step_offsets,
                self.episode_ids,
                quantiles,
                method,
                columns=self.store.columns(key),
            )
        return self._stats[cache_key]

    def dataloader(
        self, batch_size: int = 32, resumable: bool = False, torch_loader: bool = False, **kwargs: Any
    ) -> DataLoader:
        """A DataLoader with :func:`collate` (other arguments as ``torch.utils.data.DataLoader``'s).

        By default a :class:`~vlastore.loader.VLADataLoader`: a ``DataLoader``
        subclass whose workers hand batches over at a fraction of the cost
        (``torch_loader=True``: torch's own). ``resumable=True`` (or a
        :class:`~vlastore.sampler.ResumableSampler` as ``batch_sampler``)
        returns a resumable one (:class:`~vlastore.loader.ResumableVLADataLoader`,
        or :class:`~vlastore.sampler.ResumableDataLoader` with
        ``torch_loader=True``): the order depends only on ``seed`` (default 0)
        and the epoch, ``state_dict()`` / ``load_state_dict()`` resume mid-epoch
        sample-exactly, under torchrun too (``tail=`` says how the last step of
        an epoch is split over ranks).
        """
        kwargs.setdefault("collate_fn", collate)
        ahead = int(kwargs.pop("prefetch_batches", PREFETCH_BATCHES))
        cached = hasattr(self.store.storage, "prefetch")  # a node cache: prefetch what the sampler needs next
        if resumable or isinstance(kwargs.get("batch_sampler"), ResumableSampler):
            if "batch_sampler" not in kwargs:
                kwargs["batch_size"] = batch_size
            loader = (ResumableDataLoader if torch_loader else ResumableVLADataLoader)(self, **kwargs)
            if cached:
                loader.resumable_sampler.set_prefetch(partial(_prefetch_hint, self), ahead)
            return loader
        if cached and kwargs.get("batch_sampler") is not None:
            kwargs["batch_sampler"] = LookaheadBatchSampler(self, kwargs["batch_sampler"], ahead)
        elif cached:
            kwargs = _with_lookahead(self, batch_size, kwargs, ahead)
            batch_size = None  # type: ignore[assignment]  # the batch sampler makes the batches
        if batch_size is None or kwargs.get("batch_sampler") is not None:  # a batch sampler makes the batches
            return (DataLoader if torch_loader else VLADataLoader)(self, **kwargs)
        return (DataLoader if torch_loader else VLADataLoader)(self, batch_size=batch_size, **kwargs)

    def __repr__(self) -> str:
        gens = ", ".join(f"{f}@gen{g}" for f, g in self.generations.items())
        windows = ", ".join(f"{k} x{self._plan.deltas(k).shape[-1]}" for k in self.window_keys)
        return (
            f"VLADataset({self.store.location!r}: {len(self):,} samples from {len(self.episode_ids)} episodes, "
            f"features [{gens}], windows [{windows}])"
        )


class _StatsView(Mapping):
    """``ds.stats``: series key -> :class:`~vlastore.stats.SeriesStats`, computed on first access."""

    def __init__(self, dataset: VLADataset) -> None:
        self._dataset = dataset

    def __getitem__(self, key: str) -> SeriesStats:
        return self._dataset.series_stats(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._dataset.store.series_keys)

    def __len__(self) -> int:
        return len(self._dataset.store.series_keys)

    def __repr__(self) -> str:
        return f"<stats of {list(self)} over {len(self._dataset.episode_ids)} episodes>"


def _open_store(
    location: Any, storage_options: Mapping[str, Any] | None, cache_dir: str | os.PathLike[str] | None
) -> VLAStore:
    options = dict(storage_options or {})
    if cache_dir is not None:
        options["cache_dir"] = os.fspath(cache_dir)
    return VLAStore.open(location, storage_options=options or None)


PREFETCH_BATCHES = 16
"""Batches the node-cache prefetch looks ahead of the batch the DataLoader asks for."""


class LookaheadBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the batches of ``batch_sampler`` unchanged, reading ``ahead`` batches in advance and handing
    each to ``dataset.prefetch``: the shards the sampler needs next download while earlier batches train."""

    def __init__(self, dataset: VLADataset, batch_sampler: Any, ahead: int = PREFETCH_BATCHES) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.ahead = max(1, int(ahead))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        from collections import deque

        window: deque[list[int]] = deque()
        queued: set[tuple[str, int]] = set()  # shards handed to prefetch this epoch
        for batch in self.batch_sampler:
            window.append(batch)
            _prefetch_hint(self.dataset, batch, queued)
            if len(window) > self.ahead:
                yield window.popleft()
        yield from window


def _prefetch_hint(dataset: VLADataset, indices: Sequence[int] | np.ndarray, queued: set[tuple[str, int]]) -> None:
    """``dataset.prefetch(indices, queued)``, a hint: a failure is logged (the read of the batch reports it)."""
    try:
        dataset.prefetch(indices, queued)
    except Exception as exc:  # noqa: BLE001 - prefetch is a hint; the read of the batch reports errors
        log.warning("prefetch failed: %s", exc)


def _with_lookahead(dataset: VLADataset, batch_size: int, kwargs: dict[str, Any], ahead: int) -> dict[str, Any]:
    """DataLoader arguments with the batches made here, through a :class:`LookaheadBatchSampler`."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    kwargs = dict(kwargs)
    sampler = kwargs.pop("sampler", None)
    shuffle = kwargs.pop("shuffle", False)
    generator = kwargs.get("generator")
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    elif shuffle:
        raise ValueError("sampler= and shuffle=True: give one (as torch's DataLoader says)")
    batches = BatchSampler(sampler, batch_size, bool(kwargs.pop("drop_last", False)))
    kwargs["batch_sampler"] = LookaheadBatchSampler(dataset, batches, ahead)
    return kwargs
