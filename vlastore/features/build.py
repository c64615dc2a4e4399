"""Compute a feature family with one process per GPU, resumably.

:func:`build_features` plans the family (rank 0), then every rank computes the
rows of the shards it owns (``shard % world_size == rank``) and writes them with
a :class:`~vlastore.writer.FamilyWriter`. Shards are written once, complete, so
a killed run restarts where it stopped. Inputs are prepared in a background
thread while the model runs, so the GPU does not wait for image decoding or
tokenisation; :class:`BuildStats` measures how much it still does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format import FamilySpec, FormatError, GenerationInfo
from ..store import VLAStore
from .dist import all_gather_objects, all_sum, barrier, rank_world
from .extractor import FeatureExtractor, FunctionExtractor, Item
from .source import DataFolder

__all__ = ["build_features", "compute_rows", "plan_lengths", "BuildStats", "FeatureMismatchError", "open_writable"]

log = logging.getLogger(__name__)


class FeatureMismatchError(FormatError):
    """The family holds features of other weights or parameters than the extractor's."""


@dataclass
class BuildStats:
    """What one rank did, and where its time went."""

    rank: int = 0
    world_size: int = 1
    generation: int = 0
    rows: int = 0
    rows_skipped: int = 0
    batches: int = 0
    shards_written: int = 0
    oom_backoffs: int = 0
    batch_size: int = 0
    seconds_total: float = 0.0
    seconds_forward: float = 0.0
    seconds_wait_inputs: float = 0.0
    seconds_write: float = 0.0
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def outside_forward_fraction(self) -> float:
        """Share of the run spent outside the model forward (waiting for inputs, writing)."""
        return 0.0 if self.seconds_total <= 0 else max(0.0, 1 - self.seconds_forward / self.seconds_total)

    def summary(self) -> str:
        rate = self.rows / self.seconds_total if self.seconds_total else 0.0
        return (
            f"rank {self.rank}/{self.world_size}: {self.rows:,} rows in {self.seconds_total:.1f}s "
            f"({rate:,.1f} rows/s), "
            f"{self.shards_written} shards, batch size {self.batch_size}; outside forward "
            f"{100 * self.outside_forward_fraction:.1f}% (inputs {self.seconds_wait_inputs:.2f}s, "
            f"write {self.seconds_write:.2f}s)"
        )


def open_writable(store: VLAStore | str | os.PathLike[str]) -> VLAStore:
    if isinstance(store, VLAStore):
        return store if store.writable else VLAStore.open(store.location, writable=True)
    return VLAStore.open(store, writable=True)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Prefetcher:
    """Prepares batches in a background thread, ``depth`` ahead of the model."""

    def __init__(self, extractor: FeatureExtractor, items: Sequence[Item], batch_size: int, depth: int = 2) -> None:
        self.extractor = extractor
        self.items = items
        self.batch_size = batch_size
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vlastore-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pos = 0
        try:
            while pos < len(self.items) and not self.stop.is_set():
                n = self.batch_size  # read each time: out-of-memory backoff lowers it
                batch = list(self.items[pos : pos + n])
                self.queue.put((pos, batch, self.extractor.prepare(batch)))
                pos += len(batch)
        except BaseException as exc:  # handed to the consumer, raised there
            self.queue.put(exc)
            return
        self.queue.put(None)

    def __iter__(self) -> Iterator[tuple[int, list[Item], Any]]:
        while True:
            got = self.queue.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)


def _compute_with_backoff(
    extractor: FeatureExtractor, batch: list[Item], prepared: Any, stats: BuildStats, prefetcher: _Prefetcher
) -> list[tuple[list[Item], Any]]:
    """Rows of a batch; on out-of-memory halve the batch (and all later ones) and retry."""
    try:
        return [(batch, extractor.compute(prepared))]
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
    del prepared
    _free_cuda()
    if len(batch) == 1:
        raise RuntimeError(
            f"out of memory on a batch of one item ({batch[0].dataset!r}, vlm_idx={batch[0].index}); "
            "use a smaller image size (--max-pixels), fewer cameras, or a GPU with more memory"
        )
    half = max(1, len(batch) // 2)
    prefetcher.batch_size = max(1, min(prefetcher.batch_size, half))
    stats.oom_backoffs += 1
    log.warning("out of memory with %d items per batch; continuing with %d", len(batch), half)
    out = []
    for part in (batch[:half], batch[half:]):
        out += _compute_with_backoff(extractor, part, extractor.prepare(part), stats, prefetcher)
    return out


def compute_rows(
    store: VLAStore,
    family: str,
    extractor: FeatureExtractor,
    source: DataFolder,
    generation: int | None = None,
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    prefetch: int = 2,
    on_batch: Callable[[int], None] | None = None,
    repair: bool = False,
) -> BuildStats:
    """Compute and write the rows this rank still owes to one generation of a family.

    Only rows not on disk are computed (resume): rows of shards not written yet and
    rows missing inside written shards (holes, filled by replacing the shard
    atomically). With ``repair`` every owned shard is read whole first and corrupt
    rows are computed again too. Returns this rank's stats.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    started = time.perf_counter()
    writer = store.writer(family, rank=rank, world_size=world_size, generation=generation, repair=repair)
    rows = writer.pending_rows()
    items = source.items(store, family, rows, writer.generation)
    stats = BuildStats(rank=rank, world_size=world_size, generation=writer.generation, batch_size=batch_size)
    stats.rows_skipped = int(len(writer.owned_rows()) - len(rows))
    total_rows = all_sum(len(rows)) if world_size > 1 else len(rows)  # a collective: every rank calls it
    bar = _progress_bar(total_rows, rank, world_size, progress, family)
    prefetcher = _Prefetcher(extractor, items, batch_size, depth=prefetch)
    try:
        waited = time.perf_counter()
        for pos, batch, prepared in prefetcher:
            now = time.perf_counter()
            stats.seconds_wait_inputs += now - waited
            results = _compute_with_backoff(extractor, batch, prepared, stats, prefetcher)
            forward_done = time.perf_counter()
            stats.seconds_forward += forward_done - now
            offset = pos
            for part, values in results:
                writer.write_rows(rows[offset : offset + len(part)], values)
                offset += len(part)
            stats.rows += len(batch)
            stats.batches += 1
            if bar is not None:
                bar.update(len(batch) * world_size)
            if on_batch is not None:
                on_batch(len(batch))
            waited = time.perf_counter()
            stats.seconds_write += waited - forward_done
        t = time.perf_counter()
        writer.close()
        stats.seconds_write += time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    finally:
        prefetcher.close()
        if bar is not None:
            bar.close()
    stats.shards_written = writer.shards_written
    stats.batch_size = prefetcher.batch_size
    stats.seconds_total = time.perf_counter() - started
    return stats


def _progress_bar(total: int, rank: int, world_size: int, progress: bool, family: str) -> Any:
    if not progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="row",
        desc=f"{family} ({world_size} rank{'s' if world_size > 1 else ''})",
        dynamic_ncols=True,
        disable=None,
    )


def plan_lengths(
    store: VLAStore,
    extractor: FeatureExtractor,
    source: DataFolder,
    items_per_episode: np.ndarray,
    vlm_reuse_count: int,
    batch_size: int = 32,
) -> np.ndarray:
    """Token rows of every planned row of a ragged family, from the processor alone.

    Each rank measures every ``world_size``-th item; the lengths are gathered on all ranks.
    """
    rank, world_size = rank_world()
    episode_rows = np.concatenate([[0], np.cumsum(items_per_episode)]).astype(np.int64)
    total = int(episode_rows[-1])
    mine = np.arange(rank, total, world_size, dtype=np.int64)
    from .source import items_for_rows

    items = items_for_rows(source, store.catalog.names, episode_rows, mine, vlm_reuse_count)
    lengths: list[int] = []
    for start in range(0, len(items), batch_size):
        lengths += extractor.lengths(items[start : start + batch_size])
    out = np.zeros(total, dtype=np.int64)
    for r, part in enumerate(all_gather_objects(lengths)):
        out[r::world_size] = part
    return out


def check_producer(store: VLAStore, family: str, extractor: FeatureExtractor, fingerprint: str) -> GenerationInfo:
    """The current generation of ``family``, if the extractor makes the same rows; else raise."""
    current = store.generation(family)
    spec = extractor.spec(current.spec.vlm_reuse_count or 1)
    same_shape = (current.spec.row_shape, current.spec.dtype, current.spec.ragged) == (
        spec.row_shape,
        spec.dtype,
        spec.ragged,
    )
    if not same_shape:
        raise FeatureMismatchError(
            f"family {family!r} holds rows {current.spec.row_shape} {current.spec.dtype}"
            f"{' ragged' if current.spec.ragged else ''}; this extractor makes {spec.row_shape} {spec.dtype}"
            f"{' ragged' if spec.ragged else ''}; write to another --family"
        )
    old = current.producer
    other_weights = bool(old.fingerprint and fingerprint and old.fingerprint != fingerprint)
    if other_weights or (old.params and old.params != extractor.params()):
        raise FeatureMismatchError(
            f"family {family!r} generation {current.generation} was made by {old.model} "
            f"(fingerprint {old.fingerprint}, params {old.params}); this model has fingerprint {fingerprint} "
            f"and params {extractor.params()}. Rebuild it (--rebuild / vlastore.features.rebuild_features) "
            "or write to another --family"
        )
    return current


def build_features(
    store: VLAStore | str | os.PathLike[str],
    extractor: FeatureExtractor,
    source: DataFolder,
    family: str = "qwen_vl",
    vlm_reuse_count: int = 3,
    batch_size: int = 8,
    rows_per_shard: int = 0,
    compression: str | None = None,
    progress: bool = True,
    repair: bool = False,
) -> BuildStats:
    """Plan ``family`` if it is new, then compute its missing rows on every rank.

    Call it on every rank (``torchrun``) or in one process. Resumable: run it
    again after a crash and only the rows not on disk are computed (also rows
    missing inside written shards). ``repair=True`` also recomputes rows whose
    bytes fail their crc32c (every owned shard is read whole to find them).

    Raises:
        FeatureMismatchError: the family exists with rows of other weights or
            parameters; use :func:`~vlastore.features.rebuild.rebuild_features`.
    """
    rank, world_size = rank_world()
    store = open_writable(store)
    if isinstance(extractor, FunctionExtractor) and not extractor.row_shape:
        first = source.items(store, family, [0]) if family in store.families else None
        extractor.probe(first[0] if first else source.item(store.catalog.names[0], 0, 0))
    fingerprint = str(extractor.fingerprint())
    if family in store.families:
        info = check_producer(store, family, extractor, fingerprint)
    else:
        spec = extractor.spec(vlm_reuse_count, rows_per_shard=rows_per_shard, compression=compression)
        info = _plan_family(store, family, spec, extractor, source, fingerprint, batch_size)
    stats = compute_rows(
        store, family, extractor, source, info.generation, batch_size, rank, world_size, progress, repair=repair
    )
    stats.fingerprint = fingerprint
    barrier()
    return stats


def _plan_family(
    store: VLAStore,
    family: str,
    spec: FamilySpec,
    extractor: FeatureExtractor,
    source: DataFolder,
    fingerprint: str,
    batch_size: int,
) -> GenerationInfo:
    rank, _ = rank_world()
    from ..layout import vlm_items

    items = vlm_items(store.catalog.steps, spec.vlm_reuse_count or 1)
    lengths = None
    if spec.ragged:
        lengths = plan_lengths(store, extractor, source, items, spec.vlm_reuse_count or 1, batch_size)
    error = None
    if rank == 0:
        try:
            store.add_family(family, spec, items, lengths=lengths, producer=extractor.producer(fingerprint))
        except Exception as exc:  # every rank must leave the barrier; rank 0 re-raises below
            error = exc
    failed = all_gather_objects(error is not None)
    if error is not None:
        raise error
    if any(failed):
        raise RuntimeError(f"rank 0 could not plan family {family!r}; see its error")
    store.reload()
    return store.generation(family)
