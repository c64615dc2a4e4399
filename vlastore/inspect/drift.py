"""How far a rebuilt generation of a family moved from the one before."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..store import VLAStore
from . import _common
from ._common import DEFAULT_MAX_ROWS, _pandas
from .values import _batches, _readable, sample_rows

__all__ = ["families_with_generations", "generation_drift", "drift_summary"]

if TYPE_CHECKING:
    import pandas as pd

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
                "rebuild it with store.new_generation(...) and keep the old one (switch_generation(keep_previous=None))"
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
    for batch in _batches(layout, rows, _common._BATCH_VALUES // 2):
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
