"""One episode's robot series and where its ``vlm_idx`` rows start."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..store import VLAStore
from ._common import _pandas

__all__ = ["episode_series", "vlm_boundaries"]

if TYPE_CHECKING:
    import pandas as pd

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
