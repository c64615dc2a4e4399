"""The GPU path: bfloat16 autocast, pinned host buffers, fingerprints of device tensors. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from vlastore.features import DataFolder, build_features, get_extractor
from vlastore.features.fingerprint import model_fingerprint, tensor_digest
from vlastore.store import VLAStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_build_stores_bfloat16_rows_close_to_the_float32_cpu_rows(episodes, tiny_model_dir, tiny_extractor):
    store_path, data = episodes
    source = DataFolder(data)
    gpu = get_extractor("transformers-vl", model=str(tiny_model_dir))  # defaults: cuda, bfloat16 rows
    assert gpu.device.type == "cuda" and gpu.autocast and gpu.dtype == "bfloat16"
    build_features(store_path, gpu, source, rows_per_shard=4, batch_size=4, progress=False)
    build_features(store_path, tiny_extractor, source, family="cpu", rows_per_shard=4, progress=False)
    store = VLAStore.open(store_path)
    assert store.spec("qwen_vl").dtype == "bfloat16"
    assert store.generation("qwen_vl").producer.params["autocast"] == "bfloat16"
    name = store.datasets[0]
    got = store.feature("qwen_vl", name, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), store.feature("cpu", name, 1), rtol=0.1, atol=0.1)


def test_gpu_inputs_are_prepared_in_pinned_memory(episodes, tiny_model_dir):
    _, data = episodes
    gpu = get_extractor("transformers-vl", model=str(tiny_model_dir), device="cuda")
    source = DataFolder(data)
    name = sorted(p.name for p in data.iterdir())[0]
    prepared = gpu.prepare([source.item(name, 0, 0), source.item(name, 1, 3)])
    assert all(t.is_pinned() for t in prepared["inputs"].values())
    rows = gpu.compute(prepared)
    assert rows.device.type == "cpu" and rows.shape == (2, 32)


def test_fingerprint_of_gpu_tensors_equals_cpu(tiny_extractor):
    import copy

    t = torch.randn(1000, 7)
    assert tensor_digest(t.cuda(), chunk_bytes=512) == tensor_digest(t)
    model = copy.deepcopy(tiny_extractor.model).cuda()
    assert model_fingerprint(model) == tiny_extractor.fingerprint()
