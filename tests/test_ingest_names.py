"""Planning a cache from its file names (names.py) gives the plan the file-list planner gives, in any folder order."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vlastore.ingest.names import sample_rows, scan_names
from vlastore.ingest.plan import ScannedFile, place_rows, plan_catalog
from vlastore.ingest.scan import NAME_PATTERN, place_pt_cache

EPISODES = ["ep_a", "ep_b", "x_vlm3", "ep c", "0"]  # "ep c" is no store name; "x_vlm3" holds the separator
INDEXES = st.one_of(st.integers(0, 40), st.integers(250, 700), st.integers(10**11, 10**12))


@st.composite
def cache_names(draw: st.DrawFn) -> list[str]:
    names = set()
    for _ in range(draw(st.integers(0, 60))):
        episode = draw(st.sampled_from(EPISODES))
        index = draw(INDEXES)
        digits = draw(st.sampled_from([str(index), f"0{index}", f"{index:020d}"]))  # leading zeros, too long
        names.add(f"{episode}_vlm{digits}.pt")
    names.update(draw(st.sets(st.sampled_from(["notes.txt", "ep_a_vlm1.ptx"]))))
    return sorted(names)


def _list_plan(folder: Path, names: list[str], store: tuple[list[str], np.ndarray] | None, reuse: int):
    """What the file-list planner makes of the same folder (every file taken as readable)."""
    files = [ScannedFile(str(folder / n), 0) for n in names if n.endswith(".pt")]
    items, problems = place_pt_cache(files, NAME_PATTERN)
    catalog = plan_catalog(items, store, reuse, rows_by_count=False)
    placed, more = place_rows(files, items, catalog, "vlm_idx")
    return catalog, {row: files[item.file].path for row, item in placed.items()}, problems + more


@settings(max_examples=60, deadline=None)
@given(names=cache_names(), into=st.booleans(), reuse=st.integers(1, 3))
def test_name_plan_equals_the_file_list_plan(names: list[str], into: bool, reuse: int) -> None:
    store = (["ep_a", "x_vlm3", "ep_z"], np.array([30, 4, 9])) if into else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            (folder / name).touch()
        named = scan_names(str(folder), NAME_PATTERN, store, reuse)
        catalog, placed, problems = _list_plan(folder, names, store, reuse)
    assert named is not None
    assert named.catalog.names == catalog.names
    assert named.catalog.items.tolist() == catalog.items.tolist()
    assert named.catalog.steps.tolist() == catalog.steps.tolist()
    rows = np.flatnonzero(named.sources.has_source)
    assert rows.tolist() == sorted(placed)
    assert named.sources.paths(rows) == [placed[r] for r in rows.tolist()]
    assert sorted((p.path, p.reason, p.message) for p in named.problems.listed) == sorted(
        (p.path, p.reason, p.message) for p in problems
    )
    assert named.found == sum(n.endswith(".pt") for n in names)
    assert named.others == len(names) - named.found


def test_a_name_without_a_key_asks_for_the_file_list(tmp_path: Path) -> None:
    (tmp_path / "ep_a_vlm0.pt").touch()
    (tmp_path / "00002a20a20e3399f3c7d146.pt").touch()  # the key is inside the file (or in a mapping)
    assert scan_names(str(tmp_path), NAME_PATTERN, None, 3) is None


def test_other_patterns_keep_each_file_name(tmp_path: Path) -> None:
    for name in ("a-3.pt", "a-0.pt", "b-1.pt"):
        (tmp_path / name).touch()
    named = scan_names(str(tmp_path), r"^(?P<dataset>[a-z]+)-(?P<index>\d+)\.pt$", None, 1)
    assert named is not None and named.catalog.names == ["a", "b"]
    rows = np.flatnonzero(named.sources.has_source)
    assert named.sources.paths(rows) == [os.path.join(tmp_path, n) for n in ("a-0.pt", "a-3.pt", "b-1.pt")]


@settings(deadline=None)  # a loaded machine must not fail it
@given(has=st.lists(st.booleans(), max_size=300), count=st.integers(1, 70))
def test_sample_rows_spreads_over_rows_with_a_source(has: list[bool], count: int) -> None:
    has_source = np.array(has, dtype=bool)
    picked = sample_rows(has_source, count)
    rows = np.flatnonzero(has_source)
    expected = np.unique(np.linspace(0, len(rows) - 1, min(count, len(rows))).astype(np.int64)) if len(rows) else []
    assert picked.tolist() == rows[expected].tolist()
