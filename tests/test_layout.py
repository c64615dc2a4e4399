"""Row numbering and shard geometry (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlastore.format import FamilySpec, FormatError
from vlastore.layout import FamilyLayout, pack_ragged, packing_ok, vlm_items


@given(st.integers(1, 64).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))))
def test_pack_ragged_never_crosses_a_shard_and_wastes_only_at_shard_ends(case: tuple[int, list[int]]) -> None:
    capacity, lengths_list = case
    lengths = np.asarray(lengths_list, dtype=np.int64)
    starts = pack_ragged(lengths, capacity)
    ends = starts + lengths
    assert np.all(starts // capacity == (ends - 1) // capacity)  # no row crosses a shard boundary
    assert np.all(starts[1:] >= ends[:-1])  # in order, no overlap
    for prev_end, start, n in zip(ends[:-1].tolist(), starts[1:].tolist(), lengths[1:].tolist(), strict=False):
        # a gap only when the row did not fit in the rest of the shard
        if start != prev_end:
            assert start % capacity == 0 and prev_end // capacity != (prev_end + n - 1) // capacity
    if lengths.size:
        assert starts[0] == 0


def test_pack_ragged_refuses_rows_longer_than_a_shard() -> None:
    with pytest.raises(FormatError, match=r"ragged row #1 has 9 token rows.*rows_per_shard >= 9"):
        pack_ragged(np.array([2, 9]), 8)
    with pytest.raises(FormatError, match="length 0"):
        pack_ragged(np.array([2, 0]), 8)


@given(
    st.lists(st.integers(0, 7), min_size=1, max_size=10),
    st.integers(1, 9),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_every_row_has_one_home(items: list[int], rows_per_shard: int, ragged: bool, rnd) -> None:
    spec = FamilySpec((2,), "float16", ragged=ragged, rows_per_shard=rows_per_shard)
    n = sum(items)
    lengths = [rnd.randint(1, rows_per_shard) for _ in range(n)] if ragged else None
    layout = FamilyLayout.plan(spec, items, lengths)
    assert layout.rows == n
    seen = []
    for e, count in enumerate(items):
        for i in range(count):
            row = layout.row(e, i)
            assert layout.address(row) == (e, i)
            seen.append(row)
    assert seen == list(range(n))
    # shards partition the rows, and each row's token rows lie in its shard
    by_shard = [layout.shard_rows(s) for s in range(layout.n_shards)]
    assert np.array_equal(np.concatenate(by_shard) if by_shard else np.zeros(0), np.arange(n))
    for s, rows in enumerate(by_shard):
        for r in rows.tolist():
            lo = int(layout.starts[r]) - s * rows_per_shard
            assert lo >= 0 and lo + int(layout.lengths[r]) <= layout.shard_nrows(s)
            chunks = np.arange(lo, lo + int(layout.lengths[r]))
            assert np.all(layout.rows_of_chunks(s, chunks) == r)
    assert layout.n_shards * rows_per_shard >= layout.capacity


def test_vlm_items_rounds_up() -> None:
    assert vlm_items([0, 1, 3, 4, 7], 3).tolist() == [0, 1, 1, 2, 3]


def test_out_of_range_index_names_the_range() -> None:
    layout = FamilyLayout.plan(FamilySpec((2,), "float32", rows_per_shard=4), [3, 2])
    with pytest.raises(IndexError, match=r"vlm_idx=2 out of range.*2 rows \(vlm_idx 0..1\)"):
        layout.row(1, 2)
    with pytest.raises(IndexError):
        layout.row(0, -1)


def test_plan_checks_lengths() -> None:
    ragged = FamilySpec((2,), "float32", ragged=True, rows_per_shard=4)
    with pytest.raises(FormatError, match="needs the length of every row"):
        FamilyLayout.plan(ragged, [2])
    with pytest.raises(FormatError, match="got 1 lengths for 2 rows"):
        FamilyLayout.plan(ragged, [2], [1])
    with pytest.raises(FormatError, match="only for ragged"):
        FamilyLayout.plan(FamilySpec((2,), "float32"), [2], [1, 1])


# ------------------------------------------------------------------ issue 9: tables read from disk are checked


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 7), max_size=40), st.integers(7, 12), st.integers(0, 39), st.integers(-3, 3))
def test_packing_check_accepts_exactly_what_pack_ragged_makes(lengths, capacity, at, delta) -> None:
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = pack_ragged(lengths, capacity)
    assert packing_ok(starts, lengths, capacity)
    if len(starts) and delta:
        changed = starts.copy()
        changed[at % len(starts)] += delta
        assert not packing_ok(changed, lengths, capacity)


def test_a_fixed_layout_of_four_billion_rows_allocates_nothing_per_row() -> None:
    spec = FamilySpec((8,), "float32", rows_per_shard=4096)
    layout = FamilyLayout(spec, np.asarray([0, 2**32 - 5, 2**32]))
    assert layout.rows == 2**32 and layout.n_shards == 2**32 // 4096
    assert layout.shard_rows(layout.n_shards - 1)[-1] == 2**32 - 1
    assert layout.lengths.strides == (0,)  # a broadcast view: no memory per row


@pytest.mark.parametrize(
    ("episode_rows", "says"),
    [
        ([0, 5, 3], "never decrease"),
        ([1, 5], "start at 0"),
        ([0, 2**33], "more than vlastore supports"),
        ([[0, 1]], "1-D"),
    ],
)
def test_bad_episode_rows_are_refused(episode_rows, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        FamilyLayout(FamilySpec((8,), "float32", rows_per_shard=4), np.asarray(episode_rows), where="x/gen-0001")


def test_ragged_tables_that_are_not_the_packing_are_refused() -> None:
    spec = FamilySpec((4,), "float16", ragged=True, rows_per_shard=6)
    lengths = np.asarray([2, 3, 4])
    FamilyLayout(spec, np.asarray([0, 3]), pack_ragged(lengths, 6), lengths)
    with pytest.raises(FormatError, match="not the packing"):
        FamilyLayout(spec, np.asarray([0, 3]), np.asarray([0, 2, 4]), lengths)
    with pytest.raises(FormatError, match="one per row"):
        FamilyLayout(spec, np.asarray([0, 3]), np.asarray([0, 2]), np.asarray([2, 3]))
