"""rebuild_features: a new generation from a live model, switched in while readers keep working."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlastore.features import DataFolder, FeatureMismatchError, build_features, rebuild_features
from vlastore.features.qwen import TransformersVLExtractor
from vlastore.store import VLAStore


@pytest.fixture
def live_extractor(tiny_extractor):
    """A private copy of the tiny model (these tests change its weights, as training does)."""
    import copy

    model = copy.deepcopy(tiny_extractor.model)
    return TransformersVLExtractor(model, tiny_extractor.processor, dtype="float32", model_name="tiny-lora")


def _train_step(model: torch.nn.Module, seed: int) -> None:
    """Stands in for an optimiser step on the adapter: a small change to some weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model.layers.1" in name and name.endswith("proj.weight"):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_rebuild_during_an_epoch_keeps_the_running_reader_and_the_next_epoch_sees_it(episodes, live_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    build_features(store_path, live_extractor, source, rows_per_shard=3, batch_size=4, progress=False)

    training_view = VLAStore.open(store_path)  # what the training Dataset holds (read-only)
    reader = training_view.reader("qwen_vl")
    rows = training_view.layout("qwen_vl").rows
    epoch_1 = [np.array(reader.row(r)) for r in range(rows // 2)]  # half an epoch read ...

    _train_step(live_extractor.model, seed=1)
    result = rebuild_features(store_path, "qwen_vl", live_extractor, source, batch_size=4, progress=False)
    assert (result.previous, result.generation) == (1, 2)

    # ... the rest of the epoch still reads generation 1, including shards it had not opened yet
    epoch_1 += [np.array(reader.row(r)) for r in range(rows // 2, rows)]
    old = VLAStore.open(store_path).reader("qwen_vl", generation=1)
    for r, value in enumerate(epoch_1):
        np.testing.assert_array_equal(value, old.row(r))

    # epoch boundary: reload, and the same code now reads generation 2
    training_view.reload()
    assert training_view.generation("qwen_vl").generation == 2
    epoch_2 = training_view.reader("qwen_vl")
    assert epoch_2.generation == 2
    changed = [r for r in range(rows) if not np.array_equal(epoch_2.row(r), epoch_1[r])]
    assert len(changed) == rows
    name = training_view.datasets[0]
    item = source.item(name, 1, 3)
    expected = live_extractor.compute(live_extractor.prepare([item]))[0]
    torch.testing.assert_close(training_view.feature("qwen_vl", name, 1), expected)
    info = training_view.generation("qwen_vl")
    assert (
        info.producer.fingerprint
        == live_extractor.fingerprint()
        != training_view.generation("qwen_vl", 1).producer.fingerprint
    )
    assert info.producer.model == "tiny-lora"


def test_old_generations_are_removed_after_the_switch_or_kept_on_request(episodes, live_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    build_features(store_path, live_extractor, source, rows_per_shard=4, batch_size=8, progress=False)
    for step in (1, 2):
        _train_step(live_extractor.model, seed=step)
        rebuild_features(store_path, "qwen_vl", live_extractor, source, batch_size=8, progress=False)
    store = VLAStore.open(store_path)
    assert store.manifest.families["qwen_vl"].generations == (2, 3)  # the one just replaced is kept
    assert not (store_path / "features" / "qwen_vl" / "gen-0001").exists()

    _train_step(live_extractor.model, seed=3)
    rebuild_features(store_path, "qwen_vl", live_extractor, source, batch_size=8, keep_previous=0, progress=False)
    store.reload()
    assert store.manifest.families["qwen_vl"].generations == (4,)

    _train_step(live_extractor.model, seed=4)
    rebuild_features(store_path, "qwen_vl", live_extractor, source, batch_size=8, keep_previous=None, progress=False)
    _train_step(live_extractor.model, seed=5)
    rebuild_features(store_path, "qwen_vl", live_extractor, source, batch_size=8, keep_previous=None, progress=False)
    store.reload()
    assert store.manifest.families["qwen_vl"].generations == (4, 5, 6)
    assert store.coverage("qwen_vl").all()


def test_an_interrupted_rebuild_is_finished_not_restarted(episodes, live_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    build_features(store_path, live_extractor, source, rows_per_shard=2, batch_size=8, progress=False)
    _train_step(live_extractor.model, seed=7)
    store = VLAStore.open(store_path, writable=True)
    fingerprint = live_extractor.fingerprint()
    planned = store.new_generation("qwen_vl", live_extractor.producer(fingerprint))
    from vlastore.features import compute_rows

    # a crash after the first shards of the new generation: write only two of them
    with store.writer("qwen_vl", generation=planned.generation) as writer:
        rows = writer.pending_rows()[:4]
        items = source.items(store, "qwen_vl", rows, planned.generation)
        writer.write_rows(rows, live_extractor.compute(live_extractor.prepare(items)))
    assert compute_rows  # (the rebuild below uses it to finish the rest)
    result = rebuild_features(store_path, "qwen_vl", live_extractor, source, batch_size=8, progress=False)
    assert result.generation == planned.generation == 2
    assert result.stats.rows_skipped == 4
    assert VLAStore.open(store_path).coverage("qwen_vl").all()


def test_rebuild_refuses_a_model_with_other_rows(episodes, live_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    build_features(store_path, live_extractor, source, batch_size=8, progress=False)
    ragged = TransformersVLExtractor(live_extractor.model, live_extractor.processor, pooling="all", dtype="float32")
    with pytest.raises(FeatureMismatchError, match="row shape"):
        rebuild_features(store_path, "qwen_vl", ragged, source, progress=False)
