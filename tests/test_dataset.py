"""VLADataset (vlastore/dataset.py): values, windows, DataLoader workers, coverage, generations."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from reader_stores import DTYPES, REUSE, STEPS, make_store
from torch.utils.data import DataLoader, DistributedSampler
from zarr.storage import MemoryStore

from vlastore.dataset import Batch, FingerprintMismatchError, MissingFeaturesError, VLADataset, collate
from vlastore.format import FamilySpec, Producer
from vlastore.reader import MissingRowError
from vlastore.store import VLAStore

FAMILIES = [f"{kind}_{dtype}" for dtype in DTYPES for kind in ("fixed", "ragged")]


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ds") / "s.vla")


def bits(tensor: torch.Tensor) -> np.ndarray:
    """A feature tensor in its storage form (bfloat16 as uint16 bits) for exact comparison."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def expected_window(known, episode: int, step: int, key: str, deltas: range) -> tuple[np.ndarray, np.ndarray]:
    first = sum(STEPS[:episode])
    picks, pads = [], []
    for d in deltas:
        t = step + d
        pads.append(not 0 <= t < STEPS[episode])
        picks.append(first + min(max(t, 0), STEPS[episode] - 1))
    return known.series[key][picks], np.array(pads)


def check_sample(known, sample: dict, n_obs: int, horizon: int) -> None:
    e, t = sample["episode_index"], sample["step"]
    assert sample["episode"] == f"episode_{e:03d}"
    for family in FAMILIES:
        dtype = family.split("_", 1)[1]
        vlm_idx = t // REUSE[dtype]
        items = [-(-n // REUSE[dtype]) for n in STEPS]
        row = sum(items[:e]) + vlm_idx
        assert sample[f"{family}_vlm_idx"] == vlm_idx
        np.testing.assert_array_equal(bits(sample[family]), known.values[family][row])
        assert str(sample[family].dtype) == f"torch.{dtype}"
    for key, deltas in (("state", range(-(n_obs - 1), 1)), ("action", range(horizon))):
        values, pads = expected_window(known, e, t, key, deltas)
        np.testing.assert_array_equal(sample[key].numpy(), values)
        np.testing.assert_array_equal(sample[f"{key}_is_pad"].numpy(), pads)


@pytest.mark.parametrize("n_obs,horizon", [(1, 1), (3, 8)])
def test_every_sample_holds_the_values_written(known, n_obs, horizon) -> None:
    ds = VLADataset(known.store, features=FAMILIES, n_obs_steps=n_obs, horizon=horizon)
    assert len(ds) == sum(STEPS)
    seen = set()
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["index"] == i
        check_sample(known, sample, n_obs, horizon)
        seen.add((sample["episode_index"], sample["step"]))
    assert seen == {(e, t) for e, n in enumerate(STEPS) for t in range(n)}


@pytest.mark.parametrize("names", [True, False])
def test_getitems_and_collate_equal_getitem_one_by_one(known, names) -> None:
    ds = VLADataset(known.store, features=FAMILIES, n_obs_steps=2, horizon=4, batch_episode_names=names)
    indices = [0, 7, 8, 20, 62, 5, 5, 40, -1]
    batch = collate(ds.__getitems__(indices))
    assert isinstance(batch, Batch)
    one_by_one = collate([ds[i] for i in indices])
    # episode names ride along only when asked for (a Python list per batch); ids name them on demand
    assert ("episode" in batch) == names
    assert [ds.episode_name(e) for e in batch["episode_index"]] == one_by_one.pop("episode")
    batch.pop("episode", None)
    assert batch["index"].tolist() == [i % len(ds) for i in indices]
    assert batch.keys() == one_by_one.keys()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == one_by_one[key].dtype and torch.equal(value, one_by_one[key]), key
        else:
            assert value == one_by_one[key], key
    for family in FAMILIES:
        if family.startswith("ragged"):
            lengths = batch[f"{family}_length"]
            assert torch.equal(batch[f"{family}_is_pad"], torch.arange(int(lengths.max()))[None] >= lengths[:, None])
    # the lazy per-sample view of a batch (for collate functions other than ours) holds the same values
    samples = ds.__getitems__(indices)
    for i, sample in enumerate(samples):
        check_sample(known, sample, 2, 4)
        assert sample["index"] == indices[i] % len(ds)


def test_series_read_from_the_store_equal_series_held_in_ram(known) -> None:
    in_ram = VLADataset(known.store, features=["fixed_float32"], horizon=5)
    on_disk = VLADataset(known.store, features=["fixed_float32"], horizon=5, series_in_ram=False)
    a, b = collate(in_ram.__getitems__(range(30, 50))), collate(on_disk.__getitems__(range(30, 50)))
    for key in ("state", "action", "state_is_pad", "action_is_pad"):
        assert torch.equal(a[key], b[key])


def _all_batches(ds: VLADataset, **kwargs) -> list[dict]:
    return list(ds.dataloader(batch_size=7, shuffle=False, **kwargs))


def _same(batches_a: list[dict], batches_b: list[dict]) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


LOADERS = [pytest.param(False, id="VLADataLoader"), pytest.param(True, id="torch-DataLoader")]


@pytest.mark.parametrize(
    ("context", "torch_loader"),
    [
        pytest.param("fork", False, id="fork-VLADataLoader"),
        pytest.param("fork", True, id="fork-torch-DataLoader"),
        pytest.param("spawn", False, id="spawn-VLADataLoader"),  # torch's loader under spawn: tests/test_transport.py
    ],
)
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_two_workers_return_the_batches_of_one_process(known, context, torch_loader) -> None:
    ds = VLADataset(
        known.store,
        features=["fixed_bfloat16", "ragged_float16"],
        horizon=3,
        delta_steps={"state": [-2, 0]},
        batch_episode_names=True,
    )
    ds[0]  # shards mapped before the workers start: each worker must map its own
    single = _all_batches(ds)
    # pin_memory=True: pinned on a machine with CUDA, a warning and plain memory without
    loader = ds.dataloader(
        batch_size=7,
        shuffle=False,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,
        pin_memory=True,
        torch_loader=torch_loader,
    )
    for _epoch in range(2):  # the same persistent workers twice
        workers = list(loader)
        _same(single, workers)
        assert all(type(b) is Batch for b in workers)
        if torch.cuda.is_available():
            assert all(b["fixed_bfloat16"].is_pinned() for b in workers)
    # a pass abandoned halfway leaves batches in flight; the next pass starts clean
    partial = iter(loader)
    next(partial)
    _same(single, list(loader))


@pytest.mark.parametrize("torch_loader", LOADERS)
def test_workers_without_persistence_across_epochs_and_two_loaders_at_once(known, torch_loader) -> None:
    """New worker processes every epoch (new rings), two loaders' workers alive together."""
    ds = VLADataset(known.store, features=["fixed_float32"], horizon=2)
    single = _all_batches(ds)
    a = ds.dataloader(batch_size=7, shuffle=False, num_workers=2, torch_loader=torch_loader)
    b = ds.dataloader(batch_size=7, shuffle=False, num_workers=1, torch_loader=torch_loader, prefetch_factor=8)
    for _epoch in range(3):
        got_a, got_b = [], []
        for x, y in zip(a, b, strict=True):  # both loaders' workers hand over batches in turn
            got_a.append(x)
            got_b.append(y)
        _same(single, got_a)
        _same(single, got_b)


def test_distributed_sampler_with_two_replicas_covers_every_sample_once(known) -> None:
    ds = VLADataset(known.store, features=["fixed_float16"])
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        for batch in DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=collate):
            seen.extend(batch["index"].tolist())
    assert len(ds) % 2 == 1 and len(seen) == len(ds) + 1  # DistributedSampler pads odd lengths by one
    assert sorted(set(seen)) == list(range(len(ds)))


def test_a_fingerprint_mismatch_is_refused(known) -> None:
    VLADataset(known.store, features=["fixed_float32"], expect_fingerprint="fp-float32")
    with pytest.raises(FingerprintMismatchError, match=r"'fixed_float32' generation 1.*'fp-float32'.*'other'"):
        VLADataset(known.store, features=["fixed_float32"], expect_fingerprint="other")
    with pytest.raises(FingerprintMismatchError, match="fixed_float16"):
        VLADataset(
            known.store,
            features=["fixed_float32", "fixed_float16"],
            expect_fingerprint={"fixed_float32": "fp-float32", "fixed_float16": "fp-float32"},
        )


@pytest.fixture
def partial(tmp_path):
    """A family with rows of episode_003 (vlm_idx 2..4) never written."""
    known = make_store(tmp_path / "p.vla", families=())
    store = known.store
    store.add_family(
        "part",
        FamilySpec((2,), "float32", vlm_reuse_count=3, rows_per_shard=100),
        producer=Producer(fingerprint="abc123456789"),
    )
    rows = store.layout("part").rows
    missing = [store.row("part", "episode_003", i) for i in (2, 3, 4)]
    keep = [r for r in range(rows) if r not in missing]
    with store.writer("part") as writer:
        writer.write_rows(keep, np.ones((len(keep), 2), np.float32))
    return store


def test_missing_rows_raise_naming_them_or_are_skipped(partial, caplog) -> None:
    with pytest.raises(MissingFeaturesError, match=r"3 rows .*'episode_003', vlm_idx=2.*on_missing='skip'"):
        VLADataset(partial, features=["part"])
    assert issubclass(MissingFeaturesError, MissingRowError)
    with caplog.at_level(logging.INFO, logger="vlastore.dataset"):
        ds = VLADataset(partial, features=["part"], on_missing="skip")
    assert "features part: 20/23 rows present (generation 1, fingerprint abc12345...)" in caplog.text
    assert len(ds) == sum(STEPS) - 9  # steps 6..14 of episode_003 need the missing rows
    steps = {(s["episode"], s["step"]) for s in ds}
    assert ("episode_003", 5) in steps and ("episode_003", 15) in steps and ("episode_003", 6) not in steps
    batch = collate(ds.__getitems__([0, -1, len(ds) - 2]))
    assert batch["index"].tolist() == [0, len(ds) - 1, len(ds) - 2]  # positions among the samples kept
    assert batch["step"].tolist()[1:] == [ds[len(ds) - 1]["step"], ds[len(ds) - 2]["step"]]


def test_episode_subsets_and_a_split_by_episode(known) -> None:
    ds = VLADataset(known.store, features=["fixed_float32"])
    sub = ds.subset(["episode_003", 1])
    assert len(sub) == STEPS[3] + STEPS[1]
    assert {s["episode"] for s in sub} == {"episode_003", "episode_001"}
    train, val = ds.split(val_fraction=0.34, seed=1)
    assert not set(train.episode_names) & set(val.episode_names)
    assert sorted(train.episode_names + val.episode_names) == sorted(known.store.datasets)
    assert len(train) + len(val) == len(ds)
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        ds.subset(["nope"])


def test_bad_arguments_say_what_to_do(known) -> None:
    with pytest.raises(KeyError, match="unknown feature family"):
        VLADataset(known.store, features=["nope"])
    with pytest.raises(KeyError, match="obs_keys="):
        VLADataset(known.store, features=[], obs_keys=["joints"])
    with pytest.raises(ValueError, match="on_missing"):
        VLADataset(known.store, features=[], on_missing="ignore")
    with pytest.raises(ValueError, match="both obs_keys and action_keys"):
        VLADataset(known.store, features=[], obs_keys=["state"], action_keys=["state"])
    with pytest.raises(IndexError, match="vlm_reuse_count"):  # 1 step per row needs 3x the rows planned
        VLADataset(known.store, features=["fixed_bfloat16"], vlm_reuse_count=1)


def test_vlm_reuse_count_override(known) -> None:
    ds = VLADataset(known.store, features=["fixed_float16"], vlm_reuse_count={"fixed_float16": 2})
    sample = ds[5]
    assert sample["fixed_float16_vlm_idx"] == sample["step"] // 2


def test_a_non_local_store_reads_correctly() -> None:
    known = make_store(MemoryStore())
    ds = VLADataset(known.store, features=FAMILIES, n_obs_steps=2, horizon=3)
    for i in (0, 9, 30, len(ds) - 1):
        check_sample(known, ds[i], 2, 3)
    batch = collate(ds.__getitems__([3, 1, 50]))
    assert batch["fixed_bfloat16"].shape == (3, 2, 3)


def test_a_dataset_pickles_and_reads_the_same_after(known) -> None:
    ds = VLADataset(known.store, features=["fixed_bfloat16", "ragged_float32"])
    ds[3]
    copy = pickle.loads(pickle.dumps(ds))
    _same([collate(ds.__getitems__([3, 4]))], [collate(copy.__getitems__([3, 4]))])
    batch = collate(ds.__getitems__([3, 4]))
    _same([batch], [pickle.loads(pickle.dumps(batch))])  # small batches travel as bytes, come back as tensors


def _new_generation(path, fingerprint: str, fill: float) -> None:
    store = VLAStore.open(path, writable=True)
    info = store.new_generation("fixed_float32", Producer("test/model", "r2", fingerprint=fingerprint))
    rows = store.layout("fixed_float32", info.generation).rows
    with store.writer("fixed_float32", generation=info.generation) as writer:
        writer.write_rows(np.arange(rows), np.full((rows, 2, 3), fill, np.float32))
    store.switch_generation("fixed_float32", info.generation)


@pytest.mark.parametrize("torch_loader", LOADERS)
def test_refresh_switches_generations_in_the_process_and_in_persistent_workers(tmp_path, torch_loader) -> None:
    known = make_store(tmp_path / "g.vla", families=("fixed",))
    ds = VLADataset(tmp_path / "g.vla", features=["fixed_float32"], expect_fingerprint="fp-float32")
    loader = ds.dataloader(
        batch_size=16, num_workers=2, persistent_workers=True, multiprocessing_context="fork", torch_loader=torch_loader
    )
    before = list(loader)
    old_view = ds[0]["fixed_float32"]
    np.testing.assert_array_equal(before[0]["fixed_float32"][0].numpy(), known.values["fixed_float32"][0])

    _new_generation(tmp_path / "g.vla", "fp-new", 7.0)  # old generation's files are deleted
    with pytest.raises(FingerprintMismatchError):
        ds.refresh()
    assert ds.generations == {"fixed_float32": 1}
    np.testing.assert_array_equal(old_view.numpy(), known.values["fixed_float32"][0])  # still mapped, still valid
    rows = sum(-(-n // REUSE["float32"]) for n in STEPS)
    assert ds.refresh(expect_fingerprint="fp-new") == {"fixed_float32": (2, rows)}
    assert float(ds[0]["fixed_float32"][0, 0]) == 7.0
    after = list(loader)  # the same persistent workers
    assert all(bool((b["fixed_float32"] == 7.0).all()) for b in after)
    np.testing.assert_array_equal(old_view.numpy(), known.values["fixed_float32"][0])


def test_demo_command_reads_a_batch_through_the_dataloader(tmp_path, capsys) -> None:
    from vlastore.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo.vla")]) == 0
    out = capsys.readouterr().out
    assert "VLADataset" in out and "qwen_vl: (4, 2048) torch.bfloat16" in out and "action_is_pad" in out


# ---------------------------------------------------------------- delta windows, stats, resumable loader


def _check_windows(known, ds: VLADataset, deltas: dict[str, list[int]]) -> None:
    for batch in (collate(ds.__getitems__(range(len(ds)))), None):
        for i in range(len(ds)):
            sample = ds[i] if batch is None else {k: v[i] for k, v in batch.items() if k != "episode"}
            e, t = int(sample["episode_index"]), int(sample["step"])
            for key, offsets in deltas.items():
                values, pads = expected_window(known, e, t, key, offsets)
                np.testing.assert_array_equal(sample[key].numpy(), values)
                np.testing.assert_array_equal(sample[f"{key}_is_pad"].numpy(), pads)


def test_delta_steps_read_any_offsets_per_key(known) -> None:
    deltas = {"state": [-4, -2, 0], "action": [0, 1, 5, 9]}
    ds = VLADataset(known.store, features=[], delta_steps=deltas)
    _check_windows(known, ds, deltas)
    assert ds[0]["state"].shape == (3, 3) and ds[0]["action_is_pad"].shape == (4,)
    # a key outside obs_keys/action_keys is read too; the others keep the short form
    only = VLADataset(known.store, features=[], obs_keys=(), n_obs_steps=1, horizon=2, delta_steps={"state": [3]})
    _check_windows(known, only, {"state": [3], "action": [0, 1]})


def test_delta_timestamps_at_an_fps_or_through_timestamps_equal_their_step_offsets(known) -> None:
    steps = {"state": [-2, 0], "action": [0, 3, 6]}
    seconds = {"state": [-0.2, 0.0], "action": [0.0, 0.3, 0.6]}
    by_fps = VLADataset(known.store, features=[], delta_timestamps=seconds, fps=10)
    _check_windows(known, by_fps, steps)
    per_episode = VLADataset(known.store, features=[], delta_timestamps=seconds, fps=[10.0] * len(STEPS))
    _check_windows(known, per_episode, steps)
    _, step_of = sample_table_of(known)
    ts = step_of / 10.0 + 0.00003  # recorded times, slightly off the grid
    by_time = VLADataset(known.store, features=[], delta_timestamps=seconds, timestamps=ts)
    _check_windows(known, by_time, steps)
    sub = by_time.subset(["episode_003"])  # subsets keep the windows
    _check_windows(known, sub, steps)
    assert len(sub) == STEPS[3]


def sample_table_of(known):
    from vlastore.windows import sample_table

    return sample_table(known.store.catalog.steps, np.arange(len(STEPS)))


def test_bad_time_offsets_are_refused_at_construction(known) -> None:
    with pytest.raises(ValueError, match=r"delta 0\.05 s is not a multiple of 1/fps = 1/30 s"):
        VLADataset(known.store, features=[], delta_timestamps={"action": [0.0, 0.05]}, fps=30)
    with pytest.raises(ValueError, match="fps= "):
        VLADataset(known.store, features=[], delta_timestamps={"action": [0.1]})
    with pytest.raises(ValueError, match="one per catalog episode"):
        VLADataset(known.store, features=[], delta_timestamps={"action": [0.1]}, fps=[10, 10])
    _, step_of = sample_table_of(known)
    ts = step_of / 10.0
    ts[sum(STEPS[:3]) + 5 :] += 0.05  # episode_003 has a 0.15 s gap after its step 4
    with pytest.raises(ValueError, match=r"episode episode_003 step \d+: the recording has a gap"):
        VLADataset(known.store, features=[], delta_timestamps={"action": [0.0, 0.1]}, timestamps=ts)
    with pytest.raises(KeyError, match="unknown series 'nope'"):
        VLADataset(known.store, features=[], delta_steps={"nope": [0]})


def test_stats_of_a_dataset_are_those_of_its_episodes_exactly(known) -> None:
    ds = VLADataset(known.store, features=["fixed_float32"])
    train, val = ds.split(val_fraction=0.34, seed=2)
    for part in (ds, train, val, ds.subset(["episode_004", "episode_000"])):
        rows = np.concatenate([np.arange(*known.store.catalog.step_range(e)) for e in part.episode_names])
        for key in ("state", "action"):
            data = known.series[key][rows]
            stats = part.stats[key]
            assert stats.count == len(rows)
            q01, q99 = np.quantile(data, [0.01, 0.99], axis=0)
            np.testing.assert_array_equal(stats["q01"], q01)
            np.testing.assert_array_equal(stats["q99"], q99)
            np.testing.assert_array_equal(stats.min, data.min(axis=0))
            np.testing.assert_array_equal(stats.max, data.max(axis=0))
            np.testing.assert_allclose(stats.mean, data.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(stats.std, data.astype(np.float64).std(axis=0), rtol=1e-10)
    assert set(ds.stats) == {"state", "action"}
    median = ds.series_stats("action", quantiles=[0.5])
    np.testing.assert_array_equal(median["q50"], np.quantile(known.series["action"], [0.5], axis=0)[0])


def test_the_resumable_loader_keeps_what_dataloader_does(known) -> None:
    ds = VLADataset(known.store, features=["fixed_bfloat16", "ragged_float16"], horizon=3)
    plain = _all_batches(ds)
    resumable = list(ds.dataloader(batch_size=7, resumable=True, num_workers=2, multiprocessing_context="fork"))
    _same(plain, resumable)
    assert ds.dataloader(batch_size=7, resumable=True, shuffle=True).epoch == 0
