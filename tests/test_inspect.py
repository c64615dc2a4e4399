"""vlastore.inspect: the tables agree with `vlastore info`, statistics/projection/drift on known values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlastore import inspect as vi
from vlastore.cli import main as cli_main
from vlastore.format import FamilySpec, Producer
from vlastore.inspect import _common as inspect_common
from vlastore.inspect import values as inspect_values
from vlastore.report import store_info
from vlastore.storage import StoreNotFoundError
from vlastore.store import EpisodeData, VLAStore

pd = pytest.importorskip("pandas", reason="pip install vlastore[notebook]")

STEPS = [7, 5, 9]  # vlm_reuse_count 3 -> 3, 2, 3 rows: episode_rows [0, 3, 5, 8]
NAMES = ["ep_a", "ep_b", "ep_c"]
MISSING_ROW = 4  # ep_b, vlm_idx 1: never written in any generation
GEN2_MISSING_ROW = 6  # ep_c, vlm_idx 1: not rebuilt in generation 2
TOKEN_LENGTHS = [2, 3, 1, 4, 2, 1, 3, 2]


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values exactly representable in bfloat16 -> their uint16 bits."""
    bits = (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(vi.to_float32(bits, "bfloat16"), values), "test values must be bfloat16-exact"
    return bits


FIXED = (np.arange(32, dtype=np.float32).reshape(8, 4) - 10) * 0.5  # no zero row
GEN2 = FIXED.copy()
GEN2[0] *= 2  # cosine 1, rel_l2 1
GEN2[1] *= -1  # cosine -1, rel_l2 2


def _tokens() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    rows = [rng.normal(size=(n, 2)).astype(np.float32) for n in TOKEN_LENGTHS]
    rows[3][1, 0] = np.nan
    rows[5][0, 1] = np.inf
    return rows


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "store.vla"
    episodes = [
        EpisodeData(name, {"state": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "action": np.ones((n, 1))})
        for name, n in zip(NAMES, STEPS, strict=True)
    ]
    store = VLAStore.create(path, episodes, columns={"state": ["x", "y"]})
    store.add_family("fixed", FamilySpec((4,), "bfloat16", vlm_reuse_count=3), producer=Producer("m", "r1"))
    store.add_family(
        "tokens",
        FamilySpec((2,), "float32", ragged=True, vlm_reuse_count=3, allow_nonfinite=True),
        lengths=TOKEN_LENGTHS,
    )
    written = [r for r in range(8) if r != MISSING_ROW]
    with store.writer("fixed") as writer:
        writer.write_rows(written, _bf16_bits(FIXED[written]))
    with store.writer("tokens") as writer:
        writer.write_rows(range(8), _tokens())
    info = store.new_generation("fixed", Producer("m", "r2"))
    rebuilt = [r for r in written if r != GEN2_MISSING_ROW]
    with store.writer("fixed", generation=info.generation) as writer:
        writer.write_rows(rebuilt, _bf16_bits(GEN2[rebuilt]))
    store.switch_generation("fixed", info.generation, keep_previous=None)
    return path


@pytest.fixture()
def store(store_path: Path) -> VLAStore:
    return VLAStore.open(store_path)


# ---------------------------------------------------------------- pure helpers


def test_to_float32_widens_bfloat16_bits_exactly() -> None:
    torch = pytest.importorskip("torch")
    values = torch.randn(1000).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(vi.to_float32(bits, "bfloat16"), values.float().numpy())
    half = np.array([1.5, -2.25], dtype=np.float16)
    assert vi.to_float32(half, "float16").dtype == np.float32
    assert np.array_equal(vi.to_float32(half, "float16"), half.astype(np.float32))


def test_sample_rows_is_seeded_sorted_and_only_present() -> None:
    present = np.zeros(10_000, dtype=bool)
    present[::3] = True
    rows = vi.sample_rows(present, max_rows=100, seed=7)
    assert rows.size == 100 and np.all(np.diff(rows) > 0) and present[rows].all()
    assert np.array_equal(rows, vi.sample_rows(present, max_rows=100, seed=7))
    assert not np.array_equal(rows, vi.sample_rows(present, max_rows=100, seed=8))
    assert np.array_equal(vi.sample_rows(present, max_rows=None), np.flatnonzero(present))


@pytest.mark.parametrize("n, d", [(200, 6), (40, 300)])  # covariance side, Gram side
def test_pca_matches_a_full_svd_and_separates_clusters(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) * np.geomspace(5, 0.1, d)
    x[: n // 2, 0] += 30
    coords, ratio = vi.pca(x, components=2)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(u[:, :2] * s[:2]), atol=1e-8)
    np.testing.assert_allclose(ratio, s[:2] ** 2 / (s**2).sum(), rtol=1e-10)
    assert (coords[: n // 2, 0] > 0).all() != (coords[n // 2 :, 0] > 0).all()  # clusters on either side of 0
    coords_again, _ = vi.pca(x[::-1].copy(), components=2)
    np.testing.assert_allclose(coords_again[::-1], coords, atol=1e-8)  # signs do not flip with row order
    assert vi.pca(x[:1])[0].shape == (1, 2) and vi.pca(x[:3], components=5)[0].shape == (3, 5)


def test_pca_of_a_large_sample_finds_the_leading_components() -> None:
    rng = np.random.default_rng(1)
    n, d = 600, 700  # both above EXACT_PCA_LIMIT: the randomized path
    assert min(n, d) > vi.EXACT_PCA_LIMIT
    directions = np.linalg.qr(rng.normal(size=(d, 3)))[0].T
    x = (rng.normal(size=(n, 3)) * [40, 20, 10]) @ directions + rng.normal(size=(n, d)) + 5
    coords, ratio = vi.pca(x, components=2)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(u[:, :2] * s[:2]), rtol=1e-6, atol=1e-6 * s[0])
    np.testing.assert_allclose(ratio, s[:2] ** 2 / (s**2).sum(), rtol=1e-8)


# ---------------------------------------------------------------- agreement with `vlastore info`


def test_tables_show_the_figures_of_vlastore_info(store: VLAStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", store.location, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    info = store_info(store)
    assert cli == info
    summary = vi.store_summary(store)
    for key in ("episodes", "steps", "bytes_on_disk", "files", "format_version"):
        assert summary[key] == cli[key], key
    assert summary["steps_mean"] == cli["steps_per_episode"]["mean"]
    manifest = vi.manifest_table(store)
    assert list(manifest.index) == list(cli["families"])
    for family, fam in cli["families"].items():
        row = manifest.loc[family]
        for key in (
            "rows",
            "rows_present",
            "dtype",
            "row_shape",
            "bytes_on_disk",
            "files",
            "payload_bytes",
            "shards",
            "shards_written",
            "current_generation",
            "generations",
            "fingerprint",
        ):
            assert row[key] == fam[key], (family, key)
    episodes = vi.episode_table(store)
    assert list(episodes.index) == NAMES and episodes["steps"].tolist() == STEPS
    assert int(episodes["steps"].sum()) == cli["steps"]
    coverage = vi.coverage_table(store).groupby("family")[["rows", "present"]].sum()
    for family, fam in cli["families"].items():
        assert coverage.loc[family, "rows"] == fam["rows"] == int(episodes[f"{family}_rows"].sum())
        assert coverage.loc[family, "present"] == fam["rows_present"]
        assert vi.family_stats(store, family)["rows_present"] == fam["rows_present"]


# ---------------------------------------------------------------- coverage and alignment


def test_coverage_and_missing_rows_name_the_gaps(store: VLAStore) -> None:
    coverage = vi.coverage_table(store)
    fixed = coverage[coverage["family"] == "fixed"].set_index("episode")
    assert fixed["rows"].tolist() == [3, 2, 3]
    assert fixed["present"].tolist() == [3, 1, 2]  # gen 2 misses row 4 (ep_b) and row 6 (ep_c)
    assert fixed.loc["ep_b", "fraction"] == 0.5
    assert coverage[coverage["family"] == "tokens"]["missing"].sum() == 0
    missing = vi.missing_rows(store, "fixed")
    assert missing.to_dict(orient="list") == {"row": [4, 6], "episode": ["ep_b", "ep_c"], "vlm_idx": [1, 1]}
    assert vi.missing_rows(store, "fixed", generation=1)["row"].tolist() == [MISSING_ROW]
    assert len(vi.missing_rows(store, "fixed", limit=1)) == 1


def test_vlm_alignment_and_boundaries(store: VLAStore) -> None:
    alignment = vi.vlm_alignment(store, "fixed")
    assert alignment["expected_rows"].tolist() == [3, 2, 3] and alignment["aligned"].all()
    assert vi.vlm_boundaries(store, "fixed", "ep_c").tolist() == [0, 3, 6]
    assert vi.vlm_boundaries(store, "fixed", 1).tolist() == [0, 3]
    series = vi.episode_series(store, "ep_b", "state")
    assert list(series.columns) == ["x", "y"] and series.index.name == "step" and len(series) == 5


def test_a_planned_per_image_family_with_nothing_written(tmp_path: Path) -> None:
    store = VLAStore.create(tmp_path / "s.vla", [EpisodeData("e", steps=4)])
    store.add_family("images", FamilySpec((2,), "float32", index_name="image"), items_per_episode=[2])
    with pytest.raises(ValueError, match="no vlm_reuse_count"):
        vi.vlm_alignment(store, "images")
    with pytest.raises(ValueError, match="no vlm_reuse_count"):
        vi.vlm_boundaries(store, "images", "e")
    assert vi.missing_rows(store, "images").to_dict(orient="list") == {
        "row": [0, 1],
        "episode": ["e", "e"],
        "image": [0, 1],
    }
    stats = vi.family_stats(store, "images")
    assert (stats["rows"], stats["rows_present"], stats["rows_sampled"], stats["token_rows"]) == (2, 0, 0, 0)
    assert np.isnan(stats["mean"]) and stats["hist_counts"].sum() == 0
    assert len(vi.project_rows(store, "images")) == 0
    assert vi.coverage_table(store)["fraction"].tolist() == [0.0]


# ---------------------------------------------------------------- statistics and projection


def test_family_stats_of_bfloat16_rows(store: VLAStore) -> None:
    stats = vi.family_stats(store, "fixed", generation=1)
    present = FIXED[[r for r in range(8) if r != MISSING_ROW]]
    assert (stats["rows"], stats["rows_present"], stats["rows_sampled"], stats["token_rows"]) == (8, 7, 7, 7)
    assert (stats["nan"], stats["inf"], stats["values"]) == (0, 0, 28)
    assert stats["min"] == present.min() and stats["max"] == present.max()
    assert stats["mean"] == pytest.approx(present.mean()) and stats["std"] == pytest.approx(present.std())
    np.testing.assert_allclose(stats["norms"], np.linalg.norm(present, axis=1), rtol=1e-6)
    assert stats["hist_counts"].sum() == 28 and len(stats["hist_edges"]) == len(stats["hist_counts"]) + 1


def test_family_stats_counts_nonfinite_over_token_rows(store: VLAStore) -> None:
    stats = vi.family_stats(store, "tokens")
    tokens = np.concatenate(_tokens())
    finite = tokens[np.isfinite(tokens)]
    assert stats["ragged"] and stats["token_rows"] == sum(TOKEN_LENGTHS) and stats["rows_sampled"] == 8
    assert (stats["nan"], stats["inf"]) == (1, 1)
    assert stats["min"] == finite.min() and stats["max"] == finite.max()
    assert stats["hist_counts"].sum() == finite.size
    norms = np.linalg.norm(tokens, axis=1)
    assert np.isnan(stats["norms"]).sum() == 1 and np.isinf(stats["norms"]).sum() == 1
    assert stats["norm_max"] == pytest.approx(norms[np.isfinite(norms)].max())
    sampled = vi.family_stats(store, "tokens", max_rows=3, seed=1, max_values=5)
    assert sampled["rows_sampled"] == 3 and sampled["hist_counts"].sum() < finite.size
    table = vi.stats_table([stats, sampled])
    assert "norms" not in table.columns and table.loc["tokens"].shape[0] == 2


def test_project_rows_pools_ragged_rows_and_drops_nonfinite(store: VLAStore) -> None:
    projection = vi.project_rows(store, "tokens")
    assert projection.attrs["dropped_nonfinite"] == 2  # the rows holding the NaN and the Inf
    assert projection["row"].tolist() == [0, 1, 2, 4, 6, 7]
    assert projection["episode"].tolist() == ["ep_a", "ep_a", "ep_a", "ep_b", "ep_c", "ep_c"]
    assert projection["vlm_idx"].tolist() == [0, 1, 2, 1, 1, 2]
    vectors = np.stack([t.mean(0) for i, t in enumerate(_tokens()) if i in (0, 1, 2, 4, 6, 7)])
    coords, ratio = vi.pca(vectors)
    np.testing.assert_allclose(projection[["pc1", "pc2"]].to_numpy(), coords, rtol=1e-5, atol=1e-6)
    assert projection.attrs["explained_variance_ratio"] == pytest.approx(ratio.tolist())
    assert len(vi.project_rows(store, "fixed", max_rows=3)) == 3


def _flip_payload_byte(store: VLAStore, family: str, row: int, generation: int | None = None) -> None:
    index = store.shard_index(family, 0, generation)
    shard_file = store.storage.local_path(store.shard_key(family, 0, generation))
    with open(shard_file, "r+b") as f:
        f.seek(int(index.offsets[row]))
        byte = f.read(1)
        f.seek(int(index.offsets[row]))
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_row_is_left_out_and_counted(store_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.vla"
    shutil.copytree(store_path, path)
    _flip_payload_byte(VLAStore.open(path), "fixed", 2)
    store = VLAStore.open(path)
    stats = vi.family_stats(store, "fixed")
    assert stats["unreadable"] == 1 and stats["rows_sampled"] == stats["rows_present"] - 1
    assert 2 not in vi.project_rows(store, "fixed")["row"].tolist()
    drift = vi.generation_drift(store, "fixed").set_index("row")
    assert drift.attrs["unreadable"] == 1 and np.isnan(drift.loc[2, "cosine"]) and drift.loc[3, "rel_l2"] == 0


def test_small_read_batches_give_the_same_figures(store: VLAStore, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = store.layout("tokens")
    rows = np.arange(8)
    batches = list(inspect_values._batches(layout, rows, budget=6))  # 2 values per token row, 1-4 token rows per row
    assert np.array_equal(np.concatenate(batches), rows)
    assert all(b.size == 1 or layout.lengths[b].sum() * 2 <= 6 for b in batches) and len(batches) > 3
    whole = (vi.family_stats(store, "tokens"), vi.project_rows(store, "tokens"), vi.generation_drift(store, "fixed"))
    monkeypatch.setattr(inspect_common, "_BATCH_VALUES", 4)  # read at call time by values and drift
    small = (vi.family_stats(store, "tokens"), vi.project_rows(store, "tokens"), vi.generation_drift(store, "fixed"))
    for key in ("token_rows", "nan", "inf", "min", "max", "mean", "std", "hist_counts", "norms"):
        np.testing.assert_allclose(small[0][key], whole[0][key], rtol=1e-6, err_msg=key)
    pd.testing.assert_frame_equal(small[1], whole[1])
    pd.testing.assert_frame_equal(small[2], whole[2])


# ---------------------------------------------------------------- generations


def test_generation_drift_on_rows_in_both(store: VLAStore) -> None:
    assert vi.families_with_generations(store) == ["fixed"]
    drift = vi.generation_drift(store, "fixed")
    assert drift.attrs["generation"] == 2 and drift.attrs["previous"] == 1
    assert drift["row"].tolist() == [0, 1, 2, 3, 5, 7]  # 4 is in neither, 6 only in generation 1
    by_row = drift.set_index("row")
    assert by_row.loc[0, "cosine"] == pytest.approx(1) and by_row.loc[0, "rel_l2"] == pytest.approx(1)
    assert by_row.loc[1, "cosine"] == pytest.approx(-1) and by_row.loc[1, "rel_l2"] == pytest.approx(2)
    assert (by_row.loc[[2, 3, 5, 7], "rel_l2"] == 0).all()
    assert by_row.loc[3, "episode"] == "ep_b" and by_row.loc[3, "vlm_idx"] == 0
    summary = vi.drift_summary(drift)
    assert summary["rows_compared"] == 6 and summary["unchanged_rows"] == 4 and summary["rel_l2_max"] == 2
    assert len(vi.generation_drift(store, "fixed", max_rows=2)) == 2
    with pytest.raises(ValueError, match="nothing older"):
        vi.generation_drift(store, "tokens")


def test_generation_drift_pools_ragged_rows_whose_lengths_changed(tmp_path: Path) -> None:
    store = VLAStore.create(tmp_path / "s.vla", [EpisodeData("e", steps=3)])
    spec = FamilySpec((2,), "float32", ragged=True, vlm_reuse_count=1)
    store.add_family("tok", spec, lengths=[2, 1, 2])
    old = [np.array([[1, 0], [3, 0]], np.float32), np.array([[0, 1]], np.float32), np.ones((2, 2), np.float32)]
    with store.writer("tok") as writer:
        writer.write_rows(range(3), old)
    info = store.new_generation("tok", Producer(), lengths=[1, 1, 2])
    new = [np.array([[2, 0]], np.float32), np.array([[0, 2]], np.float32), np.ones((2, 2), np.float32)]
    with store.writer("tok", generation=info.generation) as writer:
        writer.write_rows(range(3), new)
    drift = vi.generation_drift(store, "tok")
    assert drift["pooled"].tolist() == [True, False, False]
    assert drift["rel_l2"].tolist() == pytest.approx([0.0, 1.0, 0.0])  # row 0: mean [2, 0] both times


# ---------------------------------------------------------------- opening


def test_open_store_makes_the_demo_store_only_when_none_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(vi.STORE_ENV, raising=False)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)
    with pytest.raises(StoreNotFoundError):
        vi.open_store(tmp_path / "nowhere.vla")
    assert not (tmp_path / "nowhere.vla").exists()
    monkeypatch.chdir(tmp_path)
    store = vi.open_store()
    assert Path(store.location) == tmp_path / "vlastore-demo.vla" and not store.writable
    assert set(store.families) == {"qwen_vl", "qwen_vl_tokens"}
    monkeypatch.chdir(notebooks)  # a notebook runs in notebooks/: it finds the demo store one folder up
    assert vi.resolve_store_path() == (str(tmp_path / "vlastore-demo.vla"), False)
    monkeypatch.setenv(vi.STORE_ENV, str(tmp_path / "elsewhere.vla"))
    assert vi.resolve_store_path() == (str(tmp_path / "elsewhere.vla"), True)
    with pytest.raises(StoreNotFoundError):
        vi.open_store()
    assert list(notebooks.iterdir()) == []


def test_import_needs_neither_pandas_nor_matplotlib() -> None:
    code = (
        "import sys, vlastore, vlastore.inspect, vlastore.report; "
        "print(sorted(m for m in ('pandas', 'matplotlib', 'torch') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- plots


def test_plot_helpers_draw_on_the_given_axes(store: VLAStore) -> None:
    matplotlib = pytest.importorskip("matplotlib", reason="pip install vlastore[notebook]")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3)
    ax = axes.ravel()
    assert vi.plot_coverage(vi.coverage_table(store), ax=ax[0]) is ax[0]
    image = ax[0].images[0].get_array()
    assert image.shape == (3, 2) and image[1, 0] == 0.5  # ep_b x fixed
    stats = vi.family_stats(store, "tokens")
    assert vi.plot_norms(stats, ax=ax[1]) is ax[1]
    assert ax[1].patches[0].get_data().values.sum() == sum(TOKEN_LENGTHS) - 2  # the NaN and Inf rows left out
    assert vi.plot_histogram(stats, ax=ax[2]) is ax[2] and "NaN 1, Inf 1" in ax[2].get_title()
    projection = vi.project_rows(store, "fixed")
    assert vi.plot_projection(projection, ax=ax[3]) is ax[3]
    assert sum(len(c.get_offsets()) for c in ax[3].collections) == len(projection)
    assert [t.get_text() for t in ax[3].get_legend().get_texts()] == NAMES
    assert vi.plot_series(store, "ep_c", "state", family="fixed", ax=ax[4]) is ax[4]
    assert len(ax[4].lines) == 2 and len(ax[4].collections[0].get_segments()) == 3  # x, y; vlm_idx 0, 1, 2
    assert vi.plot_drift(vi.generation_drift(store, "fixed"), ax=ax[5]) is ax[5]
    assert ax[5].patches[0].get_data().values.sum() == 6
    created = vi.plot_norms(stats)  # no ax: a new figure
    assert created.figure is not fig
    plt.close("all")


def _rebuilt_store(path: Path, steps: tuple[int, ...], values, write: bool = True) -> VLAStore:
    """A family with two generations holding the same values: a rebuild that changed nothing."""
    store = VLAStore.create(
        path, [EpisodeData(f"e{i}", {"state": np.zeros((n, 2), np.float32)}) for i, n in enumerate(steps)]
    )
    store.add_family("f", FamilySpec((4,), "float32", vlm_reuse_count=1), producer=Producer("m", fingerprint="a"))
    second = store.new_generation("f", Producer("m", fingerprint="b"))
    rows = store.layout("f").rows
    for generation in (1, second.generation):
        with store.writer("f", generation=generation) as writer:
            if write and rows:
                writer.write_rows(np.arange(rows), values(rows))
    store.switch_generation("f", second.generation, keep_previous=None)
    return store


@pytest.mark.parametrize(
    "steps, values, write",
    [
        # a rebuild that changed nothing: cosines of 1 +- 1 ulp
        ((200, 200), lambda n: np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), True),
        ((5, 5), lambda n: np.ones((n, 4), np.float32), True),  # constant
        ((5,), lambda n: np.full((n, 4), 1e-30, np.float32), True),  # tiny and constant
        ((1,), lambda n: np.arange(4 * n, dtype=np.float32).reshape(n, 4), True),  # one row
        ((3,), None, False),  # planned, nothing written
        ((0,), None, False),  # an episode without steps: no rows at all
    ],
    ids=["unchanged-rebuild", "constant", "tiny-constant", "one-row", "empty", "no-rows"],
)
def test_every_helper_works_on_degenerate_data(tmp_path: Path, steps, values, write) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    store = _rebuilt_store(tmp_path / "s.vla", steps, values, write)
    stats = vi.family_stats(store, "f")
    assert stats["hist_counts"].sum() == (stats["values"] if write else 0)
    drift = vi.generation_drift(store, "f")
    if write:
        assert np.allclose(drift["rel_l2"], 0) and np.allclose(drift["cosine"][np.isfinite(drift["cosine"])], 1)
    vi.drift_summary(drift)
    for draw in (
        lambda ax: vi.plot_drift(drift, ax=ax),
        lambda ax: vi.plot_drift(drift, ax=ax, metric="cosine"),
        lambda ax: vi.plot_norms(stats, ax=ax),
        lambda ax: vi.plot_histogram(stats, ax=ax),
        lambda ax: vi.plot_projection(vi.project_rows(store, "f"), ax=ax),
        lambda ax: vi.plot_coverage(vi.coverage_table(store), ax=ax),
        lambda ax: vi.plot_series(store, 0, "state", family="f", ax=ax),
    ):
        figure, ax = plt.subplots()
        assert draw(ax) is ax
        plt.close(figure)


def test_histogram_counts_every_finite_value_whatever_its_range() -> None:
    for values in ([], [np.nan], [1.0], [1.0, np.nextafter(1.0, 2.0)], [0.0, 1e-300], [-1.0, 3.0, np.inf]):
        counts, edges = vi.histogram(np.asarray(values), 40)
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        assert counts.sum() == finite.size and len(edges) == 41 and np.all(np.diff(edges) > 0)
        assert all(edges[0] <= v <= edges[-1] for v in finite)
