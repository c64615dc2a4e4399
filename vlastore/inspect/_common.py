"""Constants and lazy imports shared by the inspection helpers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__all__ = ["STORE_ENV", "DEFAULT_MAX_ROWS", "EXACT_PCA_LIMIT"]

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
