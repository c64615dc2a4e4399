"""Deterministic, resumable sampling (vlastore/sampler.py): pure order arithmetic with Hypothesis,
then real DataLoader workers (fork and spawn), real kills and real gloo process groups."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reader_stores import make_store
from sampler_worker import train_main
from torch.utils.data import DataLoader

from vlastore.dataset import VLADataset, collate
from vlastore.sampler import ResumableDataLoader, ResumableSampler, epoch_order, rank_indices

FORK = multiprocessing.get_context("fork")  # children inherit the imported torch: seconds saved per process
SEED = 7
BATCH = 4


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sampler") / "s.vla"
    make_store(path, families=("fixed",))  # 63 samples
    return path


# ------------------------------------------------------------------------- the order, pure


def test_the_order_depends_on_seed_and_epoch_only() -> None:
    a, b = epoch_order(1000, 3, 5), epoch_order(1000, 3, 5)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, epoch_order(1000, 3, 6)) and not np.array_equal(a, epoch_order(1000, 4, 5))
    assert np.array_equal(epoch_order(10, 3, 5, shuffle=False), np.arange(10))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 200), world=st.integers(1, 6), batch=st.integers(1, 9), data=st.data())
def test_ranks_split_what_is_left_exactly_once(n: int, world: int, batch: int, data: st.DataObject) -> None:
    order = epoch_order(n, 1, 2)
    position = data.draw(st.integers(0, n))
    remaining = order[position:].tolist()
    per_rank = {
        tail: [rank_indices(order, position, r, world, batch, tail).tolist() for r in range(world)]
        for tail in ("exact", "pad", "drop")
    }
    exact = per_rank["exact"]
    assert sorted(sum(exact, [])) == sorted(remaining)  # every remaining sample once, nothing else
    assert max(map(len, exact)) - min(map(len, exact)) <= 1
    # the global order is kept: step s of the ranks together is remaining[s*W : (s+1)*W]
    assert [exact[r][s] for s in range(len(exact[0])) for r in range(world) if s < len(exact[r])] == remaining
    padded = per_rank["pad"]
    assert len({len(p) for p in padded}) == 1
    counts = Counter(sum(padded, []))
    assert set(remaining) <= set(counts) and sum(counts.values()) - len(remaining) < world
    dropped = per_rank["drop"]
    assert all(len(d) % batch == 0 and len(d) == len(dropped[0]) for d in dropped)
    assert len(set(sum(dropped, []))) == len(sum(dropped, [])) and set(sum(dropped, [])) <= set(remaining)
    assert len(remaining) - len(sum(dropped, [])) < world * batch
    for tail in ("exact", "pad", "drop"):
        sampler = ResumableSampler(n, batch, rank=0, world_size=world, tail=tail, seed=1)
        sampler.epoch, sampler.position = 2, position
        assert len(sampler) == -(-len(per_rank[tail][0]) // batch)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 120),
    world=st.integers(1, 4),
    new_world=st.integers(1, 5),
    batch=st.integers(1, 6),
    new_batch=st.integers(1, 6),
    k=st.integers(0, 12),
)
def test_a_resume_on_another_world_size_sees_the_rest_exactly_once(
    n: int, world: int, new_world: int, batch: int, new_batch: int, k: int
) -> None:
    """Batch samplers alone (num_workers=0 semantics): k steps on `world` ranks, then the rest on `new_world`."""
    samplers = [ResumableSampler(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    iterators = [iter(s) for s in samplers]
    seen: list[int] = []
    steps = min(k, min(len(s) for s in samplers))
    for _ in range(steps):
        for it in iterators:
            seen.extend(next(it))
    state = samplers[0].state_dict()  # save rank 0's (a rank with one batch fewer may have ended its epoch)
    if steps < min(len(s) for s in samplers):
        assert all(s.state_dict() == state for s in samplers)
    resumed = [ResumableSampler(n, new_batch, rank=r, world_size=new_world) for r in range(new_world)]
    rest: list[int] = []
    for sampler in resumed:
        sampler.load_state_dict(state)
        assert sampler.seed == 5
        rest.extend(i for b in sampler for i in b)
    if state["epoch"] == 0:
        assert sorted(seen + rest) == list(range(n))
        assert seen == [] or sorted(seen) == sorted(epoch_order(n, 5, 0)[: state["position"]].tolist())
    else:  # the first run finished its epoch: the resume runs the next one, whole
        assert sorted(seen) == list(range(n)) and sorted(rest) == list(range(n))


def test_set_epoch_keeps_the_position_of_the_epoch_under_way() -> None:
    sampler = ResumableSampler(50, 5, seed=1, rank=0, world_size=1)
    it = iter(sampler)
    next(it), next(it)
    sampler.set_epoch(0)  # what a DistributedSampler-style loop calls after a resume
    assert sampler.state_dict()["position"] == 10
    sampler.set_epoch(1)
    assert (sampler.epoch, sampler.position) == (1, 0)
    with pytest.raises(RuntimeError, match="stale"):
        next(it)


def test_bad_states_and_arguments_are_refused() -> None:
    sampler = ResumableSampler(50, 5, seed=1, rank=0, world_size=1)
    it = iter(sampler)
    next(it)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="50 samples but this dataset has 49"):
        ResumableSampler(49, 5, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(RuntimeError, match="another order"):  # e.g. numpy changed its permutation between runs
        ResumableSampler(50, 5, rank=0, world_size=1).load_state_dict({**state, "order_check": [0] * 16})
    with pytest.raises(ValueError, match="not a vlastore sampler state"):
        sampler.load_state_dict({"yielded": 3})
    with pytest.raises(ValueError, match="tail="):
        ResumableSampler(50, 5, tail="wrap")
    with pytest.raises(ValueError, match="rank=3, world_size=2"):
        ResumableSampler(50, 5, rank=3, world_size=2)
    with pytest.raises(ValueError, match="tail='drop'"):
        ResumableDataLoader(list(range(50)), batch_size=5, drop_last=True)
    with pytest.raises(ValueError, match="in_order"):
        ResumableDataLoader(list(range(50)), batch_size=5, in_order=False)


def test_ranks_left_with_one_batch_fewer_are_warned_about(caplog) -> None:
    # 9 samples, 2 ranks, batches of 4: the last global batch holds 1 sample, rank 1 gets none of it
    rank1 = ResumableSampler(9, 4, rank=1, world_size=2, tail="exact")
    with caplog.at_level("WARNING", logger="vlastore.sampler"):
        assert len(list(rank1)) == 1
    assert "rank 1 gets one batch fewer" in caplog.text and "tail='pad'" in caplog.text
    rank0 = ResumableSampler(9, 4, rank=0, world_size=2, tail="pad")
    assert [len(b) for b in rank0] == [4, 1] and len(ResumableSampler(9, 4, rank=1, world_size=2, tail="pad")) == 2


# ------------------------------------------------------------ through a DataLoader, one process


def _indices(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


def test_the_order_does_not_depend_on_num_workers(store_path) -> None:
    ds = VLADataset(store_path, features=["fixed_float32"], horizon=2)
    alone = ds.dataloader(batch_size=BATCH, shuffle=True, seed=SEED, resumable=True)
    workers = ds.dataloader(
        batch_size=BATCH,
        shuffle=True,
        seed=SEED,
        resumable=True,
        num_workers=2,
        multiprocessing_context="fork",
        persistent_workers=True,
        pin_memory=torch.cuda.is_available(),
    )
    for epoch in range(2):
        expected = epoch_order(len(ds), SEED, epoch)
        a, b = _indices(alone), _indices(workers)
        assert a == b and sum(a, []) == expected.tolist()
    assert alone.epoch == workers.epoch == 2
    unshuffled = ds.dataloader(batch_size=BATCH, resumable=True, num_workers=2, multiprocessing_context="fork")
    assert sum(_indices(unshuffled), []) == list(range(len(ds)))


def test_a_break_counts_what_the_loop_received_not_what_workers_prefetched(store_path) -> None:
    ds = VLADataset(store_path, features=["fixed_float32"], horizon=2)
    loader = ds.dataloader(
        batch_size=BATCH,
        shuffle=True,
        seed=SEED,
        resumable=True,
        num_workers=2,
        multiprocessing_context="fork",
        persistent_workers=True,
        prefetch_factor=4,
    )
    got = []
    for batch in loader:
        got.append(batch["index"].tolist())
        if len(got) == 3:
            break  # the workers have prefetched up to 8 batches more
    assert loader.state_dict()["position"] == 3 * BATCH
    got += _indices(loader)  # the same persistent workers, a new pass from where the loop stopped
    assert sum(got, []) == epoch_order(len(ds), SEED, 0).tolist()
    assert loader.epoch == 1


def test_a_plain_dataloader_with_the_batch_sampler_and_no_workers(store_path) -> None:
    ds = VLADataset(store_path, features=["fixed_float32"], horizon=2)
    sampler = ResumableSampler(ds, BATCH, seed=SEED, rank=0, world_size=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    first = [b["index"].tolist() for _, b in zip(range(2), loader)]
    resumed = ResumableSampler(ds, BATCH, rank=0, world_size=1)
    resumed.load_state_dict(sampler.state_dict())
    rest = _indices(ds.dataloader(batch_sampler=resumed))
    assert sum(first + rest, []) == epoch_order(len(ds), SEED, 0).tolist()


def _run(target_kwargs: list[dict], timeout: float = 120) -> list[int]:
    procs = [FORK.Process(target=train_main, kwargs=kw) for kw in target_kwargs]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    # Poll the exit status rather than join(timeout): join waits on a pipe that a killed
    # process's orphaned DataLoader workers keep open until they notice (5 s later).
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def _seen(path: Path) -> list[tuple[int, list[int]]]:
    return [(e, idx) for e, idx in json.loads(path.read_text())]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_killed_mid_epoch_a_fresh_process_resumes_with_exactly_the_unseen_samples(
    store_path, tmp_path, context
) -> None:
    # spawn workers import torch afresh (seconds each here): one is enough to prefetch two batches ahead
    loader_kwargs = {
        "num_workers": 2 if context == "fork" else 1,
        "multiprocessing_context": context,
        "persistent_workers": True,
        "pin_memory": torch.cuda.is_available(),
    }
    common = {"store_path": str(store_path), "epochs": 2, "loader_kwargs": loader_kwargs}
    whole, before, after = tmp_path / "whole.json", tmp_path / "before.json", tmp_path / "after.json"
    state = tmp_path / "state.json"
    k = 5  # of 16 batches per epoch
    assert _run([{**common, "out": str(whole), "loader_kwargs": {}}]) == [0]  # no workers: the order is theirs
    assert _run([{**common, "out": str(before), "state_out": str(state), "stop_after": k}]) == [-9]  # SIGKILL
    assert json.loads(state.read_text())["position"] == k * BATCH
    assert _run([{**common, "out": str(after), "state_in": str(state)}]) == [0]
    uninterrupted = _seen(whole)
    resumed = _seen(before) + _seen(after)
    assert resumed == uninterrupted  # the same batches, in the same order, over both epochs
    assert sum((idx for e, idx in uninterrupted if e == 0), []) == epoch_order(63, SEED, 0).tolist()


def test_a_state_saved_after_the_last_batch_of_an_epoch_resumes_at_the_next(store_path, tmp_path) -> None:
    common = {"store_path": str(store_path), "loader_kwargs": {"num_workers": 1, "multiprocessing_context": "fork"}}
    state = tmp_path / "state.json"
    assert _run([{**common, "out": str(tmp_path / "a.json"), "state_out": str(state), "stop_after": 16}]) == [-9]
    assert {k: json.loads(state.read_text())[k] for k in ("epoch", "position")} == {"epoch": 1, "position": 0}
    assert _run([{**common, "out": str(tmp_path / "b.json"), "state_in": str(state)}]) == [0]
    after = _seen(tmp_path / "b.json")
    assert sum((idx for _, idx in after), []) == epoch_order(63, SEED, 1).tolist()


# -------------------------------------------------------------------- torchrun: gloo process groups


def _ddp(store_path: Path, tmp_path: Path, tag: str, world: int, **kwargs) -> list[list[tuple[int, list[int]]]]:
    init = tmp_path / f"init-{tag}"
    outs = [tmp_path / f"{tag}-{r}.json" for r in range(world)]
    jobs = [
        {
            "store_path": str(store_path),
            "out": str(outs[r]),
            "rank": r,
            "world_size": world,
            "init_file": str(init),
            "loader_kwargs": {"num_workers": 1, "multiprocessing_context": "fork"},
            **kwargs,
        }
        for r in range(world)
    ]
    codes = _run(jobs)
    expected = -9 if kwargs.get("stop_after") else 0
    assert codes == [expected] * world, codes
    return [_seen(o) for o in outs]


def test_ranks_of_a_gloo_group_resume_on_one_two_and_three_ranks(store_path, tmp_path) -> None:
    n, k = 63, 3
    order = epoch_order(n, SEED, 0).tolist()
    whole = _ddp(store_path, tmp_path, "whole", 2)
    flat = [sum((idx for _, idx in rank), []) for rank in whole]
    assert sorted(flat[0] + flat[1]) == list(range(n))  # disjoint, every sample once (tail="exact")
    assert flat[0] == order[0::2] and flat[1] == order[1::2]

    state = tmp_path / "state.json"
    before = _ddp(store_path, tmp_path, "before", 2, state_out=str(state), stop_after=k)
    seen = sum((idx for rank in before for _, idx in rank), [])
    assert json.loads(state.read_text())["position"] == k * 2 * BATCH == len(seen)
    assert sorted(seen) == sorted(order[: len(seen)])

    for world in (1, 2, 3):
        after = _ddp(store_path, tmp_path, f"after{world}", world, state_in=str(state))
        rest = [sum((idx for _, idx in rank), []) for rank in after]
        assert sorted(seen + sum(rest, [])) == list(range(n)), world  # every remaining sample exactly once
        for r in range(world):
            assert rest[r] == order[len(seen) :][r::world]  # what is left of the same global order
        if world == 2:  # the same ranks: exactly the uninterrupted run's batches
            for r in range(2):
                assert before[r] + after[r] == whole[r]
