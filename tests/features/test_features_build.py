"""build_features / `vlastore build-features`: rows, pooling, ranks, resume, out-of-memory backoff."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlastore.features import (
    DataFolder,
    FeatureMismatchError,
    build_features,
    compute_rows,
    get_extractor,
    rebuild_features,
)
from vlastore.features.qwen import TransformersVLExtractor
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _rows(store_path: Path, family: str = "qwen_vl") -> list[np.ndarray]:
    store = VLAStore.open(store_path)
    reader = store.reader(family)
    return [np.array(reader.row(r)) for r in range(store.layout(family).rows)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _reference(extractor: TransformersVLExtractor, source: DataFolder, dataset: str, vlm_idx: int) -> torch.Tensor:
    """One row computed directly with the model and processor (no vlastore batching)."""
    item = source.item(dataset, vlm_idx, vlm_idx * 3)
    inputs = extractor.processor(text=[extractor.text(item)], images=item.load_images(), return_tensors="pt")
    with torch.no_grad():
        out = extractor.model.model(**inputs)
    return out.last_hidden_state[0]


def test_build_writes_every_row_with_the_models_features(episodes, tiny_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    stats = build_features(store_path, tiny_extractor, source, rows_per_shard=4, batch_size=3, progress=False)
    store = VLAStore.open(store_path)
    assert store.coverage("qwen_vl").all()
    assert stats.rows == store.layout("qwen_vl").rows == sum(-(-n // 3) for n in store.catalog.steps)
    info = store.generation("qwen_vl")
    assert info.producer.fingerprint == tiny_extractor.fingerprint()
    assert info.producer.params["pooling"] == "mean"
    assert info.spec.vlm_reuse_count == 3
    name = store.datasets[1]
    expected = _reference(tiny_extractor, source, name, 2).mean(0)
    torch.testing.assert_close(store.feature("qwen_vl", name, 2), expected, rtol=1e-4, atol=1e-5)
    # rows of different items differ (the images at step vlm_idx * 3 are used)
    assert not torch.equal(store.feature("qwen_vl", name, 1), store.feature("qwen_vl", name, 2))


@pytest.mark.parametrize("pooling", ["last", "all"])
def test_pooling_last_and_all_tokens(episodes, tiny_model_dir, tiny_extractor, pooling):
    store_path, data = episodes
    source = DataFolder(data)
    extractor = TransformersVLExtractor(
        tiny_extractor.model, tiny_extractor.processor, pooling=pooling, dtype="float32"
    )
    build_features(store_path, extractor, source, family=f"f_{pooling}", batch_size=4, progress=False)
    store = VLAStore.open(store_path)
    name = store.datasets[0]
    hidden = _reference(tiny_extractor, source, name, 1)
    got = store.feature(f"f_{pooling}", name, 1)
    if pooling == "last":
        torch.testing.assert_close(got, hidden[-1], rtol=1e-4, atol=1e-5)
    else:
        assert store.spec(f"f_{pooling}").ragged
        assert got.shape == hidden.shape  # lengths planned with the processor alone match the forward
        torch.testing.assert_close(got, hidden, rtol=1e-4, atol=1e-5)


# Rows computed in batches of different composition (4 items per batch in one process, 3 per rank under
# torchrun) are padded to different lengths and go through float32 matmuls blocked differently: the same row
# can differ in its last bits (seen: 6e-8 absolute on values of ~0.5, 1-2 ulps, with any thread count). Hidden
# states are O(1), so rtol 1e-5 / atol 1e-6 leaves ~100x margin over that noise and stays far below what a
# real change makes (the perturbed weights below move rows by more than 1e-2).
BATCHING_RTOL, BATCHING_ATOL = 1e-5, 1e-6


def test_two_ranks_under_torchrun_equal_one_process_then_rebuild(episodes, tiny_model_dir, tiny_extractor, tmp_path):
    """`vlastore build-features` on 2 gloo ranks, then a 2-rank rebuild with the live model changed.

    Equal to one process up to float32 noise (batches differ); bit-identical where the batches are the same.
    """
    store_path, data = episodes
    single = tmp_path / "single.vla"
    shutil.copytree(store_path, single)
    pristine = tmp_path / "pristine.vla"
    shutil.copytree(store_path, pristine)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "dist_worker.py"),
        str(store_path),
        str(data),
        str(tiny_model_dir),
        str(tmp_path),
    ]
    done = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    build_features(single, tiny_extractor, DataFolder(data), rows_per_shard=2, batch_size=4, progress=False)
    first = _rows(single)

    per_rank = [json.loads((tmp_path / f"stats-{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in per_rank] == [2, 2]
    assert all(s["rows"] > 0 for s in per_rank)  # both ranks computed rows
    assert sum(s["rows"] for s in per_rank) == len(first)
    assert per_rank[0]["fingerprint"] == tiny_extractor.fingerprint()

    # the rebuild: generation 2 (with the changed weights) is current, generation 1 is kept for old readers
    rebuilt = [json.loads((tmp_path / f"rebuild-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["previous"], r["generation"]) for r in rebuilt] == [(1, 2), (1, 2)]
    store = VLAStore.open(store_path)
    assert store.manifest.families["qwen_vl"].current_generation == 2
    assert store.manifest.families["qwen_vl"].generations == (1, 2)
    assert store.generation("qwen_vl").producer.fingerprint == rebuilt[0]["fingerprint"] != per_rank[0]["fingerprint"]
    old_reader = store.reader("qwen_vl", generation=1)
    for r, expected in enumerate(first):
        np.testing.assert_allclose(old_reader.row(r), expected, rtol=BATCHING_RTOL, atol=BATCHING_ATOL)
    # the same batches as each torchrun rank (world size 2, 3 items per batch, one thread), in this process:
    # bit-identical rows
    same = VLAStore.open(pristine, writable=True)
    info = store.generation("qwen_vl", 1)
    same.add_family("qwen_vl", info.spec, np.diff(store.layout("qwen_vl", 1).episode_rows), producer=info.producer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rank in (0, 1):
            compute_rows(
                same, "qwen_vl", tiny_extractor, DataFolder(data), batch_size=3, rank=rank, world_size=2, progress=False
            )
    finally:
        torch.set_num_threads(threads)
    for r, got in enumerate(_rows(pristine)):
        np.testing.assert_array_equal(got, old_reader.row(r))

    import dist_worker

    changed = get_extractor("transformers-vl", model=str(tiny_model_dir), device="cpu", dtype="float32")
    dist_worker.perturb(changed.model)
    assert changed.fingerprint() == rebuilt[0]["fingerprint"]
    rebuild_single = rebuild_features(single, "qwen_vl", changed, DataFolder(data), batch_size=4, progress=False)
    assert rebuild_single.generation == 2
    for a, b in zip(_rows(store_path), _rows(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=BATCHING_RTOL, atol=BATCHING_ATOL)
    assert np.abs(_rows(store_path)[0] - first[0]).max() > 1e-2  # the rebuild really changed the rows


def test_a_run_killed_with_sigkill_resumes_where_it_stopped(episodes, tmp_path):
    store_path, data = episodes
    clean = tmp_path / "clean.vla"
    shutil.copytree(store_path, clean)
    # a plug-in extractor as slow as a small model, so the kill lands mid-run
    cmd = [
        sys.executable,
        "-m",
        "vlastore",
        "build-features",
        str(store_path),
        "--data-root",
        str(data),
        "--extractor",
        "features_plugins:slow_patch_colors",
        "--rows-per-shard",
        "2",
        "--batch-size",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    values = store_path / "features" / "qwen_vl" / "gen-0001" / "values" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if values.is_dir() and len(os.listdir(values)) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    rows = VLAStore.open(store_path).layout("qwen_vl").rows
    written = int(VLAStore.open(store_path).coverage("qwen_vl").sum())
    assert 0 < written < rows

    import features_plugins

    extractor = get_extractor("features_plugins:slow_patch_colors")
    stats = build_features(store_path, extractor, DataFolder(data), progress=False)
    assert stats.rows_skipped == written and stats.rows == rows - written
    build_features(
        clean, get_extractor("features_plugins:slow_patch_colors"), DataFolder(data), rows_per_shard=2, progress=False
    )
    for a, b in zip(_rows(store_path), _rows(clean), strict=True):
        np.testing.assert_array_equal(a, b)
    assert features_plugins.patch_colors is not None


def test_existing_family_of_other_weights_is_refused(episodes, tiny_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    store = VLAStore.open(store_path, writable=True)
    from vlastore.format import FamilySpec, Producer

    store.add_family(
        "qwen_vl",
        FamilySpec((32,), "float32", vlm_reuse_count=3),
        producer=Producer("other", fingerprint="blake2b:0000", params=tiny_extractor.params()),
    )
    with pytest.raises(FeatureMismatchError, match="rebuild"):
        build_features(store_path, tiny_extractor, source, progress=False)


class _OutOfMemoryAbove(TransformersVLExtractor):
    """The tiny model, failing like a full GPU on batches larger than ``limit``."""

    limit = 2

    def compute(self, prepared):
        n = len(prepared["items"])
        self.seen.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().compute(prepared)


def test_batch_size_backs_off_on_out_of_memory(episodes, tiny_extractor):
    store_path, data = episodes
    extractor = _OutOfMemoryAbove(tiny_extractor.model, tiny_extractor.processor, dtype="float32")
    extractor.seen = []
    stats = build_features(store_path, extractor, DataFolder(data), batch_size=8, progress=False)
    assert stats.oom_backoffs >= 1 and stats.batch_size <= 2
    assert extractor.seen[0] == 8 and extractor.seen[-1] <= 2
    store = VLAStore.open(store_path)
    assert store.coverage("qwen_vl").all()
    name = store.datasets[2]
    torch.testing.assert_close(
        store.feature("qwen_vl", name, 3),
        _reference(tiny_extractor, DataFolder(data), name, 3).mean(0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_cli_reports_a_missing_data_root_in_one_line(episodes, tiny_model_dir, tmp_path):
    from vlastore.cli import main

    store_path, _ = episodes
    code = main(
        ["build-features", str(store_path), "--data-root", str(tmp_path / "nope"), "--model", str(tiny_model_dir), "-q"]
    )
    assert code == 2


def test_data_folder_convention_errors_name_the_file(episodes, tmp_path):
    store_path, data = episodes
    source = DataFolder(data, instruction_file="task.json")
    name = VLAStore.open(store_path).datasets[0]
    with pytest.raises(FileNotFoundError, match="task.json"):
        source.instruction_of(name)
    (tmp_path / name / "cam").mkdir(parents=True)
    (tmp_path / name / "task.json").write_text('{"language_instruction": "open the drawer"}')
    other = DataFolder(tmp_path, image_pattern="frame_{step}.jpg", instruction_file="task.json")
    item = other.item(name, 2, 6)
    assert item.instruction == "open the drawer"
    assert item.images == (tmp_path / name / "frame_6.jpg",)
    with pytest.raises(FileNotFoundError, match="frame_6.jpg"):
        item.load_images()


def test_get_extractor_loads_by_id(tiny_model_dir):
    extractor = get_extractor("qwen-vl", model=str(tiny_model_dir), pooling="last", device="cpu")
    assert extractor.row_shape == (32,) and extractor.dtype == "float32" and extractor.pooling == "last"


def test_cli_builds_then_rebuilds_a_new_generation(episodes, tiny_model_dir, capsys):
    from vlastore.cli import main

    store_path, data = episodes
    common = ["--data-root", str(data), "--model", str(tiny_model_dir), "--pooling", "last", "-q"]
    assert main(["build-features", str(store_path), *common]) == 0
    first = _rows(store_path)
    assert main(["build-features", str(store_path), *common, "--pooling", "mean"]) == 2  # other params: refused
    assert "--rebuild" in capsys.readouterr().err
    assert main(["build-features", str(store_path), *common, "--rebuild"]) == 0
    store = VLAStore.open(store_path)
    assert store.manifest.families["qwen_vl"].current_generation == 2
    assert store.manifest.families["qwen_vl"].generations == (1, 2)
    for a, b in zip(first, _rows(store_path), strict=True):
        np.testing.assert_array_equal(a, b)  # same weights, same rows


def test_a_rerun_fills_holes_and_repair_rewrites_corrupt_rows(episodes, tmp_path):
    """Holes left at close() are filled by the next run; --repair recomputes rows that fail their crc32c."""
    from vlastore.cli import main
    from vlastore.report import verify_store

    store_path, data = episodes
    extractor = get_extractor("features_plugins:patch_colors")
    build_features(store_path, extractor, DataFolder(data), rows_per_shard=4, progress=False)
    complete = _rows(store_path)
    store = VLAStore.open(store_path, writable=True)
    layout = store.layout("qwen_vl")
    # make holes: rewrite shard 0 with two of its rows left out (as a run that skipped them would)
    (store_path / store.shard_key("qwen_vl", 0)).unlink()
    with store.writer("qwen_vl") as writer:
        writer.write_rows([0, 3], np.stack([complete[0], complete[3]]))
    # and damage a row of shard 1
    shard1 = store_path / store.shard_key("qwen_vl", 1)
    raw = bytearray(shard1.read_bytes())
    raw[3] ^= 0x20  # row 4's payload
    shard1.write_bytes(bytes(raw))
    report = verify_store(store_path)
    assert report.missing["qwen_vl"].rows == 2 and len(report.corrupt) == 1
    stats = build_features(store_path, get_extractor("features_plugins:patch_colors"), DataFolder(data), progress=False)
    assert stats.rows == 2  # the holes, nothing else
    assert not verify_store(store_path).missing and len(verify_store(store_path).corrupt) == 1
    code = main(
        [
            "build-features",
            str(store_path),
            "--data-root",
            str(data),
            "--extractor",
            "features_plugins:patch_colors",
            "--repair",
            "-q",
        ]
    )
    assert code == 0 and verify_store(store_path).ok
    for a, b in zip(_rows(store_path), complete, strict=True):
        np.testing.assert_array_equal(a, b)
    assert layout.rows == len(complete)
