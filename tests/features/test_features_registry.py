"""The extractor registry: ids, ``module:function`` plug-ins and extractor classes."""

from __future__ import annotations

import numpy as np
import pytest

from vlastore.features import (
    DataFolder,
    ExtractorError,
    FeatureExtractor,
    FunctionExtractor,
    available_extractors,
    build_features,
    get_extractor,
    register_extractor,
)
from vlastore.store import VLAStore


def test_builtin_ids_are_listed():
    assert {"transformers-vl", "qwen-vl"} <= set(available_extractors())


def test_unknown_id_says_what_exists():
    with pytest.raises(ExtractorError, match="transformers-vl"):
        get_extractor("no-such-model")
    with pytest.raises(ExtractorError, match="PYTHONPATH"):
        get_extractor("no_such_module_xyz:encode")


def test_a_function_plugin_builds_a_family_the_same_way(episodes):
    store_path, data = episodes
    extractor = get_extractor("features_plugins:patch_colors")
    assert isinstance(extractor, FunctionExtractor)
    build_features(store_path, extractor, DataFolder(data), family="patches", progress=False)
    store = VLAStore.open(store_path)
    spec = store.spec("patches")
    assert (spec.row_shape, spec.dtype) == ((2, 12), "float16")  # two cameras, float16 as returned
    item = DataFolder(data).item(store.datasets[0], 2, 6)
    import features_plugins

    np.testing.assert_array_equal(
        store.feature("patches", store.datasets[0], 2).numpy(),
        features_plugins.patch_colors(item.load_images(), item.instruction),
    )
    assert store.generation("patches").producer.model == "features_plugins:patch_colors"


class _GeometryEncoder(FeatureExtractor):
    """A VGGT-like per-image encoder: one [cameras, 3] row of per-image colour means, bfloat16."""

    dtype = "bfloat16"

    def __init__(self, cameras: int = 2) -> None:
        self.row_shape = (cameras, 3)
        self.model_name = "toy-geometry"

    def prepare(self, items):
        return {"items": list(items), "images": [item.load_images() for item in items]}

    def compute(self, prepared):
        import torch

        means = [[np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) for im in images] for images in prepared["images"]]
        return torch.tensor(np.asarray(means)).to(torch.bfloat16)


def test_a_registered_extractor_class_is_found_by_id(episodes):
    store_path, data = episodes
    register_extractor("toy-geometry", _GeometryEncoder)
    extractor = get_extractor("toy-geometry", cameras=2)
    build_features(store_path, extractor, DataFolder(data), family="geometry", vlm_reuse_count=1, progress=False)
    store = VLAStore.open(store_path)
    assert store.layout("geometry").rows == int(store.catalog.steps.sum())  # one row per step
    row = store.feature("geometry", store.datasets[1], 4)
    assert row.dtype.is_floating_point and tuple(row.shape) == (2, 3)


def test_register_rejects_ids_with_colons():
    with pytest.raises(ExtractorError):
        register_extractor("a:b", _GeometryEncoder)
