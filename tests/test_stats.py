"""Exact statistics (vlastore/stats.py) against numpy on the concatenated data.

Quantiles, min, max and counts must be equal bit for bit. Means and variances are float64
sums merged per episode, against numpy's float64 sums over everything: the two differ by
rounding only, bounded by ``n * eps * scale`` for a mean and ``n * eps * scale**2`` for a
variance (``n`` steps, ``scale = max |x|``; the two-pass M2 has no cross term, so the
error of a mean enters a variance squared). The tests allow 4x and 16x those bounds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import episodes as make_episodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reader_stores import DTYPES, STEPS, make_store

from vlastore.dataset import VLADataset
from vlastore.format import FamilySpec, FormatError, Producer
from vlastore.stats import (
    DEFAULT_QUANTILES,
    EpisodeMoments,
    feature_stats,
    merge_moments,
    quantile_name,
    series_stats,
    summarize,
)
from vlastore.store import EpisodeData, VLAStore, upgrade_store

GOLDEN_V2 = Path(__file__).parent / "data" / "golden-v2.vla"

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


# ------------------------------------------------------------- stored with commits (format 2)

STORED_QS = (0.01, 0.1, 0.5, 0.9, 0.99)


def visible(store: VLAStore, key: str) -> np.ndarray:
    """A snapshot's series of its episodes, one episode at a time (the reference: no stored statistics used)."""
    return np.concatenate([store.series(key, name) for name in store.datasets])


def assert_stored_are_exact(store: VLAStore) -> None:
    """Stored statistics: numpy's on the concatenated visible data, and bit for bit what on-demand computes."""
    assert store.snapshot is not None and store.snapshot.stats is not None
    for key in store.series_keys:
        stored = store.stats(key, quantiles=STORED_QS)
        assert_matches_numpy(stored, visible(store, key), STORED_QS)
        computed = store.stats(key, list(store.datasets), quantiles=STORED_QS)  # a subset of all: on demand
        for name in ("mean", "std", "min", "max"):
            np.testing.assert_array_equal(getattr(stored, name), getattr(computed, name))
        assert stored.count == computed.count and stored.columns == store.columns(key)


def test_stored_stats_follow_create_append_replace_remove_and_compact(tmp_path: Path) -> None:
    eps = make_episodes((7, 5, 9, 3, 4, 6))
    path = tmp_path / "s.vla"
    store = VLAStore.create(path, eps[:3], format_version=2)
    assert_stored_are_exact(store)
    store = VLAStore.open(path, writable=True)
    store.add_episodes(eps[3:5])
    changed = EpisodeData(eps[1].name, {k: v * 10 + 3 for k, v in eps[1].series.items()})
    store.add_episodes([changed, eps[5]], replace=True)
    store.remove_episodes([eps[0].name])
    before_compact = store.snapshot.stats
    store.compact()
    assert store.snapshot.stats == before_compact  # same episodes, same order: the parent's entry is kept
    history = {n: VLAStore.open(path, snapshot=n) for n in range(1, store.snapshot_id + 1)}
    assert [len(s.datasets) for s in history.values()] == [3, 5, 6, 5, 5]
    for snap in history.values():  # snapshot N's statistics are those of snapshot N's episodes
        assert_stored_are_exact(snap)
    assert history[3].stats("state")["max"].max() > 5 > history[2].stats("state")["max"].max()  # replaced x10+3


def test_stored_stats_are_read_not_computed_and_ds_stats_uses_them(tmp_path: Path) -> None:
    eps = make_episodes((6, 4, 8))
    path = tmp_path / "s.vla"
    VLAStore.create(path, eps, format_version=2)
    ds = VLADataset(path, features=[], n_obs_steps=1, horizon=1)
    expected = {key: ds.store.stats(key) for key in ds.store.series_keys}
    for seg in (path / "seriesdata").rglob("c"):  # series chunks gone: only stored statistics can answer
        shutil.rmtree(seg)
    fresh = VLAStore.open(path)
    for key, stats in expected.items():
        got = fresh.stats(key)
        assert list(got.quantiles) == [0.01, 0.99]
        np.testing.assert_array_equal(got["q99"], stats["q99"])
    ds_stats = ds.stats["state"]
    np.testing.assert_array_equal(ds_stats["q01"], expected["state"]["q01"])
    np.testing.assert_array_equal(ds_stats.mean, expected["state"].mean)
    with pytest.raises(FormatError):  # a quantile not stored, or a subset: computed from the (missing) data
        fresh.stats("state", quantiles=(0.25,))


def test_ds_subset_and_split_compute_theirs(tmp_path: Path) -> None:
    eps = make_episodes((6, 4, 8, 5))
    VLAStore.create(tmp_path / "s.vla", eps, format_version=2)
    ds = VLADataset(tmp_path / "s.vla", features=[], n_obs_steps=1, horizon=1)
    train, val = ds.split(0.5, seed=1)
    for part in (train, val, ds.subset([eps[2].name])):
        data = np.concatenate([e.series["state"] for e in eps if e.name in part.episode_names])
        assert_matches_numpy(part.stats["state"], data, DEFAULT_QUANTILES)


def _rewrite(path: Path, array: str, values: np.ndarray) -> None:
    from vlastore.nodes import ZarrNodes
    from vlastore.storage import open_storage

    ZarrNodes.open(open_storage(path), writable=True).write_small_fast(array, values)


def test_corrupted_stored_stats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.vla"
    store = VLAStore.create(path, make_episodes((6, 4)), format_version=2)
    ref = store.snapshot.stats
    stored = path / ref.path / "state"
    # 1. another value, written as a valid array (chunk crc and zarr.json as vlastore writes them)
    array = np.asarray(store.stats("state", quantiles=STORED_QS)["q99"])
    good = VLAStore.open(path)
    from vlastore.storedstats import read_stored

    values, _ = read_stored(good.nodes, good.snapshot, "state")
    edited = values.copy()
    edited[-1] = array + 1
    _rewrite(path, f"{ref.path}/state", edited)
    with pytest.raises(FormatError, match="do not match their checksum"):
        VLAStore.open(path).stats("state")
    # 2. a flipped byte in the chunk
    _rewrite(path, f"{ref.path}/state", values)
    assert VLAStore.open(path).stats("state")["q99"].tolist() == array.tolist()
    chunk = next(p for p in stored.rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="damaged"):
        VLAStore.open(path).stats("state")
    # 3. another shape or type (zarr.json no longer the commit's)
    _rewrite(path, f"{ref.path}/state", values.astype(np.float32))
    with pytest.raises(FormatError, match="checksum mismatch"):
        VLAStore.open(path).stats("state")


def test_golden_v2_has_no_stored_stats_and_computes_them(tmp_path: Path) -> None:
    golden = VLAStore.open(GOLDEN_V2)
    assert golden.snapshot is not None and golden.snapshot.stats is None
    for key in golden.series_keys:
        assert_matches_numpy(golden.stats(key), visible(golden, key), DEFAULT_QUANTILES)
    copy = tmp_path / "g.vla"
    shutil.copytree(GOLDEN_V2, copy)
    store = VLAStore.open(copy, writable=True)
    store.remove_episodes([store.datasets[0]])  # the next change of episodes stores them
    assert_stored_are_exact(store)


def test_v1_stays_on_demand_and_unwritten_then_upgrade_stores_them(tmp_path: Path) -> None:
    path = tmp_path / "v1.vla"
    store = VLAStore.create(path, make_episodes((5, 7, 3)), format_version=1)
    files = sorted(p.relative_to(path) for p in path.rglob("*"))
    assert_matches_numpy(store.stats("state"), visible(store, "state"), DEFAULT_QUANTILES)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == files
    assert upgrade_store(path) == 1
    assert_stored_are_exact(VLAStore.open(path))


def test_gc_keeps_the_stats_of_kept_commits_only(tmp_path: Path) -> None:
    eps = make_episodes((5, 4, 6))
    path = tmp_path / "s.vla"
    store = VLAStore.create(path, eps[:2], format_version=2)
    store = VLAStore.open(path, writable=True)
    first = store.snapshot.stats.path
    store.add_episodes(eps[2:])
    store.gc(retention_s=0, keep=1)
    assert not any(p.is_file() for p in (path / first).rglob("*"))
    assert_stored_are_exact(VLAStore.open(path))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_split_into_commits_gives_the_stats_of_one_create(tmp_path_factory, data) -> None:
    """Create + appends (+ removes of extra episodes) in any split: the statistics of one create of the result."""
    steps = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=6))
    if not sum(steps):
        steps[0] = 1
    eps = make_episodes(tuple(steps), seed=data.draw(st.integers(0, 3)))
    extra = make_episodes((3, 2), seed=9, prefix="extra")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(eps)), max_size=3)))
    root = tmp_path_factory.mktemp("split")
    store = VLAStore.create(root / "s.vla", eps[: cuts[0] if cuts else len(eps)] + extra[:1], format_version=2)
    store = VLAStore.open(root / "s.vla", writable=True)
    for i, (lo, hi) in enumerate(zip(cuts, [*cuts[1:], len(eps)])):
        store.add_episodes(eps[lo:hi] + (extra[1:] if i == 0 else []))
    if not cuts:
        store.add_episodes(extra[1:])
    store.remove_episodes([e.name for e in extra])
    whole = VLAStore.create(root / "one.vla", eps, format_version=2)
    assert store.datasets == whole.datasets
    for key in whole.series_keys:
        a, b = store.stats(key, quantiles=STORED_QS), whole.stats(key, quantiles=STORED_QS)
        assert a.count == b.count
        for name in ("min", "max"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        for q in STORED_QS:
            np.testing.assert_array_equal(a.quantiles[q], b.quantiles[q])
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.std, b.std, rtol=1e-12, atol=1e-12)


def test_store_feature_stats_are_kept_until_rows_are_written(tmp_path: Path) -> None:
    store = VLAStore.create(tmp_path / "f.vla", make_episodes((6, 4)), format_version=2)
    store = VLAStore.open(tmp_path / "f.vla", writable=True)
    store.add_family("f", FamilySpec((2,), "float32", vlm_reuse_count=2, rows_per_shard=2))
    rows = store.layout("f").rows
    values = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2) ** 1.5
    with store.writer("f") as writer:
        writer.write_rows([0, 1], values[:2].astype(np.float32))
    first = store.feature_stats("f")
    assert store.feature_stats("f") is first and (first.rows, first.count) == (2, 2)
    with store.writer("f") as writer:
        writer.write_rows(list(range(2, rows)), values[2:].astype(np.float32))
    full = store.feature_stats("f")
    data = values.astype(np.float32).astype(np.float64)
    assert full.rows == rows
    np.testing.assert_allclose(full.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(full.std, data.std(axis=0), rtol=1e-9)
