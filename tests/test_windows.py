"""Window indexing (vlastore/windows.py) against a direct, loop-by-loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlastore.windows import (
    action_deltas,
    feature_rows,
    obs_deltas,
    sample_table,
    split_episodes,
    window_indices,
)


def reference_window(steps: list[int], episode: int, step: int, deltas: list[int]) -> tuple[list[int], list[bool]]:
    """The obvious way: walk to the step, clamp into the episode by hand."""
    first = sum(steps[:episode])
    index, pad = [], []
    for d in deltas:
        t = step + d
        if t < 0:
            index.append(first)
            pad.append(True)
        elif t >= steps[episode]:
            index.append(first + steps[episode] - 1)
            pad.append(True)
        else:
            index.append(first + t)
            pad.append(False)
    return index, pad


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.integers(1, 25), min_size=1, max_size=8),
    n_obs=st.integers(1, 6),
    horizon=st.integers(1, 12),
    data=st.data(),
)
def test_windows_match_reference(steps: list[int], n_obs: int, horizon: int, data: st.DataObject) -> None:
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    episodes, step_of = sample_table(np.asarray(steps), np.arange(len(steps)))
    assert len(episodes) == sum(steps)
    picks = data.draw(st.lists(st.integers(0, len(episodes) - 1), min_size=1, max_size=20))
    for deltas in (obs_deltas(n_obs), action_deltas(horizon)):
        index, is_pad = window_indices(offsets, episodes[picks], step_of[picks], deltas)
        for row, sample in enumerate(picks):
            ref_index, ref_pad = reference_window(steps, int(episodes[sample]), int(step_of[sample]), deltas.tolist())
            assert index[row].tolist() == ref_index
            assert is_pad[row].tolist() == ref_pad


@given(steps=st.lists(st.integers(0, 30), min_size=1, max_size=10), data=st.data())
def test_sample_table_lists_every_step_of_chosen_episodes(steps: list[int], data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.integers(0, len(steps) - 1), unique=True))
    episodes, step_of = sample_table(np.asarray(steps), chosen)
    expected = [(e, t) for e in chosen for t in range(steps[e])]
    assert list(zip(episodes.tolist(), step_of.tolist(), strict=True)) == expected


@given(steps=st.lists(st.integers(1, 30), min_size=1, max_size=10), reuse=st.integers(1, 5))
def test_feature_rows_use_step_floor_div_reuse(steps: list[int], reuse: int) -> None:
    items = [-(-s // reuse) for s in steps]
    episode_rows = np.concatenate([[0], np.cumsum(items)]).astype(np.int64)
    episodes, step_of = sample_table(np.asarray(steps), np.arange(len(steps)))
    rows, vlm_idx = feature_rows(episode_rows, episodes, step_of, reuse)
    for e, t, row, v in zip(episodes.tolist(), step_of.tolist(), rows.tolist(), vlm_idx.tolist(), strict=True):
        assert v == t // reuse
        assert row == sum(items[:e]) + t // reuse


def test_feature_rows_refuse_a_plan_with_too_few_rows() -> None:
    with pytest.raises(IndexError, match="vlm_reuse_count"):
        feature_rows(np.array([0, 2]), np.array([0, 0, 0]), np.array([0, 3, 6]), 3)


@given(n=st.integers(1, 60), fraction=st.floats(0.0, 0.9), seed=st.integers(0, 5))
def test_split_episodes_is_a_partition(n: int, fraction: float, seed: int) -> None:
    train, val = split_episodes(n, fraction, seed)
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    if n > 1 and fraction > 0:
        assert len(val) >= 1 and len(train) >= 1


def test_bad_window_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="n_obs_steps"):
        obs_deltas(0)
    with pytest.raises(ValueError, match="horizon"):
        action_deltas(0)
