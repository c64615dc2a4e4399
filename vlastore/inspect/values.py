"""Reading feature values as float32, statistics and 2-D projections."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import widen_bfloat16
from ..layout import FamilyLayout
from ..shardcodec import ChecksumError
from ..store import VLAStore
from . import _common
from ._common import _ARRAY_KEYS, DEFAULT_MAX_ROWS, EXACT_PCA_LIMIT, _pandas, histogram

__all__ = [
    "to_float32",
    "sample_rows",
    "load_rows",
    "row_vectors",
    "family_stats",
    "stats_table",
    "pca",
    "project_rows",
]

if TYPE_CHECKING:
    import pandas as pd

# ------------------------------------------------------------------ reading values


def to_float32(array: np.ndarray, true_dtype: str) -> np.ndarray:
    """Stored values as float32: bfloat16 (``uint16`` bits) is widened exactly, bits << 16."""
    if true_dtype == "bfloat16":
        return widen_bfloat16(array)
    return np.asarray(array, dtype=np.float32)


def sample_rows(present: np.ndarray, max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0) -> np.ndarray:
    """Ascending row numbers of the stored rows (``present`` is a coverage mask), at most ``max_rows``."""
    rows = np.flatnonzero(present)
    if max_rows is not None and rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return rows


def load_rows(
    store: VLAStore, family: str, rows: Sequence[int] | np.ndarray, generation: int | None = None
) -> list[np.ndarray]:
    """Rows as float32 arrays (``row_shape``, or ``[L, *row_shape]`` when ragged).

    Raises:
        MissingRowError: a row is not stored. ChecksumError: a row is corrupt.
    """
    reader = store.reader(family, generation)
    dtype = reader.spec.dtype
    return [to_float32(value, dtype) for value in reader.rows(rows)]


def row_vectors(values: Sequence[np.ndarray], ragged: bool) -> np.ndarray:
    """One flat vector per row, ``[n, D]``: ragged rows are averaged over their token rows."""
    if not values:
        return np.zeros((0, 0), dtype=np.float32)
    if ragged:
        return np.stack([v.reshape(len(v), -1).mean(axis=0) for v in values])
    return np.stack([v.reshape(-1) for v in values])


def _batches(layout: FamilyLayout, rows: np.ndarray, budget: int | None = None) -> Iterator[np.ndarray]:
    """``rows`` cut into consecutive batches of at most ``budget`` values each (or one row, if bigger)."""
    budget = _common._BATCH_VALUES if budget is None else budget
    width = int(np.prod(layout.spec.row_shape))
    ends = np.cumsum(layout.lengths[rows] * width)
    start = 0
    while start < rows.size:
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + budget, side="right")))
        yield rows[start:stop]
        start = stop


def _readable(
    store: VLAStore, family: str, rows: np.ndarray, generation: int | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows as :func:`load_rows` gives them, leaving out corrupt ones (``vlastore verify`` names them)."""
    try:
        return rows, load_rows(store, family, rows, generation)
    except ChecksumError:
        pass
    kept, values = [], []
    for row in rows.tolist():
        try:
            values.append(load_rows(store, family, [row], generation)[0])
            kept.append(row)
        except ChecksumError:
            continue
    return np.asarray(kept, dtype=np.int64), values


# ------------------------------------------------------------------ statistics


def family_stats(
    store: VLAStore,
    family: str,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
    generation: int | None = None,
    bins: int = 64,
    max_values: int = 1_000_000,
) -> dict[str, Any]:
    """Statistics of the stored values of a family, over a sample of its rows.

    Ragged families are counted over token rows. NaN/Inf are counted; min, max,
    mean, std and the histogram use the finite values only.

    Returns:
        A dict of scalars (family, generation, dtype, ragged, rows, rows_present,
        rows_sampled, token_rows, values, nan, inf, unreadable, min, max, mean,
        std, norm_min, norm_mean, norm_max) and arrays: ``norms`` (L2 norm of
        every sampled (token) row), ``hist_counts``/``hist_edges`` (histogram of
        up to ``max_values`` finite values).
    """
    info = store.generation(family, generation)
    present = store.coverage(family, info.generation)
    rows = sample_rows(present, max_rows, seed)
    layout = store.layout(family, info.generation)
    width = int(np.prod(info.spec.row_shape))
    keep_fraction = min(1.0, max_values / max(1, int(layout.lengths[rows].sum()) * width))
    rng = np.random.default_rng(seed)
    nan = inf = count = unreadable = 0
    total = total_sq = 0.0
    low, high = np.inf, -np.inf
    norms, kept_values = [], []
    for batch in _batches(layout, rows):
        kept, values = _readable(store, family, batch, info.generation)
        unreadable += batch.size - kept.size
        if not values:
            continue
        flat = np.concatenate([v.reshape(-1, width) for v in values])
        squares = np.einsum("ij,ij->i", flat, flat)  # per (token) row; NaN/Inf propagate
        norms.append(np.sqrt(squares))
        finite_mask = np.isfinite(flat)
        if finite_mask.all():  # the common case: no masked copy
            finite = flat.reshape(-1)
            total_sq += float(squares.sum(dtype=np.float64))
        else:
            nan += int(np.isnan(flat).sum())
            inf += int(np.isinf(flat).sum())
            finite = flat[finite_mask]
            total_sq += float(np.square(finite, dtype=np.float64).sum())
        if finite.size:
            count += finite.size
            total += float(finite.sum(dtype=np.float64))
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
            if keep_fraction < 1:  # the histogram sees a uniform sample of the values
                finite = finite[rng.integers(0, finite.size, size=rng.binomial(finite.size, keep_fraction))]
            kept_values.append(finite)
    norm_array = np.concatenate(norms) if norms else np.zeros(0)
    sampled_values = np.concatenate(kept_values) if kept_values else np.zeros(0)
    counts, edges = histogram(sampled_values, bins)
    mean = total / count if count else float("nan")
    finite_norms = norm_array[np.isfinite(norm_array)]
    return {
        "family": family,
        "generation": info.generation,
        "dtype": info.spec.dtype,
        "ragged": info.spec.ragged,
        "rows": info.rows,
        "rows_present": int(present.sum()),
        "rows_sampled": int(rows.size - unreadable),
        "token_rows": int(norm_array.size),
        "values": int(norm_array.size) * width,
        "nan": nan,
        "inf": inf,
        "unreadable": unreadable,
        "min": low if count else float("nan"),
        "max": high if count else float("nan"),
        "mean": mean,
        "std": float(np.sqrt(max(0.0, total_sq / count - mean * mean))) if count else float("nan"),
        "norm_min": float(finite_norms.min()) if finite_norms.size else float("nan"),
        "norm_mean": float(finite_norms.mean()) if finite_norms.size else float("nan"),
        "norm_max": float(finite_norms.max()) if finite_norms.size else float("nan"),
        "norms": norm_array,
        "hist_counts": counts,
        "hist_edges": edges,
    }


def stats_table(stats: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The scalars of several :func:`family_stats` results, one row per family."""
    pd = _pandas()
    return pd.DataFrame([{k: v for k, v in s.items() if k not in _ARRAY_KEYS} for s in stats]).set_index("family")


# ------------------------------------------------------------------ projection


def pca(x: np.ndarray, components: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component coordinates of the rows of ``x`` and their explained-variance ratios.

    numpy only: while rows or columns number at most :data:`EXACT_PCA_LIMIT`, an
    exact eigendecomposition of the smaller Gram/covariance matrix; above, a
    seeded randomized SVD (range finder with power iterations) that finds the
    leading components at a fraction of the cost of a full SVD. Signs are fixed
    (largest loading positive) so the same data gives the same picture.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    coords = np.zeros((n, components))
    ratio = np.zeros(components)
    if n < 2 or x.size == 0:
        return coords, ratio
    centred = x - x.mean(axis=0)
    k = min(components, *centred.shape)
    if min(centred.shape) <= EXACT_PCA_LIMIT:
        u, s, vt = _eigen_svd(centred, k)
    else:
        u, s, vt = _randomized_svd(centred, k, seed)
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)])
    signs[signs == 0] = 1
    coords[:, :k] = u * s * signs
    total = float(np.square(centred).sum())
    if total > 0:
        ratio[:k] = s**2 / total
    return coords, ratio


def _eigen_svd(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``k`` singular triplets of ``x`` from the eigenvectors of its smaller Gram matrix."""
    small_side_columns = x.shape[1] <= x.shape[0]
    values, vectors = np.linalg.eigh(x.T @ x if small_side_columns else x @ x.T)
    order = np.argsort(values)[::-1][:k]
    s = np.sqrt(np.maximum(values[order], 0.0))
    safe = np.where(s > 0, s, 1.0)
    if small_side_columns:
        vt = vectors[:, order].T
        return (x @ vt.T) / safe, s, vt
    u = vectors[:, order]
    return u, s, (u.T @ x) / safe[:, None]


def _randomized_svd(
    x: np.ndarray, k: int, seed: int, oversample: int = 10, power_iterations: int = 7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``k`` singular triplets of ``x`` (Halko, Martinsson & Tropp 2011, algorithm 4.4)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(x @ rng.normal(size=(x.shape[1], k + oversample)))
    for _ in range(power_iterations):
        basis, _ = np.linalg.qr(x.T @ basis)
        basis, _ = np.linalg.qr(x @ basis)
    u_small, s, vt = np.linalg.svd(basis.T @ x, full_matrices=False)
    return basis @ u_small[:, :k], s[:k], vt[:k]


def project_rows(
    store: VLAStore,
    family: str,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
    generation: int | None = None,
    components: int = 2,
) -> pd.DataFrame:
    """A PCA projection of (a sample of) the stored rows, one per row (ragged: per-row mean).

    Columns: row, episode, the item (e.g. ``vlm_idx``), pc1..pcN. ``attrs`` holds
    ``explained_variance_ratio`` and ``dropped_nonfinite`` (rows with NaN/Inf, left out).
    """
    pd = _pandas()
    layout = store.layout(family, generation)
    kept, pooled = [], []
    for batch in _batches(layout, sample_rows(store.coverage(family, generation), max_rows, seed)):
        rows, values = _readable(store, family, batch, generation)
        kept.append(rows)
        pooled.append(row_vectors(values, layout.spec.ragged).astype(np.float64))
    rows = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    vectors = np.concatenate([v for v in pooled if v.size]) if rows.size else np.zeros((0, 0))
    finite = np.isfinite(vectors).all(axis=1) if vectors.size else np.ones(rows.size, dtype=bool)
    rows, vectors = rows[finite], vectors[finite]
    coords, ratio = pca(vectors, components, seed)
    episodes = layout.episode_of_rows(rows)
    table = pd.DataFrame(
        {
            "row": rows,
            "episode": [store.catalog.names[e] for e in episodes.tolist()],
            layout.spec.index_name: rows - layout.episode_rows[episodes],
            **{f"pc{i + 1}": coords[:, i] for i in range(components)},
        }
    )
    table.attrs["explained_variance_ratio"] = ratio.tolist()
    table.attrs["dropped_nonfinite"] = int((~finite).sum())
    table.attrs["family"] = family
    return table
