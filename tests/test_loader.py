"""VLADataLoader (vlastore/loader.py) is torch's DataLoader for the user: same batches, seeds, worker info,
errors and shutdown, with real worker processes (fork and spawn), real kills and real timeouts."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from vlastore.dataset import Batch
from vlastore.loader import ResumableVLADataLoader, VLADataLoader
from vlastore.sampler import ResumableDataLoader


class Numbers(Dataset):
    """Sample i is i; each fetch also reports which worker made it and that worker's random state."""

    def __init__(self, n: int = 40, fail_at: int | None = None, sleep_at: int | None = None) -> None:
        self.n, self.fail_at, self.sleep_at = n, fail_at, sleep_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.fail_at:
            raise ValueError(f"sample {i} is broken on purpose")
        if i == self.sleep_at:
            time.sleep(30)
        info = get_worker_info()
        return {
            "i": torch.tensor(i),
            "x": torch.full((3,), float(i)),
            "worker": -1 if info is None else info.id,
            "torch_random": int(torch.randint(0, 1 << 30, ())),
            "numpy_random": int(np.random.randint(0, 1 << 30)),
        }


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(5)


def both(**kwargs) -> tuple[list, list]:
    """The batches of torch's DataLoader and of VLADataLoader with the same arguments (and generator seed)."""
    out = []
    for cls in (DataLoader, VLADataLoader):
        dataset = kwargs.pop("dataset", None) or Numbers()
        out.append(list(cls(dataset, generator=seeded(), **kwargs)))
        kwargs["dataset"] = dataset
    return out[0], out[1]


def assert_equal_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_the_same_batches_seeds_and_worker_ids_as_torch() -> None:
    # (spawn: tests/test_dataset.py; a spawned worker imports torch again, seconds each on 2 cores)
    expected, got = both(batch_size=3, shuffle=True, num_workers=2, multiprocessing_context="fork")
    assert_equal_batches(expected, got)
    assert {int(w) for b in got for w in b["worker"]} == {0, 1}


def test_samplers_stay_in_the_training_process() -> None:
    for rank in range(2):
        sampler = DistributedSampler(Numbers(), num_replicas=2, rank=rank, shuffle=True, seed=3)
        expected = list(DataLoader(Numbers(), batch_size=4, sampler=sampler, num_workers=2, generator=seeded()))
        got = list(VLADataLoader(Numbers(), batch_size=4, sampler=sampler, num_workers=2, generator=seeded()))
        assert_equal_batches(expected, got)
    plain = list(ResumableDataLoader(Numbers(), batch_size=4, shuffle=True, seed=1, num_workers=2, generator=seeded()))
    loader = ResumableVLADataLoader(Numbers(), batch_size=4, shuffle=True, seed=1, num_workers=2, generator=seeded())
    assert_equal_batches(plain, list(loader))
    assert loader.state_dict()["epoch"] == 1  # counted in the training process, as ResumableDataLoader does


def test_a_worker_error_is_raised_in_the_training_process_with_its_traceback() -> None:
    loader = VLADataLoader(Numbers(fail_at=9), batch_size=4, num_workers=2)
    with pytest.raises(ValueError, match="sample 9 is broken on purpose") as raised:
        list(loader)
    assert "in DataLoader worker process" in str(raised.value)
    assert [int(b["i"][0]) for b in VLADataLoader(Numbers(), batch_size=4, num_workers=2)][:2] == [0, 4]


def test_a_worker_init_error_is_raised_too() -> None:
    def bad_init(worker_id: int) -> None:
        raise RuntimeError(f"worker {worker_id} cannot start")

    with pytest.raises(RuntimeError, match="cannot start"):
        list(VLADataLoader(Numbers(), batch_size=4, num_workers=2, worker_init_fn=bad_init))


def test_a_killed_worker_is_an_error_not_a_hang() -> None:
    loader = VLADataLoader(Numbers(sleep_at=20), batch_size=4, num_workers=2, multiprocessing_context="fork")
    it = iter(loader)
    next(it)
    victim = it._workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=rf"worker \(pid {victim.pid}\) exited unexpectedly with exit code -9"):
        for _ in it:
            pass


def test_a_timeout_is_an_error() -> None:
    loader = VLADataLoader(Numbers(sleep_at=0), batch_size=4, num_workers=1, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 0.5 seconds"):
        next(iter(loader))
    assert time.monotonic() - t0 < 25  # not the 30 s the worker sleeps


def test_iterable_datasets_and_no_workers_take_torch_s_own_path() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    assert [int(x) for b in VLADataLoader(Stream(), batch_size=5, num_workers=1) for x in b] == list(range(10))
    torch.manual_seed(0)
    np.random.seed(0)
    expected = list(DataLoader(Numbers(), batch_size=3))
    torch.manual_seed(0)
    np.random.seed(0)
    assert_equal_batches(expected, list(VLADataLoader(Numbers(), batch_size=3)))


def test_a_batch_object_arrives_as_itself_and_keeps_its_values_while_held() -> None:
    class Batches(Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> Batch:
            return Batch.of_arrays(
                {"x": np.full((2, 5), i, np.float32), "bits": np.full(3, i, np.uint16)}, bfloat16=["bits"]
            )

    kept = list(VLADataLoader(Batches(), batch_size=None, num_workers=2, prefetch_factor=8))
    for batch_index, batch in enumerate(kept):  # every batch kept: none of their slots was reused
        assert type(batch) is Batch and batch["bits"].dtype == torch.bfloat16
        assert torch.equal(batch["x"], torch.full((2, 5), float(batch_index)))
        assert torch.equal(batch["bits"].view(torch.int16), torch.full((3,), batch_index, dtype=torch.int16))


def test_prefetch_defaults_to_four_and_can_be_set() -> None:
    assert VLADataLoader(Numbers(), num_workers=2).prefetch_factor == 4
    assert VLADataLoader(Numbers(), num_workers=2, prefetch_factor=1).prefetch_factor == 1
    assert VLADataLoader(Numbers()).prefetch_factor is None
