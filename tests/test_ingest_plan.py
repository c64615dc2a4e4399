"""Planning is pure: the same scanned files always give the same families, rows and problems."""

from __future__ import annotations

import numpy as np
import pytest

from vlastore.ingest.plan import Item, ScannedFile, core_shape, plan_catalog, plan_families


def _files(shapes: list[tuple[int, ...]], dtype: str = "bfloat16") -> list[ScannedFile]:
    return [ScannedFile(f"/c/f{i}.pt", 10, None, {"": (s, dtype, True)}) for i, s in enumerate(shapes)]


@pytest.mark.parametrize(
    ("shape", "core"), [((1, 2048), (2048,)), ((1, 1, 5, 8), (5, 8)), ((3, 1), (3, 1)), ((1,), ())]
)
def test_core_shape_drops_leading_batch_dims_only(shape: tuple[int, ...], core: tuple[int, ...]) -> None:
    assert core_shape(shape) == core


def test_fixed_family_and_shape_outlier() -> None:
    files = _files([(1, 8)] * 5 + [(1, 9)])
    items = [Item(i, "ep", i) for i in range(6)]
    catalog = plan_catalog(items, None, 3, rows_by_count=False)
    assert catalog.names == ["ep"] and catalog.steps.tolist() == [18]
    (plan,), problems = plan_families(files, items, catalog, "f")
    assert plan.spec.row_shape == (8,) and not plan.spec.ragged
    assert plan.sources.row_file.tolist() == [0, 1, 2, 3, 4, -1]
    assert [(p.path, p.reason) for p in problems] == [("/c/f5.pt", "wrong-shape")]


def test_ragged_family_lengths_with_a_length_one_row() -> None:
    files = _files([(1, 3, 4), (1, 1, 4), (1, 7, 4), (1, 2, 4)])
    items = [Item(i, "ep", i) for i in range(4)]
    catalog = plan_catalog(items, None, 1, rows_by_count=False)
    (plan,), problems = plan_families(files, items, catalog, "tok")
    assert plan.spec.ragged and plan.spec.row_shape == (4,) and not problems
    assert plan.lengths is not None and plan.lengths.tolist() == [3, 1, 7, 2]


def test_catalog_from_store_and_holes() -> None:
    files = _files([(8,)] * 3)
    items = [Item(0, "b", 0), Item(1, "b", 4), Item(2, "zzz", 0)]
    catalog = plan_catalog(items, (["a", "b"], np.array([7, 9])), 3, rows_by_count=False)
    assert catalog.items.tolist() == [3, 3]
    (plan,), problems = plan_families(files, items, catalog, "f", vlm_reuse_count=3)
    assert plan.sources.row_file.tolist() == [-1, -1, -1, 0, -1, -1]
    assert sorted(p.reason for p in problems) == ["index-out-of-range", "unknown-episode"]


def test_duplicates_keep_the_higher_priority_then_first_path() -> None:
    files = _files([(8,)] * 3)
    items = [Item(2, "ep", 0, priority=2), Item(1, "ep", 0, priority=0), Item(0, "ep", 0, priority=0)]
    catalog = plan_catalog(items, None, 1, rows_by_count=False)
    (plan,), problems = plan_families(files, items, catalog, "f")
    assert plan.sources.row_file.tolist() == [0]
    assert sorted(p.path for p in problems) == ["/c/f1.pt", "/c/f2.pt"]
    assert {p.reason for p in problems} == {"duplicate-key"}


def test_unusable_episode_names_are_problems_not_crashes() -> None:
    files = _files([(8,)] * 2)
    items = [Item(0, "good_ep", 0), Item(1, "bad ep/x", 0)]
    catalog = plan_catalog(items, None, 1, rows_by_count=False)
    assert catalog.names == ["good_ep"]
    (plan,), problems = plan_families(files, items, catalog, "f")
    assert plan.sources.row_file.tolist() == [0] and [p.reason for p in problems] == ["bad-name"]
