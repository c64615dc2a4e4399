"""Looking at what a store holds, for notebooks: tables, statistics, projections, drift.

Every function returns plain numpy arrays, dicts or pandas objects, so users can
call them from their own notebooks; ``notebooks/inspect_store.ipynb`` is one
such notebook. The tables of the store and its families are built from
:func:`vlastore.report.store_info`, so they show the same figures as
``vlastore info``. Plot helpers take an optional matplotlib ``ax`` and return it.

pandas and matplotlib (the ``[notebook]`` extra) are imported inside the
functions that need them: ``import vlastore`` does not need them. Feature
values are read as float32 (bfloat16 from its bits, no torch needed); large
families are sampled (``max_rows`` rows, drawn with a seeded RNG).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import FamilyLayout
from .report import store_info
from .shardcodec import ChecksumError
from .store import VLAStore

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = [
    "STORE_ENV",
    "DEFAULT_MAX_ROWS",
    "EXACT_PCA_LIMIT",
    "open_store",
    "resolve_store_path",
    "store_summary",
    "manifest_table",
    "episode_table",
    "coverage_table",
    "missing_rows",
    "vlm_alignment",
    "to_float32",
    "sample_rows",
    "load_rows",
    "row_vectors",
    "family_stats",
    "stats_table",
    "pca",
    "project_rows",
    "episode_series",
    "vlm_boundaries",
    "families_with_generations",
    "generation_drift",
    "drift_summary",
    "plot_coverage",
    "plot_norms",
    "plot_histogram",
    "plot_projection",
    "plot_series",
    "plot_drift",
]

log = logging.getLogger(__name__)

STORE_ENV = "VLASTORE_STORE"
"""Environment variable naming the store :func:`open_store` opens by default."""

DEFAULT_MAX_ROWS = 2000
"""Rows sampled per family for statistics, projections and drift."""

EXACT_PCA_LIMIT = 512
"""Largest ``min(rows, columns)`` that :func:`pca` decomposes exactly (above: randomized SVD)."""

_BATCH_VALUES = 1 << 24
"""Values (float32) read at once: 64 MiB, whatever the row size (ragged rows can be 1,000 tokens of 2,048)."""
_ARRAY_KEYS = ("norms", "hist_counts", "hist_edges")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("vlastore.inspect tables need pandas: pip install 'vlastore[notebook]'") from None
    return pandas


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("vlastore.inspect plots need matplotlib: pip install 'vlastore[notebook]'") from None
    return plt.figure().add_subplot()


# ------------------------------------------------------------------ opening


def resolve_store_path(path: str | os.PathLike[str] | None = None) -> tuple[str, bool]:
    """The store to inspect and whether it was named (not the default demo store).

    ``path``, else ``$VLASTORE_STORE``, else ``vlastore-demo.vla`` in the working
    folder or its parent (a notebook runs in ``notebooks/``, ``vlastore demo``
    writes to the repository root).
    """
    from .demo import DEMO_PATH

    named = os.fspath(path) if path else os.environ.get(STORE_ENV, "")
    if named:
        return named, True
    for base in (Path.cwd(), Path.cwd().parent):
        if (base / DEMO_PATH / "zarr.json").exists():
            return str(base / DEMO_PATH), False
    return str(Path.cwd() / DEMO_PATH), False


def open_store(path: str | os.PathLike[str] | None = None, make_demo: bool = True) -> VLAStore:
    """Open a store read-only for inspection (see :func:`resolve_store_path`).

    When no store is named and the default demo store does not exist, it is
    made with :func:`vlastore.demo.make_demo_store` (unless ``make_demo=False``).

    Raises:
        StoreNotFoundError: a named store does not exist.
    """
    location, named = resolve_store_path(path)
    if not named and make_demo and not Path(location).exists():
        from .demo import make_demo_store

        log.info("no store named (argument or $%s): making the demo store %s", STORE_ENV, location)
        make_demo_store(location)
    return VLAStore.open(location)


# ------------------------------------------------------------------ tables (same figures as `vlastore info`)


def store_summary(store: VLAStore, info: dict[str, Any] | None = None) -> pd.Series:
    """The store-level figures of ``vlastore info`` as a Series."""
    pd = _pandas()
    info = info if info is not None else store_info(store)
    spe = info["steps_per_episode"]
    return pd.Series(
        {
            "store": info["store"],
            "format_version": info["format_version"],
            "vlastore_version": info["vlastore_version"],
            "created": info["created"],
            "episodes": info["episodes"],
            "steps": info["steps"],
            "steps_min": spe["min"],
            "steps_mean": spe["mean"],
            "steps_max": spe["max"],
            "series": ", ".join(f"{k} ({len(s['columns'])} x {s['dtype']})" for k, s in info["series"].items()),
            "families": len(info["families"]),
            "bytes_on_disk": info["bytes_on_disk"],
            "files": info["files"],
        },
        name="store",
        dtype=object,
    )


def manifest_table(store: VLAStore, info: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per family with every figure ``vlastore info`` has for it, plus ``coverage_pct``."""
    pd = _pandas()
    info = info if info is not None else store_info(store)
    records = []
    for name, fam in info["families"].items():
        record = {"family": name, **fam}
        record["coverage_pct"] = 100.0 * fam["rows_present"] / fam["rows"] if fam["rows"] else 100.0
        records.append(record)
    if not records:
        return pd.DataFrame(index=pd.Index([], name="family"))
    return pd.DataFrame.from_records(records).set_index("family")


def episode_table(store: VLAStore) -> pd.DataFrame:
    """The episode catalog: one row per episode with its steps and their global range."""
    pd = _pandas()
    catalog = store.catalog
    table = pd.DataFrame(
        {
            "episode": list(catalog.names),
            "steps": catalog.steps,
            "step_start": catalog.step_offsets[:-1],
            "step_stop": catalog.step_offsets[1:],
        }
    )
    for family in store.families:
        table[f"{family}_rows"] = np.diff(store.layout(family).episode_rows)
    return table.set_index("episode")


def _coverage_counts(store: VLAStore, family: str, generation: int | None) -> tuple[np.ndarray, np.ndarray]:
    layout = store.layout(family, generation)
    present = store.coverage(family, generation)
    per_episode = np.diff(layout.episode_rows)
    episodes = np.repeat(np.arange(len(per_episode)), per_episode)
    return per_episode, np.bincount(episodes, weights=present, minlength=len(per_episode)).astype(np.int64)


def coverage_table(store: VLAStore, families: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows planned and present per family and episode (current generations), long form.

    Columns: family, episode, rows, present, missing, fraction. Pivot it for a
    matrix: ``table.pivot(index="episode", columns="family", values="fraction")``.
    """
    pd = _pandas()
    parts = []
    for family in families if families is not None else store.families:
        rows, present = _coverage_counts(store, family, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            fraction = np.where(rows > 0, present / np.maximum(rows, 1), 1.0)
        parts.append(
            pd.DataFrame(
                {
                    "family": family,
                    "episode": list(store.catalog.names),
                    "rows": rows,
                    "present": present,
                    "missing": rows - present,
                    "fraction": fraction,
                }
            )
        )
    columns = ["family", "episode", "rows", "present", "missing", "fraction"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def missing_rows(store: VLAStore, family: str, generation: int | None = None, limit: int | None = 1000) -> pd.DataFrame:
    """Addresses of planned rows that are not stored: row, episode and item (e.g. ``vlm_idx``)."""
    pd = _pandas()
    layout = store.layout(family, generation)
    rows = np.flatnonzero(~store.coverage(family, generation))[:limit]
    episodes = layout.episode_of_rows(rows)
    return pd.DataFrame(
        {
            "row": rows,
            "episode": [store.catalog.names[e] for e in episodes.tolist()],
            layout.spec.index_name: rows - layout.episode_rows[episodes],
        }
    )


def vlm_alignment(store: VLAStore, family: str) -> pd.DataFrame:
    """Does every episode have ``ceil(steps / vlm_reuse_count)`` rows, one per ``vlm_idx``?

    Raises:
        ValueError: the family has no ``vlm_reuse_count`` (e.g. per-image features).
    """
    pd = _pandas()
    reuse = store.spec(family).vlm_reuse_count
    if reuse is None:
        raise ValueError(f"family {family!r} has no vlm_reuse_count: its rows are not tied to steps")
    steps = store.catalog.steps
    rows = np.diff(store.layout(family).episode_rows)
    expected = (steps + reuse - 1) // reuse
    return pd.DataFrame(
        {
            "episode": list(store.catalog.names),
            "steps": steps,
            "rows": rows,
            "expected_rows": expected,
            "aligned": rows == expected,
        }
    ).set_index("episode")


# ------------------------------------------------------------------ reading values


def to_float32(array: np.ndarray, true_dtype: str) -> np.ndarray:
    """Stored values as float32: bfloat16 (``uint16`` bits) is widened exactly, bits << 16."""
    if true_dtype == "bfloat16":
        return (np.asarray(array).astype(np.uint32) << 16).view(np.float32)
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
    budget = _BATCH_VALUES if budget is None else budget
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
    counts, edges = (
        np.histogram(sampled_values, bins=bins)
        if sampled_values.size
        else (np.zeros(bins, np.int64), np.linspace(0, 1, bins + 1))
    )
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


# ------------------------------------------------------------------ episodes


def episode_series(store: VLAStore, dataset: str | int, key: str) -> pd.DataFrame:
    """One episode's robot series ``key``: one row per step, one column per named column."""
    pd = _pandas()
    values = store.series(key, dataset)
    table = pd.DataFrame(values, columns=list(store.columns(key)))
    table.index.name = "step"
    return table


def vlm_boundaries(store: VLAStore, family: str, dataset: str | int) -> np.ndarray:
    """First step of every ``vlm_idx`` of an episode: ``0, r, 2r, ...`` with ``r = vlm_reuse_count``.

    Raises:
        ValueError: the family has no ``vlm_reuse_count``.
    """
    reuse = store.spec(family).vlm_reuse_count
    if reuse is None:
        raise ValueError(f"family {family!r} has no vlm_reuse_count: its rows are not tied to steps")
    lo, hi = store.catalog.step_range(dataset)
    return np.arange(0, hi - lo, reuse, dtype=np.int64)


# ------------------------------------------------------------------ generations


def families_with_generations(store: VLAStore) -> list[str]:
    """Families that have two or more generations in the store."""
    return [f for f in store.families if len(store.manifest.families[f].generations) >= 2]


def generation_drift(
    store: VLAStore,
    family: str,
    generation: int | None = None,
    previous: int | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> pd.DataFrame:
    """How far generation ``generation`` (default: the newest) moved from ``previous`` (the one before).

    Compares the rows stored in both: cosine similarity and relative L2
    ``|new - old| / |old|``. Ragged rows whose lengths changed are compared by
    their mean over token rows (``pooled``). Columns: row, episode, the item,
    cosine, rel_l2, pooled; rows corrupt in either generation get NaN (counted in
    ``attrs["unreadable"]``).

    Raises:
        ValueError: the family has fewer than two generations.
    """
    pd = _pandas()
    generations = sorted(store.manifest.families[family].generations)
    generation = generation if generation is not None else generations[-1]
    older = [g for g in generations if g < generation]
    if previous is None:
        if not older:
            raise ValueError(
                f"family {family!r} has generations {generations}: nothing older than {generation} to compare; "
                "rebuild it with store.new_generation(...) and keep the old one (switch_generation(remove_old=False))"
            )
        previous = older[-1]
    layout = store.layout(family, generation)
    both = store.coverage(family, generation) & store.coverage(family, previous)
    rows = sample_rows(both, max_rows, seed)
    cosine = np.full(rows.size, np.nan)
    rel_l2 = np.full(rows.size, np.nan)
    pooled = np.zeros(rows.size, dtype=bool)
    unreadable = 0
    start = 0
    for batch in _batches(layout, rows, _BATCH_VALUES // 2):
        new = dict(zip(*_readable(store, family, batch, generation), strict=True))
        old = dict(zip(*_readable(store, family, batch, previous), strict=True))
        for i, row in enumerate(batch.tolist(), start=start):
            if row not in new or row not in old:  # corrupt in one of them: NaN, counted
                unreadable += 1
                continue
            a, b = new[row], old[row]
            if a.shape != b.shape:
                a, b, pooled[i] = a.reshape(len(a), -1).mean(0), b.reshape(len(b), -1).mean(0), True
            a64, b64 = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
            norm_a, norm_b = np.linalg.norm(a64), np.linalg.norm(b64)
            with np.errstate(invalid="ignore", divide="ignore"):
                cosine[i] = float(a64 @ b64) / (norm_a * norm_b)
                rel_l2[i] = np.linalg.norm(a64 - b64) / norm_b
        start += batch.size
    episodes = layout.episode_of_rows(rows)
    table = pd.DataFrame(
        {
            "row": rows,
            "episode": [store.catalog.names[e] for e in episodes.tolist()],
            layout.spec.index_name: rows - layout.episode_rows[episodes],
            "cosine": cosine,
            "rel_l2": rel_l2,
            "pooled": pooled,
        }
    )
    table.attrs.update(
        family=family,
        generation=generation,
        previous=previous,
        rows_in_both=int(both.sum()),
        rows=layout.rows,
        unreadable=unreadable,
    )
    return table


def drift_summary(drift: pd.DataFrame) -> pd.Series:
    """Summary of a :func:`generation_drift` table: rows compared, cosine and relative-L2 spread."""
    pd = _pandas()
    return pd.Series(
        {
            "family": drift.attrs.get("family"),
            "generation": drift.attrs.get("generation"),
            "previous": drift.attrs.get("previous"),
            "rows_in_both": drift.attrs.get("rows_in_both"),
            "rows_compared": len(drift),
            "unchanged_rows": int((drift["rel_l2"] == 0).sum()),
            "cosine_min": drift["cosine"].min(),
            "cosine_median": drift["cosine"].median(),
            "rel_l2_median": drift["rel_l2"].median(),
            "rel_l2_p95": drift["rel_l2"].quantile(0.95) if len(drift) else float("nan"),
            "rel_l2_max": drift["rel_l2"].max(),
        },
        dtype=object,
    )


# ------------------------------------------------------------------ plots


def plot_coverage(coverage: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Fraction of rows present per episode (rows) and family (columns) of a :func:`coverage_table`."""
    ax = _axes(ax)
    matrix = coverage.pivot(index="episode", columns="family", values="fraction")
    matrix = matrix.reindex(index=list(dict.fromkeys(coverage["episode"])))
    image = ax.imshow(
        matrix.to_numpy(dtype=float), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest"
    )
    ax.set_xticks(range(matrix.shape[1]), list(matrix.columns), rotation=30, ha="right")
    if matrix.shape[0] <= 40:
        ax.set_yticks(range(matrix.shape[0]), list(matrix.index), fontsize=7)
    ax.set_ylabel("episode")
    ax.set_title("fraction of rows present")
    ax.figure.colorbar(image, ax=ax)
    return ax


def plot_norms(stats: dict[str, Any], ax: Axes | None = None, bins: int = 50) -> Axes:
    """Histogram of the row (token row) L2 norms of a :func:`family_stats` result."""
    ax = _axes(ax)
    norms = stats["norms"][np.isfinite(stats["norms"])]
    ax.hist(norms, bins=bins, color="tab:blue")
    ax.set_xlabel("L2 norm per token row" if stats["ragged"] else "L2 norm per row")
    ax.set_ylabel("rows")
    ax.set_title(f"{stats['family']}: row norms ({stats['rows_sampled']:,} rows sampled)")
    return ax


def plot_histogram(stats: dict[str, Any], ax: Axes | None = None) -> Axes:
    """The value histogram of a :func:`family_stats` result (log counts)."""
    ax = _axes(ax)
    ax.stairs(stats["hist_counts"], stats["hist_edges"], fill=True, color="tab:orange")
    if np.any(stats["hist_counts"]):  # an empty sample has nothing to put on a log scale
        ax.set_yscale("log")
    ax.set_xlabel(f"value ({stats['dtype']})")
    ax.set_ylabel("count")
    ax.set_title(f"{stats['family']}: values (NaN {stats['nan']:,}, Inf {stats['inf']:,})")
    return ax


def plot_projection(projection: pd.DataFrame, ax: Axes | None = None, max_legend: int = 12) -> Axes:
    """Scatter of a :func:`project_rows` table, coloured by episode (a legend up to ``max_legend`` episodes)."""
    ax = _axes(ax)
    names = list(dict.fromkeys(projection["episode"]))
    if len(names) <= max_legend:
        for name, group in projection.groupby("episode", sort=False):
            ax.scatter(group["pc1"], group["pc2"], s=8, label=name)
        if names:
            ax.legend(fontsize=7, loc="best", markerscale=2)
    else:  # too many episodes to name: a colour ramp over episode positions
        codes = projection["episode"].map({n: i for i, n in enumerate(names)})
        points = ax.scatter(projection["pc1"], projection["pc2"], c=codes, cmap="viridis", s=8)
        ax.figure.colorbar(points, ax=ax, label="episode (store order)")
    ratio = projection.attrs.get("explained_variance_ratio", [float("nan")] * 2)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% var)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% var)")
    ax.set_title(f"{projection.attrs.get('family', '')}: {len(projection):,} rows, by episode")
    return ax


def plot_series(
    store: VLAStore, dataset: str | int, key: str, family: str | None = None, ax: Axes | None = None
) -> Axes:
    """One episode's robot series ``key`` over steps; ``family`` marks its ``vlm_idx`` boundaries."""
    ax = _axes(ax)
    table = episode_series(store, dataset, key)
    for column in table.columns:
        ax.plot(table.index, table[column], label=column, linewidth=1)
    title = f"{key}: {store.catalog.names[store.catalog.resolve(dataset)]}"
    if family is not None:
        boundaries = vlm_boundaries(store, family, dataset)
        ax.vlines(boundaries, 0, 1, transform=ax.get_xaxis_transform(), colors="grey", linestyles=":", linewidth=0.7)
        title += f" (dotted: {family} vlm_idx starts, every {store.spec(family).vlm_reuse_count} steps)"
    if len(table.columns) <= 10:
        ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    return ax


def plot_drift(drift: pd.DataFrame, ax: Axes | None = None, metric: str = "rel_l2", bins: int = 40) -> Axes:
    """Histogram of one column (``rel_l2`` or ``cosine``) of a :func:`generation_drift` table."""
    ax = _axes(ax)
    values = drift[metric].to_numpy(dtype=float)
    ax.hist(values[np.isfinite(values)], bins=bins, color="tab:red")
    ax.locator_params(axis="x", nbins=5)
    ax.set_xlabel("relative L2 |new - old| / |old|" if metric == "rel_l2" else "cosine similarity")
    ax.set_ylabel("rows")
    ax.set_title(
        f"{drift.attrs.get('family', '')}: generation {drift.attrs.get('generation')} "
        f"vs {drift.attrs.get('previous')} ({len(drift):,} rows)"
    )
    return ax
