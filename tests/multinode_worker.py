"""One rank of the simulated two-node run (tests/test_multinode.py), started by torchrun.

Usage: python -m torch.distributed.run --nnodes=2 --nproc_per_node=1 --node_rank=N --master_addr=127.0.0.1
       --master_port=P tests/multinode_worker.py STORE OUT

Build: rank 0 plans the family, every rank writes the shards it owns (writer API with rank/world size),
then each rank trains one epoch under a DistributedSampler and saves its batches to OUT/batches-RANK.pt.
The node's cache folder comes from VLASTORE_CACHE and the storage options from VLASTORE_STORAGE_OPTIONS,
as a launcher script would set them per node.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from vlastore.dataset import VLADataset
from vlastore.store import FamilySpec, Producer, VLAStore

FAMILY = "feat"
SPEC = FamilySpec((8,), "float32", vlm_reuse_count=3, rows_per_shard=2)
PRODUCER = Producer("test/multinode", "v0", fingerprint="multinode0")


def row_values(rows: np.ndarray) -> np.ndarray:
    """The feature of each row: the same on every rank and in the reference store."""
    return np.stack([np.random.default_rng(int(r)).normal(size=8).astype(np.float32) for r in rows.tolist()])


def build(store: str, rank: int, world: int) -> None:
    if rank == 0:
        VLAStore.open(store, writable=True).add_family(FAMILY, SPEC, producer=PRODUCER)
    dist.barrier()
    with VLAStore.open(store, writable=True).writer(FAMILY, rank=rank, world_size=world) as writer:
        rows = writer.pending_rows()
        if rows.size:
            writer.write_rows(rows, row_values(rows))
    dist.barrier()


def train_batches(dataset: VLADataset, rank: int, world: int, num_workers: int) -> list[dict[str, torch.Tensor]]:
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = dataset.dataloader(batch_size=4, sampler=sampler, num_workers=num_workers)
    return [{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)} for batch in loader]


def main(store: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    build(store, rank, world)
    dataset = VLADataset(store, features=[FAMILY])
    torch.save(train_batches(dataset, rank, world, num_workers=1), os.path.join(out, f"batches-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
