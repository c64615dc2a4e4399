"""Window indexing (vlastore/windows.py) against a direct, loop-by-loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlastore.windows import (
    EdgePadding,
    WindowPlan,
    action_deltas,
    feature_rows,
    obs_deltas,
    sample_table,
    seconds_to_steps,
    split_episodes,
    timestamp_window_indices,
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


# ---------------------------------------------------------------- delta_steps / delta_timestamps

RATES = [5.0, 10.0, 15.0, 30.0, 50.0]
deltas_st = st.lists(st.integers(-12, 12), min_size=1, max_size=6)  # negative, zero, positive, gaps, repeats


def reference_time_window(ts: list[float], first: int, n: int, step: int, delta: float, tol: float):
    """The obvious way: look at every step of the episode, take the nearest (earlier on ties)."""
    query = ts[first + step] + delta
    episode = ts[first : first + n]
    distances = [abs(t - query) for t in episode]
    j = distances.index(min(distances))
    pad = query < episode[0] - tol or query > episode[-1] + tol
    return first + j, pad, (not pad) and distances[j] > tol


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.integers(1, 25), min_size=1, max_size=6),
    keys=st.dictionaries(st.sampled_from(["state", "action", "tool", "force"]), deltas_st, min_size=1),
    data=st.data(),
)
def test_a_fused_plan_matches_the_reference_for_every_key(steps, keys, data) -> None:
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    episodes, step_of = sample_table(np.asarray(steps), np.arange(len(steps)))
    picks = data.draw(st.lists(st.integers(0, len(episodes) - 1), min_size=1, max_size=16))
    plan = WindowPlan.build(keys)
    assert plan.step_table.shape[0] <= sum(len(v) for v in keys.values())
    windows = plan.indices(offsets, episodes[picks], step_of[picks])
    assert set(windows) == set(keys)
    for key, deltas in keys.items():
        index, is_pad = windows[key]
        for row, sample in enumerate(picks):
            ref_index, ref_pad = reference_window(steps, int(episodes[sample]), int(step_of[sample]), deltas)
            assert index[row].tolist() == ref_index and is_pad[row].tolist() == ref_pad


def test_keys_with_equal_offsets_share_columns_of_the_fused_table() -> None:
    plan = WindowPlan.build({"state": [-1, 0], "tool": [-1, 0], "action": range(4)})
    assert plan.step_table.tolist() == [-1, 0, 0, 1, 2, 3]
    assert plan.deltas("tool").tolist() == [-1, 0]


def test_the_short_form_is_the_plan_of_obs_and_action_deltas() -> None:
    offsets = np.array([0, 5, 12])
    episodes, step_of = sample_table(np.array([5, 7]), [0, 1])
    plan = WindowPlan.build({"state": obs_deltas(3), "action": action_deltas(4)})
    windows = plan.indices(offsets, episodes, step_of)
    for key, deltas in (("state", obs_deltas(3)), ("action", action_deltas(4))):
        index, is_pad = window_indices(offsets, episodes, step_of, deltas)
        assert np.array_equal(windows[key][0], index) and np.array_equal(windows[key][1], is_pad)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.integers(1, 25), min_size=1, max_size=6),
    fps=st.sampled_from(RATES),
    multiples=deltas_st,
    data=st.data(),
)
def test_seconds_at_an_fps_read_the_same_steps_as_their_step_offsets(steps, fps, multiples, data) -> None:
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    episodes, step_of = sample_table(np.asarray(steps), np.arange(len(steps)))
    picks = data.draw(st.lists(st.integers(0, len(episodes) - 1), min_size=1, max_size=16))
    seconds = [k / fps for k in multiples]
    by_time = WindowPlan.build({}, {"action": seconds}, fps=fps).indices(offsets, episodes[picks], step_of[picks])
    by_step = WindowPlan.build({"action": multiples}).indices(offsets, episodes[picks], step_of[picks])
    assert np.array_equal(by_time["action"][0], by_step["action"][0])
    assert np.array_equal(by_time["action"][1], by_step["action"][1])
    # the same through per-step timestamps (episodes starting anywhere, jitter well within tolerance)
    jitter = data.draw(st.lists(st.floats(-3e-5, 3e-5), min_size=len(episodes), max_size=len(episodes)))
    starts = data.draw(st.lists(st.floats(0, 1e4), min_size=len(steps), max_size=len(steps)))
    ts = np.asarray(starts)[episodes] + step_of / fps + np.asarray(jitter)
    by_ts = WindowPlan.build({}, {"action": seconds}, timestamps=ts).indices(offsets, episodes[picks], step_of[picks])
    assert np.array_equal(by_ts["action"][0], by_step["action"][0])
    assert np.array_equal(by_ts["action"][1], by_step["action"][1])


def test_one_fps_per_episode_converts_per_episode() -> None:
    steps = [6, 6]
    offsets = np.array([0, 6, 12])
    episodes, step_of = sample_table(np.asarray(steps), [0, 1])
    plan = WindowPlan.build({"state": [0]}, {"action": [0.0, 0.2]}, fps=[10.0, 20.0])
    assert plan.deltas("action").tolist() == [[0, 2], [0, 4]]
    assert plan.deltas("state").tolist() == [[0], [0]]
    index, is_pad = plan.indices(offsets, episodes, step_of)["action"]
    assert index[1].tolist() == [1, 3] and index[7].tolist() == [7, 11]  # episode 1 step 1: 1 + 4 steps
    assert is_pad[9].tolist() == [False, True]


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.lists(st.floats(0.01, 0.3), min_size=1, max_size=12), min_size=1, max_size=4),
    deltas=st.lists(st.floats(-0.8, 0.8), min_size=1, max_size=5),
    tol=st.sampled_from([1e-4, 0.01, 0.05]),
    data=st.data(),
)
def test_timestamps_resolve_to_the_nearest_step_like_a_direct_search(gaps, deltas, tol, data) -> None:
    """Irregular timestamps (dropped frames): nearest step, pad outside, off-grid in a gap."""
    per_episode = [np.concatenate([[0.0], np.cumsum(g)]) + 100.0 * e for e, g in enumerate(gaps)]
    steps = [len(t) for t in per_episode]
    ts = np.concatenate(per_episode)
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    episodes, step_of = sample_table(np.asarray(steps), np.arange(len(steps)))
    picks = data.draw(st.lists(st.integers(0, len(episodes) - 1), min_size=1, max_size=12))
    index, is_pad, off = timestamp_window_indices(offsets, ts, episodes[picks], step_of[picks], np.asarray(deltas), tol)
    for row, sample in enumerate(picks):
        e, t = int(episodes[sample]), int(step_of[sample])
        for w, delta in enumerate(deltas):
            expected = reference_time_window(ts.tolist(), int(offsets[e]), steps[e], t, delta, tol)
            assert (int(index[row, w]), bool(is_pad[row, w]), bool(off[row, w])) == expected


def test_a_delta_off_the_frame_grid_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"delta 0\.05 s is not a multiple of 1/fps = 1/30 s within tolerance_s"):
        seconds_to_steps([0.0, 0.05], 30)
    assert seconds_to_steps([0.0, 0.05], 30, tolerance_s=0.02).tolist() == [0, 2]  # 0.0667 s: within 0.02 s
    assert seconds_to_steps([-0.1, 1 / 3], 30).tolist() == [-3, 10]
    with pytest.raises(ValueError, match="episode #1"):
        seconds_to_steps([0.1], [10, 15])
    with pytest.raises(ValueError, match="fps must be a positive number"):
        seconds_to_steps([0.1], [10, 0])
    with pytest.raises(ValueError, match="need the episodes' fps or timestamps"):
        WindowPlan.build({}, {"action": [0.1]})
    with pytest.raises(ValueError, match="both delta_steps and delta_timestamps"):
        WindowPlan.build({"action": [0]}, {"action": [0.1]}, fps=10)
    with pytest.raises(ValueError, match="whole steps"):
        WindowPlan.build({"action": [0, 0.5]})
    with pytest.raises(ValueError, match="empty"):
        WindowPlan.build({"action": []})


def test_a_gap_in_the_timestamps_is_named() -> None:
    ts = np.array([0.0, 0.1, 0.2, 0.5, 0.6])  # frames at 0.3 and 0.4 s were dropped
    plan = WindowPlan.build({}, {"state": [-0.1, 0.0]}, timestamps=ts)
    episodes, steps = sample_table(np.array([5]), [0])
    with pytest.raises(ValueError, match=r"1 windows .*'state' delta -0\.1 s at episode ep step 3"):
        plan.check_grid(np.array([0, 5]), episodes, steps, names=["ep"])


# ---------------------------------------------------------------- edge-padded series (what VLADataset reads)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.integers(0, 20), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    keys=st.dictionaries(st.sampled_from(["state", "action", "tool"]), deltas_st, min_size=1),
    data=st.data(),
)
def test_windows_on_edge_padded_series_equal_clamped_windows(steps, keys, data) -> None:
    """One add and one gather on the padded axis read what clamping reads, pads included."""
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    episodes, step_of = sample_table(np.asarray(steps), np.arange(len(steps)))
    picks = data.draw(st.lists(st.integers(0, len(episodes) - 1), min_size=1, max_size=16))
    plan = WindowPlan.build(keys)
    before, after = plan.reach()
    extra = data.draw(st.integers(0, 3))  # more padding than needed changes nothing
    padding = EdgePadding.build(offsets, before + extra, after)
    series = np.arange(offsets[-1] * 2, dtype=np.float32).reshape(-1, 2)
    padded = padding.pad(series)
    assert np.array_equal(padded[~padding.is_pad], series)  # the stored series is the padded one less its copies
    e, t = episodes[picks], step_of[picks]
    blocks = plan.padded_indices(padding, padding.starts[e] + t, offsets, e, t)
    reference = plan.indices(offsets, e, t)
    for key in keys:
        index, is_pad = blocks[plan.block_of[key]]
        assert np.array_equal(padded[index], series[reference[key][0]]), key
        assert np.array_equal(is_pad, reference[key][1]), key
        assert is_pad.flags.c_contiguous


def test_edge_padding_layout() -> None:
    padding = EdgePadding.build(np.array([0, 2, 2, 5]), before=1, after=2)  # episodes of 2, 0 and 3 steps
    assert padding.starts.tolist() == [1, 5, 6]
    assert padding.source.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4]
    assert padding.is_pad.tolist() == [True, False, False, True, True, True, False, False, False, True, True]
    with pytest.raises(ValueError, match=">= 0"):
        EdgePadding.build(np.array([0, 2]), before=-1, after=0)


def test_time_offsets_land_on_the_padded_axis_too() -> None:
    steps = [6, 4]
    offsets = np.array([0, 6, 10])
    episodes, step_of = sample_table(np.asarray(steps), [0, 1])
    ts = np.concatenate([np.arange(6) * 0.1, 5 + np.arange(4) * 0.1])
    plan = WindowPlan.build({"state": [-1, 0]}, {"action": [0.0, 0.2]}, timestamps=ts)
    padding = EdgePadding.build(offsets, *plan.reach())
    blocks = plan.padded_indices(padding, padding.starts[episodes] + step_of, offsets, episodes, step_of)
    reference = plan.indices(offsets, episodes, step_of)
    for key in ("state", "action"):
        index, is_pad = blocks[plan.block_of[key]]
        assert np.array_equal(padding.source[index], reference[key][0]) and np.array_equal(is_pad, reference[key][1])
