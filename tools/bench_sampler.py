"""Sampler overhead per batch: vlastore's ResumableSampler against torch's DistributedSampler.

Both produce one epoch of index batches for rank 0 of ``--world`` ranks (shuffled,
new permutation per epoch, so the per-epoch permutation is amortised over the epoch's
batches). Two settings, all contenders in one process, best of ``--rounds`` alternating runs:

- the samplers alone: ``BatchSampler(DistributedSampler(...), B)`` against
  ``ResumableSampler(n, B)`` (which also keeps its resume position per batch);
- through ``DataLoader(num_workers=0)`` over a dataset that returns the indices it is
  given (no data, so only the sampling machinery is timed): the plain loader with
  ``DistributedSampler`` against ``ResumableDataLoader`` (which also counts, in the main
  process, every batch it hands to the training loop).

    python tools/bench_sampler.py --samples 1000000 --batch-size 64 --world 1 8
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlastore.sampler import ResumableDataLoader, ResumableSampler  # noqa: E402


class Indices(Dataset):
    """A dataset of ``n`` samples whose batch is the list of indices asked for."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> list[int]:
        return indices


def passthrough(batch: Any) -> Any:
    return batch


def seconds_per_batch(make_epoch: Callable[[int], Iterable[Any]], epochs: int) -> tuple[float, int]:
    """Seconds per batch over ``epochs`` epochs, and batches per epoch."""
    batches = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for _batch in make_epoch(epoch):
            batches += 1
    return (time.perf_counter() - t0) / batches, batches // epochs


def race(
    torch_run: Callable[[int], Iterable[Any]], our_run: Callable[[int], Iterable[Any]], epochs: int, rounds: int
) -> tuple[float, float, int, int]:
    """Best seconds per batch of each; the contenders alternate (and swap order) every round so that a
    change of machine load hits both."""
    best_torch = best_ours = float("inf")
    n_torch = n_ours = 0
    for r in range(rounds):
        order = [("torch", torch_run), ("ours", our_run)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            seconds, n = seconds_per_batch(run, epochs)
            if name == "torch":
                best_torch, n_torch = min(best_torch, seconds), n
            else:
                best_ours, n_ours = min(best_ours, seconds), n
    return best_torch, best_ours, n_torch, n_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 8], help="numbers of ranks (rank 0 is timed)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="alternating runs per contender; the best is kept")
    args = parser.parse_args()
    n, size = args.samples, args.batch_size
    dataset = Indices(n)
    print(f"{n:,} samples, batches of {size}, {args.epochs} epochs per run, best of {args.rounds} alternating runs")
    print(f"{'world':>5}  {'setting':<34} {'torch us/batch':>14} {'vlastore us/batch':>17} {'ratio':>6}")
    for world in args.world:
        torch_sampler = DistributedSampler(dataset, num_replicas=world, rank=0, shuffle=True, seed=0)
        torch_batches = BatchSampler(torch_sampler, size, drop_last=False)
        ours = ResumableSampler(n, size, shuffle=True, seed=0, rank=0, world_size=world)

        def torch_epoch(
            epoch: int, sampler: DistributedSampler = torch_sampler, batches: BatchSampler = torch_batches
        ) -> Iterable[Any]:
            sampler.set_epoch(epoch)
            return batches

        def ours_epoch(epoch: int, sampler: ResumableSampler = ours) -> Iterable[Any]:
            sampler.set_epoch(epoch)
            return sampler

        torch_loader = DataLoader(dataset, batch_size=size, sampler=torch_sampler, collate_fn=passthrough)
        our_loader = ResumableDataLoader(
            dataset, batch_size=size, shuffle=True, seed=0, rank=0, world_size=world, collate_fn=passthrough
        )

        def torch_loader_epoch(
            epoch: int, sampler: DistributedSampler = torch_sampler, loader: DataLoader = torch_loader
        ) -> Iterable[Any]:
            sampler.set_epoch(epoch)
            return loader

        def our_loader_epoch(epoch: int, loader: ResumableDataLoader = our_loader) -> Iterable[Any]:
            loader.set_epoch(epoch)
            return loader

        settings = [
            ("batch samplers alone", torch_epoch, ours_epoch),
            ("DataLoader(num_workers=0), no data", torch_loader_epoch, our_loader_epoch),
        ]
        for name, torch_run, our_run in settings:
            t_torch, t_ours, batches, ours_batches = race(torch_run, our_run, args.epochs, args.rounds)
            assert ours_batches in (batches, batches - 1), (ours_batches, batches)  # torch pads, we do not
            print(f"{world:>5}  {name:<34} {t_torch * 1e6:>14.2f} {t_ours * 1e6:>17.2f} {t_ours / t_torch:>6.2f}")


if __name__ == "__main__":
    main()
