"""Opening a store and its tables: the same figures as ``vlastore info``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..format import META_NAME
from ..report import store_info
from ..store import VLAStore
from ._common import STORE_ENV, _pandas, log

__all__ = [
    "open_store",
    "resolve_store_path",
    "store_summary",
    "manifest_table",
    "episode_table",
    "coverage_table",
    "missing_rows",
    "vlm_alignment",
]

if TYPE_CHECKING:
    import pandas as pd

# ------------------------------------------------------------------ opening


def resolve_store_path(path: str | os.PathLike[str] | None = None) -> tuple[str, bool]:
    """The store to inspect and whether it was named (not the default demo store).

    ``path``, else ``$VLASTORE_STORE``, else ``vlastore-demo.vla`` in the working
    folder or its parent (a notebook runs in ``notebooks/``, ``vlastore demo``
    writes to the repository root).
    """
    from ..demo import DEMO_PATH

    named = os.fspath(path) if path else os.environ.get(STORE_ENV, "")
    if named:
        return named, True
    for base in (Path.cwd(), Path.cwd().parent):
        if (base / DEMO_PATH / META_NAME).exists():
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
        from ..demo import make_demo_store

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
