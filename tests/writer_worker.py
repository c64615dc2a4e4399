"""Writer processes for tests/test_writer.py: real processes (forked, so torch is not
imported again), real gloo process groups, real signals.

:func:`dist_main` joins a gloo process group and writes the shards torch.distributed
gives its rank (no explicit rank/world_size anywhere). :func:`crash_main` writes
three shards of ``fixed`` (and two of ``tokens``), half of the next, reports READY
and waits to be killed.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

from helpers import as_value, expected_values

from vlastore.store import VLAStore


def dist_main(store_path: str, init_file: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    store = VLAStore.open(store_path, writable=True)
    values = expected_values(store)
    with store.writer("fixed") as writer:  # rank and world size come from the process group
        assert (writer.rank, writer.world_size) == (rank, world_size)
        rows = writer.pending_rows()
        writer.write_rows(rows, as_value(values["fixed"][rows], "bfloat16"))
    with VLAStore.open(store_path, writable=True).writer("tokens") as writer:
        for row in writer.pending_rows().tolist():
            writer.write_rows([row], [values["tokens"][row]])
    dist.barrier()
    dist.destroy_process_group()


def crash_main(store_path: str, ready: Connection) -> None:
    store = VLAStore.open(store_path, writable=True)
    values = expected_values(store)
    writer = store.writer("fixed", rank=0, world_size=1)
    rows_per_shard = store.spec("fixed").rows_per_shard
    done = 3 * rows_per_shard + rows_per_shard // 2
    for row in range(done):  # one row at a time, as a feature extractor would
        episode, vlm_idx = store.layout("fixed").address(row)
        writer.write(f"episode_{episode:03d}", vlm_idx, as_value(values["fixed"][row], "bfloat16"))
    tokens = store.writer("tokens", rank=0, world_size=1)
    layout = store.layout("tokens")
    rows = [*layout.shard_rows(0).tolist(), *layout.shard_rows(1).tolist(), *layout.shard_rows(2).tolist()[:1]]
    tokens.write_rows(rows, [values["tokens"][r] for r in rows])  # two shards complete, one begun
    writer.wait()  # complete shards reach the disk (write-behind); the half-filled one stays in memory
    tokens.wait()
    ready.send(("READY", writer.shards_written))
    time.sleep(120)
