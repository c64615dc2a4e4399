"""Training-loop processes for tests/test_sampler.py: real processes (forked, so torch is not
imported again), real DataLoader workers, real gloo process groups, a real SIGKILL.

:func:`train_main` reads a store through ``VLADataset.dataloader(resumable=True)``, records
the sample indices of every batch it receives and, after ``stop_after`` batches, saves the
loader's state (rank 0), writes what it saw and kills itself mid-epoch (its workers have
prefetched batches the loop never received). A later process resumes from the state.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def train_main(
    store_path: str,
    out: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    init_file: str | None = None,
    state_in: str | None = None,
    state_out: str | None = None,
    stop_after: int | None = None,
    epochs: int = 1,
    batch_size: int = 4,
    seed: int = 7,
    shuffle: bool = True,
    tail: str = "exact",
    loader_kwargs: dict[str, Any] | None = None,
) -> None:
    """Run ``epochs`` epochs (from the loaded state's epoch); record ``[[epoch, [indices...]], ...]`` in ``out``."""
    from vlastore.dataset import VLADataset

    dist = None
    if init_file is not None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    ds = VLADataset(store_path, features=["fixed_float32"], horizon=2)
    loader = ds.dataloader(
        batch_size=batch_size, shuffle=shuffle, seed=seed, tail=tail, resumable=True, **(loader_kwargs or {})
    )
    if state_in is not None:
        loader.load_state_dict(json.loads(Path(state_in).read_text()))
    seen: list[list[Any]] = []
    received = 0
    first_epoch = loader.epoch
    for epoch in range(first_epoch, first_epoch + epochs):
        for batch in loader:
            seen.append([epoch, batch["index"].tolist()])
            received += 1
            if dist is not None:  # DDP's lockstep: every rank takes part in every step
                dist.all_reduce(torch.ones(1))
            if received == stop_after:
                if rank == 0 and state_out is not None:
                    _write(Path(state_out), loader.state_dict())
                _write(Path(out), seen)
                if dist is not None:
                    dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)  # killed mid-epoch: no cleanup, workers orphaned
    _write(Path(out), seen)
    if rank == 0 and state_out is not None:
        _write(Path(state_out), loader.state_dict())
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
