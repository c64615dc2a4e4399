"""Format 2: series statistics stored with the commit they describe.

Every commit that changes which episodes a snapshot holds (create, append,
replace, remove, compaction, upgrade) stores the exact statistics of every
series over the snapshot's episodes: one small float64 array per key,
``stats/s<id>/<key>`` ``[5 + quantiles, columns]`` (count, mean, std, min,
max, then the quantiles), named by the commit's ``stats`` entry
(:class:`~vlastore.snapshot.StatsRef`) with the crc32c of its values. A
commit that keeps the same episodes in the same order (adding a family,
switching a generation) keeps its parent's entry: the objects are immutable.

Exactness: the quantiles are ``np.quantile`` on the concatenation of the
snapshot's episodes, computed by :func:`vlastore.stats.summarize` (the same
code that answers on demand), so the stored values equal an on-demand
computation bit for bit. Exact quantiles of a changed episode set need every
step of it: a commit reads the whole visible series once (a partition per
column, no sort); docs/FORMAT.md has the measured cost.

Reading: :func:`read_stored` checks the array's ``zarr.json`` against the
commit, its chunk crcs, its shape, and the crc32c of its values against the
commit's; any mismatch is a :class:`~vlastore.format.FormatError`, never a
value. :class:`~vlastore.store.VLAStore` is the only caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from crc32c import crc32c

from .format import FormatError
from .living import ArrayWriter, CatalogData, read_catalog, read_small
from .nodes import ZarrNodes
from .snapshot import Snapshot, StatsRef
from .stats import SeriesStats, summarize

__all__ = [
    "STORED_QUANTILES",
    "STORED_METHOD",
    "with_stats",
    "prune_cache",
    "read_stored",
    "pick",
    "stats_array",
    "values_crc",
]

STORED_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
"""Quantiles stored with a commit: LeRobot's ``q01 q10 q50 q90 q99`` (others are computed on demand)."""

STORED_METHOD = "linear"
"""``np.quantile``'s default method, the one ``ds.stats`` uses."""

_ROWS = ("count", "mean", "std", "min", "max")


def stats_array(stats: SeriesStats, quantiles: Sequence[float]) -> np.ndarray:
    """``[5 + len(quantiles), columns]`` float64: count, mean, std, min, max, then each quantile (NaN: none)."""
    columns = len(stats.mean)
    out = np.full((len(_ROWS) + len(quantiles), columns), np.nan)
    out[0] = stats.count
    for i, name in enumerate(_ROWS[1:], start=1):
        out[i] = getattr(stats, name)
    for i, q in enumerate(quantiles, start=len(_ROWS)):
        if q in stats.quantiles:
            out[i] = stats.quantiles[q]
    return out


def values_crc(array: np.ndarray) -> str:
    """crc32c of an array's values as stored: little-endian float64, C order."""
    return f"crc32c:{crc32c(np.ascontiguousarray(array, dtype='<f8').tobytes()):08x}"


def _visible(
    nodes: ZarrNodes, snapshot: Snapshot, cat: CatalogData, key: str, cache: dict[str, np.ndarray] | None
) -> np.ndarray:
    """The series of the snapshot's episodes in catalog order (its segments read and checked, or from ``cache``:
    segments are immutable, so one read serves every later commit of the same process)."""
    state = snapshot.series[key]
    parts = []
    for seg in state.segments:
        part = None if cache is None else cache.get(seg.path)
        if part is None:
            part = read_small(nodes, seg.path, (seg.rows, len(state.columns)), state.dtype, snapshot.arrays)
            if cache is not None:
                cache[seg.path] = part
        parts.append(part)
    physical = np.concatenate(parts) if parts else np.zeros((0, len(state.columns)), dtype=state.dtype)
    offsets = np.concatenate([[0], np.cumsum(cat.steps)]).astype(np.int64)
    if len(physical) == offsets[-1] and np.array_equal(cat.step_start, offsets[:-1]):
        return physical  # one segment, no gaps (create, compaction, upgrade): no gather
    index = np.repeat(cat.step_start - offsets[:-1], cat.steps) + np.arange(int(offsets[-1]), dtype=np.int64)
    return physical[index]


def _same_episodes(head: Snapshot | None, head_cat: CatalogData | None, draft: Snapshot, cat: CatalogData) -> bool:
    """Whether ``draft`` shows exactly the head's data: the same episodes (stable ids) in the same order, the
    same series. An episode's steps never change under its id (a replaced episode gets a new one)."""
    if head is None or head_cat is None:
        return False
    same_series = {k: (s.columns, s.dtype) for k, s in head.series.items()} == {
        k: (s.columns, s.dtype) for k, s in draft.series.items()
    }
    return same_series and np.array_equal(head_cat.episode_id, cat.episode_id)


def with_stats(
    nodes: ZarrNodes,
    head: Snapshot | None,
    head_cat: CatalogData | None,
    draft: Snapshot,
    cat: CatalogData | None,
    out: ArrayWriter,
    cache: dict[str, np.ndarray] | None = None,
) -> Snapshot:
    """``draft`` (a commit about to be made) with the statistics of its series over its catalog.

    The head's entry is kept when the draft shows the same data (None stays None: an older store's
    statistics are then computed on demand, as before); otherwise every series is summarised over
    the draft's episodes and written through ``out`` (before the commit's ``arrays`` are gathered).

    Args:
        nodes: the store. head, head_cat: the parent commit and its catalog (None: the first commit).
        draft: the new commit, its ``arrays`` holding every array it may read (parent's and new ones).
        cat: the draft's catalog when this process has it in memory (None: read from the store).
        out: the commit's writer.
        cache: series segments already read (path -> array), filled with those read here; the caller keeps
            it between commits (``prune_cache``).
    """
    if cat is None:
        cat = head_cat if head is not None and draft.catalog.path == head.catalog.path else None
    if cat is None:
        cat = read_catalog(nodes, draft)
    if _same_episodes(head, head_cat, draft, cat):
        return dataclasses.replace(draft, stats=head.stats if head is not None else None)
    offsets = np.concatenate([[0], np.cumsum(cat.steps)]).astype(np.int64)
    path = f"stats/{out.oid('s')}"
    crcs = {}
    for key in sorted(draft.series):
        values = _visible(nodes, draft, cat, key, cache)
        qs = STORED_QUANTILES if offsets[-1] else ()  # no steps: nothing to take quantiles of (NaN rows)
        array = stats_array(summarize(values, offsets, None, qs, STORED_METHOD), STORED_QUANTILES)
        out.small(f"{path}/{key}", array)
        crcs[key] = values_crc(array)
    return dataclasses.replace(draft, stats=StatsRef(path, STORED_QUANTILES, STORED_METHOD, crcs))


def prune_cache(cache: dict[str, np.ndarray], snapshot: Snapshot) -> None:
    """Keep in ``cache`` only the series segments ``snapshot`` uses (what the next commit reads)."""
    used = {seg.path for state in snapshot.series.values() for seg in state.segments}
    for path in [p for p in cache if p not in used]:
        del cache[path]


def read_stored(nodes: ZarrNodes, snapshot: Snapshot, key: str) -> tuple[np.ndarray, StatsRef] | None:
    """The stored statistics array of series ``key`` (checked), or None when the commit has none.

    Raises:
        FormatError: the array or its values do not match the commit (damaged or edited), naming it.
    """
    ref = snapshot.stats
    if ref is None:
        return None
    path = f"{ref.path}/{key}"
    where = nodes.storage.where(path)
    expected = ref.values.get(key)
    if expected is None:
        raise FormatError(
            f"{where}: the commit's stats entry has no checksum for series {key!r}; the commit is damaged"
        )
    columns = len(snapshot.series[key].columns)
    array = read_small(nodes, path, (len(_ROWS) + len(ref.quantiles), columns), "float64", snapshot.arrays)
    if values_crc(array) != expected:
        raise FormatError(
            f"{where}: stored statistics do not match their checksum in commit {snapshot.commit}; damaged or "
            "edited (delete nothing: `vlastore verify` names what else is damaged; VLAStore.stats(key, "
            "episodes=all names) computes them from the data)"
        )
    if not np.all(array[0] == snapshot.catalog.steps):
        raise FormatError(f"{where}: stored count {array[0][:1]} is not the commit's {snapshot.catalog.steps} steps")
    return array, ref


def pick(
    array: np.ndarray, ref: StatsRef, quantiles: Sequence[float], method: str, columns: Sequence[str]
) -> SeriesStats | None:
    """:class:`SeriesStats` with ``quantiles`` from a stored array; None when one of them (or the method) is not
    stored, or the store has no steps (the caller computes, as on demand)."""
    qs = tuple(dict.fromkeys(float(q) for q in quantiles))
    count = int(array[0][0]) if array.shape[1] else 0
    if method != ref.method or count == 0 or any(q not in ref.quantiles for q in qs):
        return None
    row = {q: len(_ROWS) + ref.quantiles.index(q) for q in qs}
    return SeriesStats(
        count=count,
        mean=array[1].copy(),
        std=array[2].copy(),
        min=array[3].copy(),
        max=array[4].copy(),
        quantiles={q: array[row[q]].copy() for q in qs},
        method=method,
        columns=tuple(columns),
    )
