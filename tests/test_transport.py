"""Batches cross from DataLoader workers through a shared-memory ring and arrive equal, owning their memory."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vlastore import transport
from vlastore.transport import MAX_RING_SLOTS, RING_SLOTS, in_dataloader_worker, pack_batch, register


class Batch(dict):
    pass


register(Batch)


def make_batch(i: int, rows: int = 4) -> Batch:
    generator = torch.Generator().manual_seed(i)
    return Batch(
        index=torch.arange(i, i + rows),
        episode=[f"ep_{i}_{k}" for k in range(rows)],
        feature=torch.randn(rows, 33, generator=generator).to(torch.bfloat16),
        state=torch.randn(rows, 2, 3, generator=generator, dtype=torch.float64),
        state_is_pad=torch.rand(rows, 2, generator=generator) > 0.5,
        tokens=torch.randn(rows, 1 + i % 7, 5, generator=generator).half(),  # varies in size per batch
        step=torch.tensor(7, dtype=torch.int32),  # 0-d
    )


def rows_of(i: int) -> int:
    return 1000 if i % 5 == 3 else 4  # some batches bigger than the ring's slots: the worker makes a bigger ring


class Batches(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> Batch:
        return make_batch(i, rows_of(i))


def assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)  # key order kept
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_deliver_the_batches_of_one_process(context: str) -> None:
    loader = DataLoader(
        Batches(),
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=context == "spawn",
    )
    for epoch in range(2):
        got = list(loader)
        assert len(got) == 16
        for i, batch in enumerate(got):
            assert type(batch) is Batch
            assert_same(batch, make_batch(i, rows_of(i)))
            # the batch owns its memory: nothing of it is the ring, which the worker reuses
            assert not any(t.is_shared() for t in batch.values() if isinstance(t, torch.Tensor)), epoch


def test_a_full_ring_grows_then_falls_back_to_plain_pickling_and_recovers() -> None:
    transport._worker_ring = None
    sizes = [RING_SLOTS]
    while sizes[-1] < MAX_RING_SLOTS:
        sizes.append(2 * sizes[-1])
    fits = sum(sizes)  # 2 + 4 + ... + 64 slots
    batches = [make_batch(i) for i in range(fits + 2)]
    packed = [pack_batch(b, Batch, in_worker=True) for b in batches]
    through_ring = [p for p in packed if p[0] is not Batch]
    # every slot stays busy until the training process copies it out: the ring doubles up to its limit
    assert len(through_ring) == fits
    assert transport._worker_ring.slots == MAX_RING_SLOTS
    assert all(p[0] is Batch for p in packed[len(through_ring) :])  # then the plain way: never a wait
    for (function, args), batch in zip(packed, batches, strict=True):
        assert_same(function(*args), batch)
    again = pack_batch(batches[0], Batch, in_worker=True)  # slots are free again
    assert again[0] is not Batch
    assert_same(again[0](*again[1]), batches[0])


def test_outside_a_worker_a_batch_pickles_and_copies_as_a_plain_dict() -> None:
    batch = make_batch(3)
    assert not in_dataloader_worker()
    assert_same(pickle.loads(pickle.dumps(batch)), batch)
    assert_same(copy.copy(batch), batch) and assert_same(copy.deepcopy(batch), batch)


def test_the_training_process_forgets_rings_of_workers_that_are_gone() -> None:
    transport._rings.clear()
    transport._rings["999999999-dead"] = transport._Attached(999_999_999, torch.zeros(8, dtype=torch.uint8), 1, 1)
    transport._worker_ring = None
    function, args = pack_batch(make_batch(1), Batch, in_worker=True)
    function(*args)
    assert "999999999-dead" not in transport._rings and len(transport._rings) == 1
    assert np.all(np.asarray(transport._worker_ring.states) == 0)


def test_a_layout_travels_once_per_ring_and_numpy_backed_batches_skip_torch() -> None:
    from vlastore.dataset import Batch as VLABatch

    transport._worker_ring = None

    def made(i: int, rows: int) -> VLABatch:
        return VLABatch.of_arrays(
            {
                "index": np.arange(rows) + i,
                "feature": np.full((rows, 4), i, np.uint16),
                "is_pad": np.arange(rows) % 2 == 0,
            },
            bfloat16=["feature"],
        )

    first, second, other = (pack_batch(made(i, rows), VLABatch, in_worker=True) for i, rows in ((1, 4), (2, 4), (3, 5)))
    layout_of = {name: packed[1][3] for name, packed in (("first", first), ("second", second), ("other", other))}
    assert isinstance(layout_of["first"], tuple) and layout_of["second"] == layout_of["first"][0]
    assert isinstance(layout_of["other"], tuple)  # another shape: another layout, sent with its first batch
    for (function, args), (i, rows) in zip((first, second, other), ((1, 4), (2, 4), (3, 5)), strict=True):
        batch = function(*args)
        expected = made(i, rows)
        assert type(batch) is VLABatch and list(batch) == list(expected)
        for key in expected:
            assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key]), key
    # a batch changed after it was made is read from its tensors, not from stale arrays
    changed = made(4, 4)
    changed["feature"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    function, args = pack_batch(changed, VLABatch, in_worker=True)
    assert torch.equal(function(*args)["feature"], changed["feature"])


def test_a_batch_is_a_view_of_its_slot_until_its_last_tensor_is_freed() -> None:
    transport._worker_ring = None
    function, args = pack_batch(make_batch(2), Batch, in_worker=True)
    slot = args[2]
    batch = function(*args)
    states = np.asarray(transport._worker_ring.states)
    assert states[slot] == 1  # leased to the batch: no copy was made, the worker may not reuse the slot
    feature = batch["feature"]
    del batch
    assert states[slot] == 1  # one tensor still holds it
    assert torch.equal(feature, make_batch(2)["feature"])
    del feature
    assert states[slot] == 0
