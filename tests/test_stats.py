"""Exact statistics (vlastore/stats.py) against numpy on the concatenated data.

Quantiles, min, max and counts must be equal bit for bit. Means and variances are float64
sums merged per episode, against numpy's float64 sums over everything: the two differ by
rounding only, bounded by ``n * eps * scale`` for a mean and ``n * eps * scale**2`` for a
variance (``n`` steps, ``scale = max |x|``; the two-pass M2 has no cross term, so the
error of a mean enters a variance squared). The tests allow 4x and 16x those bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reader_stores import DTYPES, STEPS, make_store

from vlastore.format import FamilySpec, Producer
from vlastore.stats import (
    EpisodeMoments,
    feature_stats,
    merge_moments,
    quantile_name,
    series_stats,
    summarize,
)

EPS = np.finfo(np.float64).eps


@st.composite
def ragged_series(draw, max_episodes: int = 8):
    """``(values [total, C], step_offsets)``: episodes of 0..30 steps, far from zero or not."""
    lengths = draw(st.lists(st.integers(0, 30), min_size=1, max_size=max_episodes))
    columns = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    values = draw(arrays(dtype, (sum(lengths), columns), elements=st.floats(-1e3, 1e3, width=32)))
    offset = draw(st.sampled_from([0.0, 1e4]))  # joint positions far from zero with a small spread
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return (values + offset).astype(dtype), offsets


def concat(values: np.ndarray, offsets: np.ndarray, episodes) -> np.ndarray:
    parts = [values[offsets[e] : offsets[e + 1]] for e in episodes]
    return np.concatenate(parts) if parts else values[:0]


def assert_matches_numpy(stats, data: np.ndarray, qs) -> None:
    assert stats.count == len(data)
    reference = np.quantile(data, list(qs), axis=0)
    for q, expected in zip(qs, reference):
        np.testing.assert_array_equal(stats.quantiles[q], expected)
    np.testing.assert_array_equal(stats.min, data.min(axis=0))
    np.testing.assert_array_equal(stats.max, data.max(axis=0))
    as64 = data.astype(np.float64)
    scale = float(np.abs(as64).max())
    n = len(data)
    np.testing.assert_allclose(stats.mean, as64.mean(axis=0), rtol=0, atol=4 * n * EPS * scale)
    np.testing.assert_allclose(stats.std**2, as64.var(axis=0), rtol=0, atol=16 * n * EPS * scale**2)


quantile_lists = st.lists(st.floats(0, 1), min_size=1, max_size=4, unique=True).map(lambda q: (0.01, 0.99, *q))


@settings(max_examples=200, deadline=None)
@given(series=ragged_series(), qs=quantile_lists, data=st.data())
def test_any_subset_of_episodes_matches_numpy_on_its_concatenated_steps(series, qs, data) -> None:
    values, offsets = series
    n_episodes = len(offsets) - 1
    episodes = data.draw(st.one_of(st.none(), st.lists(st.integers(0, n_episodes - 1), unique=True)))
    chosen = range(n_episodes) if episodes is None else episodes
    expected = concat(values, offsets, chosen)
    if not len(expected):
        with pytest.raises(ValueError, match="no steps"):
            summarize(values, offsets, episodes, qs)
        assert summarize(values, offsets, episodes, quantiles=()).count == 0
        return
    assert_matches_numpy(summarize(values, offsets, episodes, qs), expected, qs)


@settings(max_examples=100, deadline=None)
@given(first=ragged_series(), second=ragged_series(), qs=quantile_lists, data=st.data())
def test_adding_and_removing_episodes_equals_a_recomputation(first, second, qs, data) -> None:
    """Partials of the old episodes + partials of the appended ones, minus removed ones."""
    (a, offsets_a), (b, offsets_b) = first, second
    b = b[:, : a.shape[1]] if b.shape[1] >= a.shape[1] else np.pad(b, ((0, 0), (0, a.shape[1] - b.shape[1])))
    b = b.astype(a.dtype)
    kept = EpisodeMoments.compute(a, offsets_a)
    added = EpisodeMoments.compute(b, offsets_b)  # computed alone, as at ingest of the new episodes
    moments = EpisodeMoments.concat([kept, added])
    values = np.concatenate([a, b])
    offsets = np.concatenate([offsets_a, offsets_b[1:] + offsets_a[-1]])
    n_episodes = len(offsets) - 1
    remaining = data.draw(st.lists(st.integers(0, n_episodes - 1), unique=True, min_size=1))
    recomputed = EpisodeMoments.compute(values, offsets)
    assert np.array_equal(moments.count, recomputed.count)
    assert np.array_equal(moments.min, recomputed.min) and np.array_equal(moments.max, recomputed.max)
    if not concat(values, offsets, remaining).size:
        return
    fast = summarize(values, offsets, remaining, qs, moments=moments)
    slow = summarize(values, offsets, remaining, qs)
    assert fast.count == slow.count
    for q in qs:
        np.testing.assert_array_equal(fast.quantiles[q], slow.quantiles[q])
    np.testing.assert_array_equal(fast.min, slow.min)
    np.testing.assert_array_equal(fast.max, slow.max)
    assert_matches_numpy(fast, concat(values, offsets, remaining), qs)
    # mean/std/min/max of a subset come from the partials alone, no data read
    light = summarize(None, offsets, remaining, quantiles=(), moments=moments)
    np.testing.assert_array_equal(light.mean, fast.mean)
    np.testing.assert_array_equal(light.std, fast.std)


@pytest.mark.parametrize("method", ["linear", "nearest", "lower", "higher", "midpoint", "hazen", "median_unbiased"])
def test_every_numpy_method_is_matched(method) -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((500, 2)).astype(np.float32)
    offsets = np.array([0, 100, 100, 377, 500])
    stats = summarize(values, offsets, [3, 0], (0.01, 0.5, 0.99), method=method)
    reference = np.quantile(concat(values, offsets, [3, 0]), [0.01, 0.5, 0.99], axis=0, method=method)
    for q, expected in zip((0.01, 0.5, 0.99), reference):
        np.testing.assert_array_equal(stats.quantiles[q], expected)


def test_quantiles_are_not_averages_of_per_episode_quantiles() -> None:
    """LeRobot #3804: a q99 aggregated by a weighted mean of per-episode q99s was 13.59, the truth 39.25."""
    rng = np.random.default_rng(0)
    episodes = [rng.uniform(0, 1, (100, 1)) for _ in range(9)] + [rng.uniform(0, 100, (100, 1))]  # one burst
    values, offsets = np.concatenate(episodes), np.arange(0, 1001, 100)
    averaged = np.mean([np.quantile(e, 0.99) for e in episodes])
    stats = summarize(values, offsets)
    assert stats["q99"][0] == np.quantile(values, [0.99])[0]
    assert stats["q99"][0] > 80 and averaged < 15  # the burst's top 1% is the data's top 1%


def test_the_callers_array_is_left_as_it_was() -> None:
    values = np.arange(20, dtype=np.float32)[::-1].reshape(20, 1).copy()  # one column: values[:, 0] is contiguous
    before = values.copy()
    summarize(values, np.array([0, 20]), quantiles=(0.3,))
    np.testing.assert_array_equal(values, before)


def test_moments_round_trip_and_names() -> None:
    values = np.random.default_rng(1).standard_normal((30, 2))
    moments = EpisodeMoments.compute(values, np.array([0, 10, 10, 30]))
    again = EpisodeMoments.from_arrays(moments.to_arrays())
    for name, array in moments.to_arrays().items():
        np.testing.assert_array_equal(getattr(again, name), array)
    assert moments.count.tolist() == [10, 0, 20] and np.isinf(moments.min[1]).all()
    count, mean, var, low, high = merge_moments(moments.select([1]))
    assert count == 0 and np.isnan(mean).all()
    with pytest.raises(ValueError, match="m2 has shape"):
        EpisodeMoments.from_arrays({**moments.to_arrays(), "m2": np.zeros((2, 2))})
    assert [quantile_name(q) for q in (0.01, 0.5, 0.99, 0.999, 0.0)] == ["q01", "q50", "q99", "q99.9", "q00"]
    stats = summarize(values, np.array([0, 10, 10, 30]), quantiles=(0.01, 0.99))
    assert list(stats.to_dict()) == ["count", "mean", "std", "min", "max", "q01", "q99"]
    with pytest.raises(KeyError, match="no statistic 'q50'"):
        stats["q50"]
    with pytest.raises(ValueError, match="probabilities"):
        summarize(values, np.array([0, 30]), quantiles=(1.5,))
    with pytest.raises(ValueError, match="30 steps but the catalog has 29"):
        summarize(values, np.array([0, 29]))


# ------------------------------------------------------------------------------------ stores


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("stats") / "s.vla")


def test_series_stats_of_a_store_and_its_subsets(known) -> None:
    store = known.store
    for episodes in (None, ["episode_003", 0], [5]):
        stats = series_stats(store, "state", episodes, quantiles=(0.01, 0.25, 0.99))
        chosen = range(len(STEPS)) if episodes is None else [store.catalog.resolve(e) for e in episodes]
        assert_matches_numpy(
            stats, concat(known.series["state"], store.catalog.step_offsets, chosen), (0.01, 0.25, 0.99)
        )
        assert stats.columns == store.columns("state")
    moments = EpisodeMoments.compute(known.series["action"], store.catalog.step_offsets)
    light = series_stats(store, "action", [1, 2], quantiles=(), moments=moments)
    np.testing.assert_array_equal(light.max, concat(known.series["action"], store.catalog.step_offsets, [1, 2]).max(0))


def _as_float(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return values.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["fixed", "ragged"])
def test_feature_stats_per_dimension(known, dtype, kind) -> None:
    family = f"{kind}_{dtype}"
    stats = feature_stats(known.store, family, rows_per_chunk=3)  # several chunks merged
    expected = known.values[family]
    flat = np.concatenate(expected) if kind == "ragged" else expected
    data = _as_float(np.asarray(flat), dtype)
    assert stats.count == len(data) and stats.rows == len(expected)
    np.testing.assert_allclose(stats.mean, data.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std, data.std(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(stats.min, data.min(axis=0))
    np.testing.assert_array_equal(stats.max, data.max(axis=0))


def test_feature_stats_skip_missing_rows_and_follow_episodes(tmp_path) -> None:
    store = make_store(tmp_path / "p.vla", families=()).store
    store.add_family(
        "part", FamilySpec((2,), "float32", vlm_reuse_count=3, rows_per_shard=100), producer=Producer(fingerprint="x")
    )
    rows = store.layout("part").rows
    values = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    keep = [r for r in range(rows) if r % 4]
    with store.writer("part") as writer:
        writer.write_rows(keep, values[keep])
    stats = feature_stats(store, "part")
    assert (stats.rows, stats.count) == (len(keep), len(keep))
    np.testing.assert_allclose(stats.mean, values[keep].mean(axis=0))
    episode_rows = store.layout("part").episode_rows
    lo, hi = int(episode_rows[3]), int(episode_rows[4])
    only = feature_stats(store, "part", episodes=["episode_003"])
    mine = [r for r in keep if lo <= r < hi]
    assert only.rows == len(mine)
    np.testing.assert_array_equal(only.max, values[mine].max(axis=0))


def test_the_store_answers_stats_itself(known) -> None:
    stats = known.store.stats("action", ["episode_002"], quantiles=(0.5,))
    np.testing.assert_array_equal(stats["q50"], np.quantile(known.store.series("action", "episode_002"), [0.5], 0)[0])
