"""Exact normalisation statistics of robot series and feature families.

Per column of a series: count, mean, std, min, max and any quantiles. The
quantiles are those of the whole data, equal to ``np.quantile`` on the
concatenated steps of the chosen episodes (same ``method``), never averages of
per-episode quantiles (LeRobot #3804: a q99 aggregated by a weighted mean was
13.59 against a true 39.25).

Two layers, both plain numpy (no store, no torch), so that a store can persist
the first and answer any subset with the second:

- :class:`EpisodeMoments`: per-episode partial results (count, mean, M2 =
  sum of squared deviations from the episode mean, min, max), computed once.
  Adding episodes concatenates partials, removing them drops rows; mean, std,
  min and max of any subset merge from them in O(episodes) (Chan et al.'s
  pairwise update, exact up to float64 rounding).
- :func:`summarize`: merges partials and, for quantiles, selects over the
  subset's steps (``np.quantile`` partitions, it does not sort), one column at
  a time in a contiguous copy.

:func:`series_stats` and :func:`feature_stats` read what they need from a
store (:class:`StoreView`: a :class:`~vlastore.store.VLAStore` is one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .catalog import Catalog
from .dtypes import as_float

if TYPE_CHECKING:
    from .read import FeatureReader


__all__ = [
    "DEFAULT_QUANTILES",
    "EpisodeMoments",
    "SeriesStats",
    "FeatureStats",
    "summarize",
    "merge_moments",
    "series_stats",
    "feature_stats",
    "quantile_name",
    "StoreView",
]

DEFAULT_QUANTILES = (0.01, 0.99)


class StoreView(Protocol):
    """What the statistics read from a store (a :class:`~vlastore.store.VLAStore` is one)."""

    @property
    def catalog(self) -> Catalog: ...

    def columns(self, key: str) -> tuple[str, ...]: ...

    def series_all(self, key: str) -> np.ndarray: ...

    def reader(self, family: str, generation: int | None = None) -> FeatureReader: ...

    def coverage(self, family: str, generation: int | None = None) -> np.ndarray: ...


def quantile_name(q: float) -> str:
    """LeRobot's name for a quantile: ``0.01 -> "q01"``, ``0.5 -> "q50"``, ``0.999 -> "q99.9"``."""
    pct = q * 100
    if abs(pct - round(pct)) < 1e-9:
        return f"q{int(round(pct)):02d}"
    return f"q{pct:g}"


def _episode_rows(step_offsets: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """Global step indices of ``episodes``, concatenated in the order given."""
    starts = step_offsets[episodes]
    counts = step_offsets[episodes + 1] - starts
    local = np.arange(int(counts.sum()), dtype=np.int64)
    begins = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    return local + np.repeat(starts - begins, counts)


def _columns(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 1:
        return values[:, None]
    if values.ndim != 2:
        raise ValueError(f"series values must be [steps, columns], got shape {values.shape}")
    return values


def _column(values: np.ndarray, rows: np.ndarray | None, c: int) -> np.ndarray:
    """One column of the chosen rows as a contiguous copy (the quantile selection works in place on it)."""
    # Always a copy: np.quantile(overwrite_input=True) reorders it, and a one-column series'
    # values[:, c] is already contiguous (ascontiguousarray would hand back the caller's memory).
    return np.array(values[:, c], copy=True) if rows is None else values[rows, c]


def _segment_moments(col: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(mean, m2, min, max)`` of consecutive segments of ``col`` (all counts > 0), two-pass in float64."""
    if not len(counts):
        empty = np.zeros(0)
        return empty, empty, empty, empty
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col64 = col.astype(np.float64)
    mean = np.add.reduceat(col64, starts) / counts
    # Two passes (deviations from each episode's own mean) rather than sum of squares: robot joint
    # positions sit far from zero with small spread, where E[x^2] - E[x]^2 cancels catastrophically.
    col64 -= np.repeat(mean, counts)
    np.square(col64, out=col64)
    m2 = np.add.reduceat(col64, starts)
    return mean, m2, np.minimum.reduceat(col, starts), np.maximum.reduceat(col, starts)


@dataclass(frozen=True)
class EpisodeMoments:
    """Per-episode partial statistics of one series: the mergeable part of :class:`SeriesStats`.

    Attributes:
        count: ``[E]`` steps per episode.
        mean: ``[E, C]`` float64 mean per episode (0 for an empty episode).
        m2: ``[E, C]`` float64 sum of squared deviations from the episode's mean.
        min, max: ``[E, C]`` float64 (exact: the stored values; ``+inf``/``-inf`` when empty).
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def compute(
        cls, values: np.ndarray, step_offsets: np.ndarray, episodes: Sequence[int] | np.ndarray | None = None
    ) -> EpisodeMoments:
        """Partials of ``episodes`` (default all, in order) from the concatenated series.

        Args:
            values: ``[total_steps, C]`` (or ``[total_steps]``) the series of all episodes.
            step_offsets: ``[E + 1]`` where each episode's steps start (``Catalog.step_offsets``).
            episodes: positions of the episodes wanted, in the order wanted.
        """
        values = _columns(values)
        step_offsets = np.asarray(step_offsets, dtype=np.int64)
        chosen = None if episodes is None else np.asarray(episodes, dtype=np.int64)
        rows = None if chosen is None else _episode_rows(step_offsets, chosen)
        counts = np.diff(step_offsets) if chosen is None else step_offsets[chosen + 1] - step_offsets[chosen]
        parts = [_segment_moments(_column(values, rows, c), counts[counts > 0]) for c in range(values.shape[1])]
        return cls._assemble(counts, parts, values.shape[1])

    @classmethod
    def _assemble(cls, counts: np.ndarray, parts: list[tuple[np.ndarray, ...]], n_columns: int) -> EpisodeMoments:
        full = counts > 0
        shape = (len(counts), n_columns)
        mean, m2 = np.zeros(shape), np.zeros(shape)
        low, high = np.full(shape, np.inf), np.full(shape, -np.inf)
        for c, (m, s, lo, hi) in enumerate(parts):
            mean[full, c], m2[full, c], low[full, c], high[full, c] = m, s, lo, hi
        return cls(counts.astype(np.int64), mean, m2, low, high)

    def __len__(self) -> int:
        return len(self.count)

    def select(self, episodes: Sequence[int] | np.ndarray) -> EpisodeMoments:
        """The partials of some episodes (positions into this object), e.g. after removing episodes."""
        e = np.asarray(episodes, dtype=np.int64)
        return EpisodeMoments(self.count[e], self.mean[e], self.m2[e], self.min[e], self.max[e])

    @classmethod
    def concat(cls, parts: Sequence[EpisodeMoments]) -> EpisodeMoments:
        """Partials of several groups of episodes one after the other, e.g. after appending episodes."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("count", "mean", "m2", "min", "max")))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{name: array}`` to persist (count int64, the rest float64 ``[E, C]``)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "min": self.min, "max": self.max}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EpisodeMoments:
        """Inverse of :meth:`to_arrays`; shapes are checked."""
        count = np.asarray(arrays["count"], dtype=np.int64).reshape(-1)
        rest = [np.asarray(arrays[k], dtype=np.float64) for k in ("mean", "m2", "min", "max")]
        for name, a in zip(("mean", "m2", "min", "max"), rest):
            if a.ndim != 2 or len(a) != len(count) or a.shape != rest[0].shape:
                raise ValueError(f"episode moments: {name} has shape {a.shape}, expected ({len(count)}, columns)")
        return cls(count, *rest)


def merge_moments(moments: EpisodeMoments) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, var, min, max)`` of the union of the episodes (population variance, ddof=0).

    Chan, Golub & LeVeque's parallel update in closed form: with ``n = sum n_e``
    and ``mean = sum n_e mean_e / n``, ``M2 = sum M2_e + sum n_e (mean_e - mean)^2``.
    """
    n = int(moments.count.sum())
    if n == 0:
        nan = np.full(moments.mean.shape[1:], np.nan)
        return 0, nan, nan.copy(), nan.copy(), nan.copy()
    weights = moments.count.astype(np.float64)[:, None]
    mean = (weights * moments.mean).sum(axis=0) / n
    m2 = moments.m2.sum(axis=0) + (weights * np.square(moments.mean - mean)).sum(axis=0)
    return n, mean, m2 / n, moments.min.min(axis=0), moments.max.max(axis=0)


@dataclass(frozen=True)
class SeriesStats:
    """Statistics of one robot series over a set of episodes, per column.

    ``std`` is the population standard deviation (``ddof=0``, as ``np.std``
    and LeRobot). ``quantiles[q]`` equals ``np.quantile(data, [q, ...],
    axis=0, method=method)`` on the concatenated data, bit for bit (numpy
    interpolates in float64 for a list of probabilities; given one Python
    float on float32 data it rounds the result to float32); ``min``/``max``
    are exact; ``mean``/``std`` are float64 sums merged per episode.
    """

    count: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    quantiles: dict[float, np.ndarray] = field(default_factory=dict)
    method: str = "linear"
    columns: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> Any:
        """``stats["mean"]``, ``stats["q01"]``: the names of :meth:`to_dict`."""
        for q, value in self.quantiles.items():
            if quantile_name(q) == name:
                return value
        if name in ("count", "mean", "std", "min", "max"):
            return getattr(self, name)
        raise KeyError(f"no statistic {name!r}; there are {list(self.to_dict())}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, LeRobot's ``stats.json`` names: ``count, mean, std, min, max, q01, q99, ...``."""
        out: dict[str, Any] = {"count": [self.count]}
        for name in ("mean", "std", "min", "max"):
            out[name] = getattr(self, name).tolist()
        for q, value in self.quantiles.items():
            out[quantile_name(q)] = value.tolist()
        return out


def summarize(
    values: np.ndarray | None,
    step_offsets: np.ndarray,
    episodes: Sequence[int] | np.ndarray | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    method: str = "linear",
    moments: EpisodeMoments | None = None,
    columns: Sequence[str] = (),
) -> SeriesStats:
    """Exact statistics of one series over ``episodes``.

    Args:
        values: ``[total_steps, C]`` the series of all episodes (may be None
            when ``moments`` are given and no quantile is asked for).
        step_offsets: ``[E + 1]`` (``Catalog.step_offsets``).
        episodes: positions of the episodes to cover (default all).
        quantiles: any probabilities in ``[0, 1]``.
        method: ``np.quantile``'s method.
        moments: precomputed per-episode partials of *all* ``E`` episodes (what
            a store persists); computed here from ``values`` when None.
        columns: column names, carried along.

    Raises:
        ValueError: no steps in the chosen episodes while quantiles are asked
            for, a probability outside ``[0, 1]``, or values of the wrong shape.
    """
    step_offsets = np.asarray(step_offsets, dtype=np.int64)
    qs = tuple(dict.fromkeys(float(q) for q in quantiles))  # each once, in the order given
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must be probabilities in [0, 1], got {list(qs)}")
    chosen = None if episodes is None else np.asarray(episodes, dtype=np.int64)
    all_in_order = chosen is None or np.array_equal(chosen, np.arange(len(step_offsets) - 1))
    if values is not None:
        values = _columns(values)
        if len(values) != step_offsets[-1]:
            raise ValueError(f"values have {len(values)} steps but the catalog has {int(step_offsets[-1])}")
    elif moments is None or qs:
        raise ValueError("summarize needs values (or moments and no quantiles)")
    if all_in_order or chosen is None:
        rows, counts = None, np.diff(step_offsets)
    else:
        rows, counts = _episode_rows(step_offsets, chosen), step_offsets[chosen + 1] - step_offsets[chosen]
    n = int(counts.sum())
    if qs and n == 0:
        raise ValueError("the chosen episodes have no steps: there is nothing to take quantiles of")
    n_columns = values.shape[1] if values is not None else moments.mean.shape[1]  # type: ignore[union-attr]
    parts: list[tuple[np.ndarray, ...]] = []
    found: dict[float, list[np.ndarray]] = {q: [] for q in qs}
    need_moments = moments is None
    if need_moments or qs:
        assert values is not None
        for c in range(n_columns):
            col = _column(values, rows, c)  # one copy per column, shared by moments and the selection
            if need_moments:
                parts.append(_segment_moments(col, counts[counts > 0]))
            if qs:
                # np.quantile itself on the subset's values: a partition at the needed order
                # statistics (no sort), and bit-identical to np.quantile on the concatenated data.
                result = np.quantile(col, qs, method=method, overwrite_input=True)  # type: ignore[call-overload]
                for q, value in zip(qs, np.atleast_1d(result)):
                    found[q].append(value)
    if need_moments:
        subset = EpisodeMoments._assemble(counts, parts, n_columns)
    else:
        assert moments is not None
        subset = moments if chosen is None else moments.select(chosen)
    count, mean, var, low, high = merge_moments(subset)
    return SeriesStats(
        count=count,
        mean=mean,
        std=np.sqrt(var),
        min=low,
        max=high,
        quantiles={q: np.asarray(v, dtype=np.float64) for q, v in found.items()},
        method=method,
        columns=tuple(columns),
    )


def _resolve_episodes(store: StoreView, episodes: Sequence[str | int] | None) -> np.ndarray | None:
    if episodes is None:
        return None
    return np.asarray([store.catalog.resolve(e) for e in episodes], dtype=np.int64)


def series_stats(
    store: StoreView,
    key: str,
    episodes: Sequence[str | int] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    method: str = "linear",
    moments: EpisodeMoments | None = None,
) -> SeriesStats:
    """Exact statistics of the robot series ``key`` of a store, over ``episodes`` (names or positions; default all).

    ``moments``: per-episode partials of all the store's episodes when the
    store keeps them; mean/std/min/max then merge in O(episodes) and only the
    quantiles read the data.
    """
    columns = store.columns(key)
    chosen = _resolve_episodes(store, episodes)
    qs = tuple(quantiles)
    values = store.series_all(key) if (moments is None or qs) else None
    return summarize(values, store.catalog.step_offsets, chosen, qs, method, moments, columns)


@dataclass(frozen=True)
class FeatureStats:
    """Mean/std (``ddof=0``), min and max per dimension of a feature family, over the rows present.

    ``shape`` is the family's ``row_shape`` (for ragged families, one token's
    shape: every token of every row counts once). ``count`` is the number of
    vectors (rows, or tokens for ragged families) seen; ``rows`` the rows.
    """

    family: str
    generation: int
    count: int
    rows: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray


def feature_stats(
    store: StoreView,
    family: str,
    generation: int | None = None,
    episodes: Sequence[str | int] | None = None,
    rows_per_chunk: int = 4096,
) -> FeatureStats:
    """Per-dimension statistics of a feature family, streaming over the rows that are written.

    Rows are read ``rows_per_chunk`` at a time (memory stays bounded), each
    chunk reduced in float64 and merged with the running totals (Chan's
    update); bfloat16 rows are widened exactly. Missing rows are skipped.

    Args:
        store: an open store.
        family: the family.
        generation: default the current one.
        episodes: restrict to the rows of these episodes (names or positions).
        rows_per_chunk: rows per read.
    """
    reader = store.reader(family, generation)
    spec = reader.spec
    layout = reader.layout
    present = store.coverage(family, reader.generation)
    chosen = _resolve_episodes(store, episodes)
    if chosen is not None:
        wanted = np.zeros(layout.rows, dtype=bool)
        wanted[_episode_rows(np.asarray(layout.episode_rows, dtype=np.int64), chosen)] = True
        present = present & wanted
    rows = np.flatnonzero(present)
    shape = tuple(spec.row_shape)
    n, mean, m2 = 0, np.zeros(shape), np.zeros(shape)
    low, high = np.full(shape, np.inf), np.full(shape, -np.inf)
    for lo in range(0, len(rows), rows_per_chunk):
        chunk = rows[lo : lo + rows_per_chunk]
        if spec.ragged:
            parts = reader.rows(chunk)
            block = np.concatenate([as_float(np.asarray(p), spec.dtype) for p in parts]).reshape(-1, *shape)
        else:
            block = as_float(reader.gather(chunk), spec.dtype).reshape(-1, *shape)
        if not len(block):
            continue
        k = len(block)
        block_mean = block.mean(axis=0, dtype=np.float64)
        block_m2 = np.square(block - block_mean, dtype=np.float64).sum(axis=0)
        delta = block_mean - mean
        total = n + k
        mean = mean + delta * (k / total)
        m2 = m2 + block_m2 + np.square(delta) * (n * k / total)
        low = np.minimum(low, block.min(axis=0))
        high = np.maximum(high, block.max(axis=0))
        n = total
    std = np.sqrt(m2 / n) if n else np.full(shape, np.nan)
    if not n:
        mean, low, high = (np.full(shape, np.nan) for _ in range(3))
    return FeatureStats(family, reader.generation, n, len(rows), mean, std, low, high)
