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

from ._common import DEFAULT_MAX_ROWS, EXACT_PCA_LIMIT, STORE_ENV
from .drift import drift_summary, families_with_generations, generation_drift
from .episodes import episode_series, vlm_boundaries
from .plots import plot_coverage, plot_drift, plot_histogram, plot_norms, plot_projection, plot_series
from .tables import (
    coverage_table,
    episode_table,
    manifest_table,
    missing_rows,
    open_store,
    resolve_store_path,
    store_summary,
    vlm_alignment,
)
from .values import family_stats, load_rows, pca, project_rows, row_vectors, sample_rows, stats_table, to_float32

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
