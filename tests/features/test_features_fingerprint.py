"""Weight fingerprints: deterministic, sensitive to one changed weight, adapter kept apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlastore.features.fingerprint import model_fingerprint, state_dict_fingerprint, tensor_digest


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(16, 8, generator=g),
        "layer.0.bias": torch.randn(16, generator=g),
        "norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "emb.weight": torch.randn(10, 4, generator=g).to(torch.float16),
    }


def test_same_weights_same_fingerprint_in_any_order():
    a = _state()
    b = dict(reversed(list(_state().items())))
    assert state_dict_fingerprint(a) == state_dict_fingerprint(b)
    assert str(state_dict_fingerprint(a)).startswith("blake2b:")


@pytest.mark.parametrize("name", ["layer.0.weight", "norm.weight", "emb.weight"])
def test_one_changed_element_changes_the_fingerprint(name):
    state = _state()
    before = state_dict_fingerprint(state)
    flat = state[name].view(-1)
    flat[3] = flat[3] + 1
    assert state_dict_fingerprint(state) != before


def test_names_dtypes_and_shapes_count_not_only_bytes():
    state = _state()
    base = state_dict_fingerprint(state)
    renamed = dict(state)
    renamed["layer.1.bias"] = renamed.pop("layer.0.bias")
    assert state_dict_fingerprint(renamed) != base
    reshaped = dict(state, **{"layer.0.weight": state["layer.0.weight"].reshape(8, 16)})
    assert state_dict_fingerprint(reshaped) != base
    same_bits = dict(state, **{"norm.weight": state["norm.weight"].view(torch.int16)})
    assert state_dict_fingerprint(same_bits) != base
    assert tensor_digest(torch.zeros(0)) != tensor_digest(torch.zeros(0, 2))


def test_adapter_is_hashed_apart_from_the_base():
    state = _state()
    plain = state_dict_fingerprint(state)
    assert plain.adapter == ""
    lora = dict(state)
    lora["layer.0.lora_A.default.weight"] = torch.ones(2, 8)
    lora["layer.0.lora_B.default.weight"] = torch.zeros(16, 2)
    with_adapter = state_dict_fingerprint(lora)
    assert with_adapter.base == plain.base and with_adapter.adapter and with_adapter != plain
    lora["layer.0.lora_B.default.weight"][0, 0] = 0.01  # one optimiser step on the adapter
    trained = state_dict_fingerprint(lora)
    assert trained.base == plain.base and trained.adapter != with_adapter.adapter and trained != with_adapter


def test_model_fingerprint_follows_a_weight_change_of_the_tiny_model(tiny_extractor):
    import copy

    model = copy.deepcopy(tiny_extractor.model)
    before = model_fingerprint(model)
    assert before == tiny_extractor.fingerprint()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(model) != before


def test_non_contiguous_tensor_hashes_its_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(t.t()) == tensor_digest(t.t().contiguous())
    assert tensor_digest(t.t()) != tensor_digest(t)
    np.testing.assert_array_equal(t.t().contiguous().numpy(), t.numpy().T)
