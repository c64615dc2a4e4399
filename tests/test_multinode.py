"""Two nodes simulated on this machine: two real torchrun agents (``--nnodes=2``, ``--node_rank=0/1``,
rendezvous on 127.0.0.1, gloo), one rank each, each node with its own cache folder.

(a) a shared POSIX folder (the NFS stand-in) and (b) an s3:// store on moto (through a counting proxy):
the ranks build a feature family with the writer API (each shard written once, by its owner), then train
one epoch under a DistributedSampler; the batches equal those of the same data in a local store, and on
S3 each node downloads each shard it reads once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import episodes
from multinode_worker import FAMILY, PRODUCER, SPEC, row_values, train_batches
from s3_server import FaultProxy

from vlastore.dataset import VLADataset
from vlastore.storage.settings import CACHE_ENV, OPTIONS_ENV
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_nodes(store: str, out: Path, env_per_node: list[dict[str, str]]) -> None:
    port = free_port()
    agents = []
    for node, extra in enumerate(env_per_node):
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", **extra}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(ROOT / "tests" / "multinode_worker.py"),
            store,
            str(out),
        ]
        agents.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            raise
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)


def reference_batches(tmp_path: Path) -> list[list[dict[str, torch.Tensor]]]:
    """The same episodes and features in a local store written by one process; each rank's batches."""
    store = VLAStore.create(tmp_path / "reference.vla", episodes())
    store.add_family(FAMILY, SPEC, producer=PRODUCER)
    with store.writer(FAMILY) as writer:
        rows = writer.pending_rows()
        writer.write_rows(rows, row_values(rows))
    dataset = VLADataset(tmp_path / "reference.vla", features=[FAMILY])
    return [train_batches(dataset, rank, WORLD, num_workers=0) for rank in range(WORLD)]


def assert_same_batches(out: Path, expected: list[list[dict[str, torch.Tensor]]]) -> None:
    for rank in range(WORLD):
        got = torch.load(out / f"batches-{rank}.pt")
        assert len(got) == len(expected[rank]) > 0
        for a, b in zip(got, expected[rank], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (rank, key)


def test_shared_folder_two_nodes(tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "store.vla"
    shared.parent.mkdir()
    VLAStore.create(shared, episodes())
    out = tmp_path / "out"
    out.mkdir()
    run_two_nodes(str(shared), out, [{}, {}])
    assert_same_batches(out, reference_batches(tmp_path))
    store = VLAStore.open(shared)
    assert store.coverage(FAMILY).all()
    assert len(store.written_shards(FAMILY)) == store.layout(FAMILY).n_shards


def test_object_storage_two_nodes_with_a_cache_each(
    tmp_path: Path, s3_url: str, proxy_options: dict[str, str], s3_proxy: FaultProxy
) -> None:
    VLAStore.create(s3_url, episodes(), storage_options=proxy_options)
    out = tmp_path / "out"
    out.mkdir()
    caches = [tmp_path / f"node{n}-cache" for n in range(WORLD)]
    options = json.dumps(proxy_options)
    s3_proxy.reset()
    run_two_nodes(s3_url, out, [{OPTIONS_ENV: options, CACHE_ENV: str(c)} for c in caches])
    assert_same_batches(out, reference_batches(tmp_path))

    store = VLAStore.open(s3_url, storage_options=proxy_options)
    n_shards = store.layout(FAMILY).n_shards
    shard_keys = {store.shard_key(FAMILY, s) for s in range(n_shards)}
    puts = [r for r in s3_proxy.requests("PUT") if any(r.key.endswith(k) for k in shard_keys)]
    assert sorted(r.key for r in puts) == sorted({r.key for r in puts}) and len(puts) == n_shards  # each once
    downloads = [
        r
        for r in s3_proxy.requests("GET")
        if any(r.key.endswith(k) for k in shard_keys) and not (r.range or "").startswith("bytes=-")
    ]
    cached = [len(list(c.rglob("objects/*"))) for c in caches]
    assert all(n > 0 for n in cached)
    assert len(downloads) == sum(cached)  # each node downloaded each shard it read once
    assert all(n <= n_shards for n in cached)
    for rank, cache in enumerate(caches):  # a node holds the shards its rank's samples read, and only those
        batches = torch.load(out / f"batches-{rank}.pt")
        episode = np.concatenate([b["episode_index"].numpy() for b in batches])
        vlm_idx = np.concatenate([b[f"{FAMILY}_{SPEC.index_name}"].numpy() for b in batches])
        rows = [store.row(FAMILY, store.catalog.names[e], i) for e, i in zip(episode.tolist(), vlm_idx.tolist())]
        assert len(list(cache.rglob("objects/*"))) == len({r // SPEC.rows_per_shard for r in rows})
