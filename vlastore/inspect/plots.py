"""matplotlib views of the tables; each takes an optional ``ax`` and returns it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..store import VLAStore
from ._common import _axes, histogram
from .episodes import episode_series, vlm_boundaries

__all__ = ["plot_coverage", "plot_norms", "plot_histogram", "plot_projection", "plot_series", "plot_drift"]

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

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
    counts, edges = histogram(stats["norms"], bins)
    ax.stairs(counts, edges, fill=True, color="tab:blue")
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
    counts, edges = histogram(drift[metric].to_numpy(dtype=float), bins)
    ax.stairs(counts, edges, fill=True, color="tab:red")
    ax.locator_params(axis="x", nbins=5)
    ax.set_xlabel("relative L2 |new - old| / |old|" if metric == "rel_l2" else "cosine similarity")
    ax.set_ylabel("rows")
    ax.set_title(
        f"{drift.attrs.get('family', '')}: generation {drift.attrs.get('generation')} "
        f"vs {drift.attrs.get('previous')} ({len(drift):,} rows)"
    )
    return ax
