"""Rebuild a feature family with a live model (e.g. during LoRA training) as a new generation.

The new generation is written beside the current one by all ranks; rank 0 then
switches readers to it with one atomic manifest write. Readers that opened the
old generation keep reading it until they reopen (at the next epoch boundary,
via ``store.reload()`` / ``VLADataset.refresh()``). By default the generation
just replaced is kept (``keep_previous=1``) so those readers stay valid for one
more rebuild cycle; older ones are deleted.
"""

from __future__ import annotations

import os

from ..format import GenerationInfo
from ..store import VLAStore
from .build import BuildStats, FeatureMismatchError, compute_rows, open_writable, plan_lengths
from .dist import barrier, broadcast_object, rank_world
from .extractor import FeatureExtractor
from .source import DataFolder

__all__ = ["rebuild_features", "RebuildResult"]


class RebuildResult:
    """The generation a rebuild switched to, and this rank's :class:`BuildStats`."""

    def __init__(self, info: GenerationInfo, stats: BuildStats, previous: int) -> None:
        self.info = info
        self.stats = stats
        self.previous = previous

    @property
    def generation(self) -> int:
        return self.info.generation

    def __repr__(self) -> str:
        return f"RebuildResult(generation {self.previous} -> {self.generation}, {self.stats.rows} rows on this rank)"


def rebuild_features(
    store: VLAStore | str | os.PathLike[str],
    family: str,
    extractor: FeatureExtractor,
    source: DataFolder,
    batch_size: int = 8,
    keep_previous: int | None = 1,
    progress: bool = True,
) -> RebuildResult:
    """Compute a new generation of ``family`` with ``extractor``'s current weights and switch to it.

    Call on every rank (it synchronises them). The model is used as is: put it
    in eval mode first if it has dropout, and back in train mode after.

    Args:
        store: the store (a path, or a store object; a read-only one is reopened writable).
        family: an existing family (plan it first with :func:`build_features`).
        extractor: e.g. ``TransformersVLExtractor(model, processor)`` around the model being trained.
        source: where the images and instructions are.
        batch_size: items per forward (halved on out-of-memory).
        keep_previous: how many replaced generations to keep (``None``: all).
        progress: show a progress bar on rank 0.

    An interrupted rebuild is resumed: a newer, unswitched generation made with
    the same weights and parameters is completed instead of starting another.
    """
    rank, world_size = rank_world()
    store = open_writable(store)
    store.reload()
    fingerprint = str(extractor.fingerprint())
    producer = extractor.producer(fingerprint)
    current = store.generation(family)
    if extractor.spec(current.spec.vlm_reuse_count or 1).row_shape != current.spec.row_shape or (
        extractor.ragged != current.spec.ragged or extractor.dtype != current.spec.dtype
    ):
        raise FeatureMismatchError(
            f"family {family!r} rows are {current.spec.row_shape} {current.spec.dtype}; the extractor makes "
            f"{extractor.row_shape} {extractor.dtype}: a rebuild keeps the row shape; use another family"
        )
    lengths = None
    if current.spec.ragged:
        if current.producer.params == extractor.params():
            lengths = store.layout(family).lengths  # same processor settings: same token counts
        else:
            from ..layout import vlm_items

            items = vlm_items(store.catalog.steps, current.spec.vlm_reuse_count or 1)
            lengths = plan_lengths(store, extractor, source, items, current.spec.vlm_reuse_count or 1, batch_size)
    generation = None
    error = None
    if rank == 0:
        try:
            generation = _resumable_generation(store, family, producer.fingerprint, producer.params)
            if generation is None:
                generation = store.new_generation(family, producer, lengths=lengths).generation
        except Exception as exc:  # the other ranks must not wait forever for the broadcast
            error = exc
    generation = broadcast_object(generation if error is None else -1)
    if error is not None:
        raise error
    if generation == -1:
        raise RuntimeError(f"rank 0 could not plan a new generation of {family!r}; see its error")
    store.reload()
    stats = compute_rows(store, family, extractor, source, generation, batch_size, rank, world_size, progress)
    stats.fingerprint = fingerprint
    barrier()  # every rank's shards are on disk before rank 0 counts them
    missing = broadcast_object(int((~store.coverage(family, generation)).sum()) if rank == 0 else 0)
    if missing:
        raise RuntimeError(
            f"family {family!r} generation {generation}: {missing} rows were not written; not switching. "
            "Run the rebuild again to finish it"
        )
    if rank == 0:
        store.switch_generation(family, generation, keep_previous=keep_previous)
    barrier()
    store.reload()
    return RebuildResult(store.generation(family, generation), stats, current.generation)


def _resumable_generation(store: VLAStore, family: str, fingerprint: str, params: dict) -> int | None:
    entry = store.manifest.families[family]
    newest = max(entry.generations)
    if newest <= entry.current_generation:
        return None
    info = store.generation(family, newest)
    if info.producer.fingerprint == fingerprint and info.producer.params == params:
        return newest
    return None
