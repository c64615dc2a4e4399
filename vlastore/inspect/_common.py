"""Constants and lazy imports shared by the inspection helpers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

__all__ = ["STORE_ENV", "DEFAULT_MAX_ROWS", "EXACT_PCA_LIMIT", "histogram"]

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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


def histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram`` of the finite ``values`` that never fails on the data it is given.

    numpy refuses ranges narrower than the float resolution of ``bins`` edges
    ("Too many bins for data range"), which is exactly what a rebuild that changed
    nothing gives (cosines of 1 +- 1 ulp). Empty input gives zero counts over [0, 1];
    a (nearly) constant one, ``bins`` bins around the value.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(bins, np.int64), np.linspace(0.0, 1.0, bins + 1)
    low, high = float(values.min()), float(values.max())
    # below this width the edges are not distinct floats: centre a small range on the data instead
    min_width = max(abs(low), abs(high), 1.0) * 1e-9 * bins
    if high - low < min_width:
        centre = 0.5 * (low + high)
        low, high = centre - min_width / 2, centre + min_width / 2
    return np.histogram(values, bins=bins, range=(low, high))
