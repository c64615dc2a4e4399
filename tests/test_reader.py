"""FeatureReader basics: views of mapped shards, dtypes, errors (the training Dataset is tested elsewhere)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import flip_byte, to_bits

from vlastore.reader import MissingRowError, to_tensor
from vlastore.shardcodec import ChecksumError
from vlastore.store import VLAStore


def test_rows_are_views_of_the_mapped_shard_and_writes_never_reach_the_file(full_store) -> None:
    store, values = full_store
    reader = VLAStore.open(store.location).reader("fixed")
    row = reader.row(5)
    assert row.dtype == np.uint16 and row.shape == (8,)
    assert row.base is not None  # a view, not a copy
    np.testing.assert_array_equal(row, values["fixed"][5])
    shard_file = Path(store.storage.local_path(store.shard_key("fixed", 1)))
    before = shard_file.read_bytes()
    tensor = reader.tensor(5)
    tensor.zero_()  # copy-on-write mapping: the caller may scribble on its tensor
    assert shard_file.read_bytes() == before
    assert (
        VLAStore.open(store.location).feature("fixed", 2, 0).view(torch.int16).numpy().view(np.uint16).tolist()
        == values["fixed"][5].tolist()
    )


def test_ragged_rows_have_their_planned_length(full_store) -> None:
    store, values = full_store
    reader = store.reader("tokens")
    for row, expected in enumerate(values["tokens"]):
        got = reader.row(row)
        assert got.shape == expected.shape == (int(store.layout("tokens").lengths[row]), 4)
        np.testing.assert_array_equal(got, expected)
    batch = reader.rows([8, 0, 3])
    for got, row in zip(batch, [8, 0, 3], strict=False):
        np.testing.assert_array_equal(got, values["tokens"][row])


def test_to_tensor_reinterprets_bits() -> None:
    bits = torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    tensor = to_tensor(bits.copy(), "bfloat16")
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [1.5, -2.0]
    assert to_tensor(np.zeros(2, np.float16), "float16").dtype == torch.float16
    readonly = np.frombuffer(np.ones(2, np.float32).tobytes(), dtype=np.float32)
    assert to_tensor(readonly, "float32").tolist() == [1.0, 1.0]


def test_a_pickled_reader_reopens_its_shards(full_store) -> None:
    store, values = full_store
    reader = store.reader("packed")
    reader.row(0)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._shards == {}
    np.testing.assert_array_equal(copy.row(7), values["packed"][7])


def test_read_errors_name_the_row(store_path: Path, full_store) -> None:
    store, _ = full_store
    with pytest.raises(IndexError, match="row 9 out of range: family 'fixed' has 9 rows"):
        store.reader("fixed").row(9)
    shard = Path(store.storage.local_path(store.shard_key("fixed", 2)))
    shard.unlink()
    fresh = VLAStore.open(store_path)
    with pytest.raises(MissingRowError, match=r"shard 2 is not written \(rows \('episode_003', vlm_idx=0\)"):
        fresh.feature("fixed", "episode_003", 0)
    assert fresh.coverage("fixed").tolist() == [True] * 8 + [False]
    flip_byte(fresh.storage.zarr_store(), fresh.shard_key("fixed", 0), -3)  # inside the shard index
    with pytest.raises(ChecksumError, match="shard index: crc32c mismatch; the shard is corrupt"):
        VLAStore.open(store_path).feature("fixed", "episode_000", 0)
    assert VLAStore.open(store_path).coverage("fixed").tolist() == [False] * 4 + [True] * 4 + [False]
    assert to_bits(fresh.feature("fixed", "episode_001", 1)).shape == (8,)
