"""The episode catalog (pure numpy) and its round trip through a store."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlastore.catalog import Catalog
from vlastore.format import FormatError
from vlastore.store import EpisodeData, VLAStore

NAME_CHARS = st.sampled_from("abcXYZ019._-+=@,:~")
names = st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda n: ".." not in n and n != ".")
catalogs = st.lists(st.tuples(names, st.integers(0, 50)), max_size=12, unique_by=lambda p: p[0])


@given(catalogs)
def test_offsets_partition_the_steps(pairs: list[tuple[str, int]]) -> None:
    catalog = Catalog.from_pairs(pairs)
    assert len(catalog) == len(pairs)
    assert catalog.total_steps == sum(n for _, n in pairs)
    for i, (name, n) in enumerate(pairs):
        assert catalog.index(name) == i
        lo, hi = catalog.step_range(name)
        assert hi - lo == n
        assert catalog.step_range(i) == (lo, hi)
    assert np.all(np.diff(catalog.step_offsets) >= 0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(catalogs.filter(bool))
def test_catalog_round_trips_through_a_store(pairs: list[tuple[str, int]]) -> None:
    store = VLAStore.create(zarr.storage.MemoryStore(), [EpisodeData(n, steps=s) for n, s in pairs])
    again = VLAStore.open(store.storage.zarr_store())
    assert again.catalog == Catalog.from_pairs(pairs)
    assert again.datasets == tuple(n for n, _ in pairs)


def test_duplicate_names_name_both_positions() -> None:
    with pytest.raises(FormatError, match=r"duplicate episode name 'a' \(episodes #0 and #2\)"):
        Catalog(["a", "b", "a"], [1, 2, 3])


def test_counts_must_match_and_be_non_negative() -> None:
    with pytest.raises(FormatError, match="2 names but 3 step counts"):
        Catalog(["a", "b"], [1, 2, 3])
    with pytest.raises(FormatError, match="episode 'b' has -1 steps"):
        Catalog(["a", "b"], [1, -1])


def test_unknown_dataset_lists_some_that_exist() -> None:
    catalog = Catalog([f"ep{i}" for i in range(8)], [1] * 8)
    with pytest.raises(KeyError, match=r"unknown dataset 'nope'.*8 episodes.*'ep0'.*and 3 more"):
        catalog.index("nope")
    with pytest.raises(IndexError, match="episode #8 out of range"):
        catalog.resolve(8)
