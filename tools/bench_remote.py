"""Object storage benchmark: which S3 client, and what the node-local shard cache costs.

Starts its own S3 server (moto, in a separate process on 127.0.0.1) and prints,
in one run, ratios against baselines measured in the same run:

1. ``--clients``: obstore vs botocore (the client of vlastore.storage) vs s3fs,
   for a ranged 4 KiB GET, a whole 32 MiB GET, PUT, put-if-absent, put-if-match
   (CAS), LIST, what a stale conditional write raises, and whether the client
   still works in a forked child after the parent used it (DataLoader workers).
2. ``--cache``: shards of ``--shard-mib`` MiB through CachedStorage:
   - bytes fetched per node, with ``--ranks`` processes reading every shard in
     their own order through one cache folder, against the bytes of the shards
     (goal <= 1.05x; counted at a proxy in front of the server);
   - a cold first pass (open_map + reading every byte) against one plain
     download of the same objects (goal <= 1.3x), without and with prefetch;
   - warm random row reads through open_map against np.memmap of the same
     files on local disk (goal >= 0.9x).

    python tools/bench_remote.py                   # both (about 1-2 min on 2 cores)
    python tools/bench_remote.py --clients          # only the client comparison
    python tools/bench_remote.py --cache --shards 16 --shard-mib 16
    python tools/bench_remote.py --train --ranged   # the issue's figures: VLADataset from S3, single rows

Loopback moto is slow (milliseconds per request, tens of ms per MiB in Python),
so absolute figures say little about real S3; the ratios say how the pieces
compare on the same server.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from vlastore.shardcodec import crc32c  # noqa: E402
from vlastore.storage import CachedStorage, ObjectStorage  # noqa: E402

BUCKET = "vlastore-bench"
CREDS = {"access_key_id": "bench", "secret_access_key": "bench", "region": "us-east-1"}

SERVER = """
import http.client, sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
conn = http.client.HTTPConnection(host, port)
conn.request("PUT", "/" + sys.argv[1])
conn.getresponse().read()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
"""


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, BUCKET],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def median_s(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_download(remote: ObjectStorage, keys: list[str], folder: Path) -> None:
    """The baseline of a cold pass: each object downloaded once into a file of ``folder``, one after another."""
    folder.mkdir(exist_ok=True)
    for i, key in enumerate(keys):
        with open(folder / f"{i}", "wb") as out:
            remote.download(key, out)


def best_alternating(first: Callable[[], float], second: Callable[[], float], rounds: int = 5) -> tuple[float, float]:
    """The smallest of ``rounds`` results of each, run in turns (first, second, first, ...): neither gains from
    running first or later on a machine whose load changes."""
    a = b = float("inf")
    for _ in range(rounds):
        a, b = min(a, first()), min(b, second())
    return a, b


# ------------------------------------------------------------------ clients


def works_after_fork(use: Callable[[], object], timeout_s: float = 20.0) -> str:
    """Use the client in the parent, fork, use it (or a new one) in the child: 'works', 'hangs' or 'fails'."""
    use()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            use()
            code = 0
        finally:
            os._exit(code)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "works" if os.waitstatus_to_exitcode(status) == 0 else "fails"
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return f"hangs (killed after {timeout_s:.0f} s)"


def _bench_obstore(
    endpoint: str,
    repeats: int,
    big: bytes,
    small: bytes,
    offsets: Iterator[int],
    results: dict[str, dict[str, float]],
    notes: dict[str, list[str]],
) -> None:
    try:
        import obstore as obs
        from obstore.store import S3Store
    except ImportError:
        print("obstore not installed: pip install obstore to compare against it")
        return
    ost = S3Store(
        BUCKET,
        prefix="clients/ob",
        endpoint=endpoint,
        access_key_id="bench",
        secret_access_key="bench",
        region="us-east-1",
        client_options={"allow_http": True},
    )
    obs.put(ost, "big", big, use_multipart=False)
    for i in range(500):
        obs.put(ost, f"many/{i:04d}", b"1")
    oetag = [obs.put(ost, "cas", b"0")["e_tag"]]

    def ob_cas() -> None:
        oetag[0] = obs.put(ost, "cas", b"1", mode={"e_tag": oetag[0]})["e_tag"]

    results["obstore"] = {
        "ranged 4 KiB GET": median_s(
            lambda: obs.get_range(ost, "big", start=(o := next(offsets)), end=o + 4096), repeats * 10
        ),
        "GET 32 MiB": median_s(lambda: obs.get(ost, "big").bytes(), repeats),
        "PUT 1 MiB": median_s(lambda: obs.put(ost, "p", small, use_multipart=False), repeats * 2),
        "put-if-absent 1 MiB": median_s(
            lambda: obs.put(ost, uuid.uuid4().hex, small, mode="create", use_multipart=False), repeats * 2
        ),
        "put-if-match (CAS)": median_s(ob_cas, repeats * 2),
        "LIST 500 keys": median_s(lambda: [m for batch in obs.list(ost, "many") for m in batch], repeats),
    }
    try:
        obs.put(ost, "cas", b"x", mode={"e_tag": '"stale"'})
        stale = "succeeded (no condition!)"
    except Exception as exc:
        stale = type(exc).__name__
    notes["obstore"] = [
        f"stale If-Match raises {stale}",
        f"after fork: {works_after_fork(lambda: obs.get_range(ost, 'big', start=0, end=10))}",
    ]


def _bench_s3fs(
    endpoint: str,
    repeats: int,
    big: bytes,
    small: bytes,
    offsets: Iterator[int],
    results: dict[str, dict[str, float]],
    notes: dict[str, list[str]],
) -> None:
    try:
        import s3fs
    except ImportError:
        print("s3fs not installed: pip install s3fs to compare against it")
        return
    fs = s3fs.S3FileSystem(
        key="bench", secret="bench", endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"}
    )
    base = f"{BUCKET}/clients/fs/"
    fs.pipe_file(base + "big", big)
    for i in range(500):
        fs.pipe_file(f"{base}many/{i:04d}", b"1")
    fetag = [fs.pipe_file(base + "cas", b"0")["ETag"]]

    def fs_cas() -> None:
        fetag[0] = fs.pipe_file(base + "cas", b"1", IfMatch=fetag[0])["ETag"]

    results["s3fs"] = {
        "ranged 4 KiB GET": median_s(
            lambda: fs.cat_file(base + "big", start=(o := next(offsets)), end=o + 4096), repeats * 10
        ),
        "GET 32 MiB": median_s(lambda: fs.cat_file(base + "big"), repeats),
        "PUT 1 MiB": median_s(lambda: fs.pipe_file(base + "p", small), repeats * 2),
        "put-if-absent 1 MiB": median_s(
            lambda: fs.pipe_file(base + uuid.uuid4().hex, small, mode="create"), repeats * 2
        ),
        "put-if-match (CAS)": median_s(fs_cas, repeats * 2),
        "LIST 500 keys": median_s(lambda: fs.ls(base + "many", refresh=True), repeats),
    }
    try:
        fs.pipe_file(base + "cas", b"x", IfMatch='"stale"')
        stale = "succeeded (no condition!)"
    except Exception as exc:
        stale = f"{type(exc).__name__}: {str(exc)[:40]}"

    def fs_after_fork() -> None:
        s3fs.S3FileSystem(
            key="bench",
            secret="bench",
            endpoint_url=endpoint,
            skip_instance_cache=True,
            client_kwargs={"region_name": "us-east-1"},
        ).cat_file(base + "big", start=0, end=10)

    notes["s3fs"] = [f"stale If-Match raises {stale}", f"after fork: {works_after_fork(fs_after_fork)} (new instance)"]


def bench_clients(endpoint: str, repeats: int) -> None:
    big = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8).tobytes()
    small = big[: 1 << 20]
    offsets = iter(np.random.default_rng(1).integers(0, len(big) - 4096, 100_000).tolist())
    results: dict[str, dict[str, float]] = {}
    notes: dict[str, list[str]] = {}

    storage = ObjectStorage(f"s3://{BUCKET}/clients/boto", {"endpoint": endpoint, **CREDS})
    client = storage._client  # the raw botocore client ObjectStorage uses
    key = "clients/boto/"
    client.put_object(Bucket=BUCKET, Key=key + "big", Body=big)
    for i in range(500):
        client.put_object(Bucket=BUCKET, Key=f"{key}many/{i:04d}", Body=b"1")
    etag = [client.put_object(Bucket=BUCKET, Key=key + "cas", Body=b"0")["ETag"]]

    def boto_cas() -> None:
        etag[0] = client.put_object(Bucket=BUCKET, Key=key + "cas", Body=b"1", IfMatch=etag[0])["ETag"]

    def boto_range() -> None:
        o = next(offsets)
        client.get_object(Bucket=BUCKET, Key=key + "big", Range=f"bytes={o}-{o + 4095}")["Body"].read()

    results["botocore"] = {
        "ranged 4 KiB GET": median_s(boto_range, repeats * 10),
        "GET 32 MiB": median_s(lambda: client.get_object(Bucket=BUCKET, Key=key + "big")["Body"].read(), repeats),
        "PUT 1 MiB": median_s(lambda: client.put_object(Bucket=BUCKET, Key=key + "p", Body=small), repeats * 2),
        "put-if-absent 1 MiB": median_s(
            lambda: client.put_object(Bucket=BUCKET, Key=key + uuid.uuid4().hex, Body=small, IfNoneMatch="*"),
            repeats * 2,
        ),
        "put-if-match (CAS)": median_s(boto_cas, repeats * 2),
        "LIST 500 keys": median_s(lambda: list(storage.list("many")), repeats),
    }
    version = [storage.get_versioned("cas")[1]]  # type: ignore[index]
    results["vlastore ObjectStorage"] = {
        "ranged 4 KiB GET": median_s(lambda: storage.get_range("big", (o := next(offsets)), o + 4096), repeats * 10),
        "GET 32 MiB": median_s(lambda: storage.get("big"), repeats),
        "PUT 1 MiB": median_s(lambda: storage.put("p", small), repeats * 2),
        "put-if-absent 1 MiB": median_s(lambda: storage.put_if_absent(uuid.uuid4().hex, small), repeats * 2),
        "put-if-match (CAS)": median_s(
            lambda: version.__setitem__(0, storage.put_if_version("cas", b"1", version[0])), repeats * 2
        ),
        "LIST 500 keys": results["botocore"]["LIST 500 keys"],
    }
    notes["botocore"] = [f"after fork: {works_after_fork(lambda: storage.get_range('big', 0, 10))} (client per pid)"]

    _bench_obstore(endpoint, repeats, big, small, offsets, results, notes)
    _bench_s3fs(endpoint, repeats, big, small, offsets, results, notes)

    baseline = results.get("obstore", results["botocore"])
    names = list(results)
    print(f"\n1. clients (median ms; in brackets: / {'obstore' if 'obstore' in results else 'botocore'})")
    print(f"{'operation':<22}" + "".join(f"{n:>26}" for n in names))
    for op in baseline:
        cells = "".join(f"{results[n][op] * 1e3:>17.2f} [{results[n][op] / baseline[op]:4.2f}x]" for n in names)
        print(f"{op:<22}{cells}")
    for name, lines in notes.items():
        for line in lines:
            print(f"  {name}: {line}")


# -------------------------------------------------------------------- cache

RANK = """
import sys, numpy as np
from vlastore.storage import CachedStorage, ObjectStorage
from vlastore.shardcodec import crc32c
url, endpoint, cache_dir, rank, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
remote = ObjectStorage(url, {"endpoint": endpoint, "access_key_id": "bench", "secret_access_key": "bench"})
cache = CachedStorage(remote, cache_dir, 1 << 40)
order = np.random.default_rng(rank).permutation(n)
total = 0
for i in order:
    total ^= crc32c(cache.open_map(f"shard/{i}"))
print(total)
"""


def bench_cache(endpoint: str, shards: int, shard_mib: int, ranks: int, rows: int, workdir: Path) -> None:
    from s3_server import FaultProxy

    url = f"s3://{BUCKET}/cache-{uuid.uuid4().hex[:8]}"
    remote = ObjectStorage(url, {"endpoint": endpoint, **CREDS})
    nbytes = shard_mib << 20
    rng = np.random.default_rng(2)
    t0 = time.perf_counter()
    for i in range(shards):
        remote.put(f"shard/{i}", rng.integers(0, 256, nbytes, dtype=np.uint8))
    total = shards * nbytes
    print(
        f"\n2. node cache: {shards} shards x {shard_mib} MiB ({total / 2**20:.0f} MiB) put in "
        f"{time.perf_counter() - t0:.1f} s"
    )

    # bytes per node: every rank reads every shard, in its own order, through one cache folder
    proxy = FaultProxy(endpoint, BUCKET)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(RANK),
                url,
                proxy.endpoint,
                str(workdir / "node-cache"),
                str(r),
                str(shards),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(ranks)
    ]
    answers = {p.communicate()[0].strip() for p in procs}
    fetched = sum(r.body_bytes for r in proxy.requests("GET"))
    proxy.close()
    print(
        f"   bytes fetched per node, {ranks} ranks reading all shards: {fetched / total:.3f}x the shard bytes "
        f"(goal <= 1.05x; {len(proxy.log)} requests, ranks agree: {len(answers) == 1}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )

    # cold first pass vs one plain download of the same bytes
    plain_dir = workdir / "plain"
    plain = partial(plain_download, remote, [f"shard/{i}" for i in range(shards)], plain_dir)

    def cold(prefetch: int) -> None:
        folder = workdir / f"cold-{uuid.uuid4().hex[:6]}"
        cache = CachedStorage(
            ObjectStorage(url, {"endpoint": endpoint, **CREDS}), folder, 1 << 40, prefetch_threads=max(1, prefetch)
        )
        for i in range(shards):
            if prefetch:
                cache.prefetch([f"shard/{j}" for j in range(i + 1, min(shards, i + 1 + prefetch))])
            crc32c(cache.open_map(f"shard/{i}"))  # the training pass reads every byte once
        cache.close()
        shutil.rmtree(folder)

    t_plain = median_s(plain, 3)
    t_cold = median_s(lambda: cold(0), 3)
    t_prefetch = median_s(lambda: cold(2), 3)
    print(
        f"   plain download {t_plain:.2f} s ({total / t_plain / 2**20:.0f} MiB/s); cold pass through the cache "
        f"{t_cold:.2f} s = {t_cold / t_plain:.2f}x, with prefetch of the next 2 shards {t_prefetch:.2f} s = "
        f"{t_prefetch / t_plain:.2f}x (goal <= 1.3x)"
    )

    # warm: random rows through open_map vs np.memmap of the same bytes on local disk
    row = 4096
    per_shard = nbytes // row
    picks = np.random.default_rng(3).integers(0, shards * per_shard, rows)
    batches = [np.sort(picks[i : i + 32]) for i in range(0, rows, 32)]

    def gather(maps: list[np.ndarray]) -> int:
        acc = 0
        for batch in batches:
            for r in batch:
                s, k = divmod(int(r), per_shard)
                acc += int(maps[s][k * row])  # one row view, as the reader hands out
                maps[s][k * row : (k + 1) * row].copy()
        return acc

    warm_dir = workdir / "warm"
    warm = CachedStorage(ObjectStorage(url, {"endpoint": endpoint, **CREDS}), warm_dir, 1 << 40)
    for i in range(shards):
        warm.local_path(f"shard/{i}")
    fresh = CachedStorage(ObjectStorage(url, {"endpoint": endpoint, **CREDS}), warm_dir, 1 << 40)
    t0 = time.perf_counter()
    cache_maps = [fresh.open_map(f"shard/{i}") for i in range(shards)]  # a new process: one HEAD per shard
    t_open = time.perf_counter() - t0
    local_maps = []  # a local store's open_map: a private map of the file (np.memmap's subclass is slower)
    for i in range(shards):
        with open(plain_dir / f"{i}", "rb") as f:
            local_maps.append(np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8))
    for maps in (cache_maps, local_maps):  # page both in once: both warm
        for m in maps:
            crc32c(m)
    t_local, t_cache = best_alternating(
        lambda: median_s(lambda: gather(local_maps), 1),
        lambda: median_s(lambda: gather(cache_maps), 1),  # type: ignore[arg-type]
    )
    print(
        f"   warm random {row}-byte rows: cache open_map {rows / t_cache:,.0f} rows/s vs a local file's map "
        f"{rows / t_local:,.0f} rows/s = {t_local / t_cache:.2f}x (goal >= 0.9x); opening {shards} cached shards "
        f"in a new process: {t_open * 1e3:.0f} ms (one HEAD each)"
    )


# ------------------------------------------------------------ training and single rows (the figures)


def _make_store(path: Path, rows_wanted: int, width: int, rows_per_shard: int) -> tuple[str, int]:
    """A local store with one bfloat16 feature family of about ``rows_wanted`` rows; (family, rows)."""
    import torch

    from vlastore.store import EpisodeData, FamilySpec, VLAStore

    rng = np.random.default_rng(0)
    steps_per_episode = 300
    n_episodes = max(1, -(-rows_wanted * 3 // steps_per_episode))
    episodes = [
        EpisodeData(
            f"episode_{e:04d}",
            {
                "state": rng.normal(size=(steps_per_episode, 7)).astype(np.float32),
                "action": rng.normal(size=(steps_per_episode, 7)).astype(np.float32),
            },
        )
        for e in range(n_episodes)
    ]
    store = VLAStore.create(path, episodes)
    store.add_family("feat", FamilySpec((width,), "bfloat16", vlm_reuse_count=3, rows_per_shard=rows_per_shard))
    rows = store.layout("feat").rows
    with store.writer("feat") as writer:
        for lo in range(0, rows, 4096):
            block = np.arange(lo, min(rows, lo + 4096))
            writer.write_rows(
                block, torch.from_numpy(rng.normal(size=(len(block), width)).astype(np.float32)).to(torch.bfloat16)
            )
    return "feat", rows


def _upload(folder: Path, remote: ObjectStorage) -> tuple[int, list[str]]:
    """Every file of a local store into ``remote``; (shard bytes, shard keys)."""
    total, shards = 0, []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = path.relative_to(folder).as_posix()
            remote.put(key, path.read_bytes())
            if "/values/c/" in key:
                total += path.stat().st_size
                shards.append(key)
    return total, shards


def _samples_per_s(dataset: object, batches: list[np.ndarray]) -> float:
    getitems = dataset.__getitems__  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for batch in batches:
        getitems(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def bench_train(endpoint: str, rows: int, width: int, rows_per_shard: int, batch: int, workdir: Path) -> None:
    """Training samples/s (VLADataset batches) from S3 through the node cache vs the same store on local disk."""
    from s3_server import FaultProxy

    from vlastore.dataset import LookaheadBatchSampler, VLADataset

    local = workdir / "train-local.vla"
    family, n_rows = _make_store(local, rows, width, rows_per_shard)
    url = f"s3://{BUCKET}/train-{uuid.uuid4().hex[:8]}/store.vla"
    options = {"endpoint": endpoint, **CREDS}
    shard_bytes, shards = _upload(local, ObjectStorage(url, options))
    print(
        f"\n3. training from S3: {n_rows:,} rows of {width} bfloat16, {len(shards)} shards, "
        f"{shard_bytes / 2**20:.0f} MiB; random batches of {batch} through VLADataset.__getitems__"
    )

    t_plain = median_s(partial(plain_download, ObjectStorage(url, options), shards, workdir / "train-plain"), 3)

    order = np.random.default_rng(5).permutation(len(VLADataset(local, features=[family])))
    epoch = [order[i : i + batch] for i in range(0, len(order), batch)]

    def cold_epoch(folder: Path, opts: dict[str, str]) -> tuple[float, float]:
        """A whole first epoch, cold: open the store, then every batch as ``dataset.dataloader`` makes them
        (its look-ahead sampler prefetches the shards of the next batches); each shard downloaded on first
        need, verified, mapped. Returns (seconds to open, seconds for the epoch)."""
        t0 = time.perf_counter()
        ds = VLADataset(url, features=[family], storage_options=opts, cache_dir=folder)
        t1 = time.perf_counter()
        getitems = ds.__getitems__
        for indices in LookaheadBatchSampler(ds, epoch):
            getitems(indices)
        t2 = time.perf_counter()
        ds.store.storage.close()  # type: ignore[attr-defined]
        ds.store.storage.unpin()  # type: ignore[attr-defined]
        return t1 - t0, t2 - t1

    t_open, t_epoch = min((cold_epoch(workdir / f"cold-{i}", options) for i in range(3)), key=sum)
    t_cold = t_open + t_epoch
    proxy = FaultProxy(endpoint, BUCKET)  # a cold epoch through a counting proxy: the bytes the node fetched
    cold_epoch(workdir / "cold-counted", {"endpoint": proxy.endpoint, **CREDS})
    fetched = sum(r.body_bytes for r in proxy.requests("GET"))
    shard_fetched = sum(r.body_bytes for r in proxy.requests("GET") if "/values/c/" in r.key)
    proxy.close()
    print(
        f"   cold first epoch {t_cold:.2f} s (open {t_open:.2f} s: metadata requests; then download, verify and "
        f"read every sample once {t_epoch:.2f} s) vs one plain download of the shards {t_plain:.2f} s = "
        f"{t_cold / t_plain:.2f}x, {t_epoch / t_plain:.2f}x without the open (goal <= 1.3x)"
    )
    print(
        f"   bytes fetched by the node: {shard_fetched / shard_bytes:.3f}x the shard bytes (goal <= 1.05x; "
        f"{fetched / shard_bytes:.3f}x with the metadata)"
    )

    warm = VLADataset(url, features=[family], storage_options=options, cache_dir=workdir / "train-cache")
    on_disk = VLADataset(local, features=[family])
    steps = [np.random.default_rng(6 + i).integers(0, len(order), batch) for i in range(max(20, 20_000 // batch))]
    _samples_per_s(warm, steps[:5])  # map the shards (a new process would do it once)
    _samples_per_s(on_disk, steps[:5])
    inv_local, inv_warm = best_alternating(  # seconds per sample: the smallest is the best rate
        lambda: 1 / _samples_per_s(on_disk, steps), lambda: 1 / _samples_per_s(warm, steps)
    )
    best_local, best_warm = 1 / inv_local, 1 / inv_warm
    print(
        f"   warm node cache {best_warm:,.0f} samples/s vs local disk {best_local:,.0f} samples/s = "
        f"{best_warm / best_local:.2f}x (goal >= 0.9x)"
    )


def bench_ranged(endpoint: str, rows: int, width: int, rows_per_shard: int, reads: int, workdir: Path) -> None:
    """Random single rows without the cache: requests per row, rows/s against zarr-python on the same server."""
    from s3_server import FaultProxy

    from vlastore.format import values_path
    from vlastore.store import VLAStore

    local = workdir / "ranged-local.vla"
    family, n_rows = _make_store(local, rows, width, rows_per_shard)
    url = f"s3://{BUCKET}/ranged-{uuid.uuid4().hex[:8]}/store.vla"
    _upload(local, ObjectStorage(url, {"endpoint": endpoint, **CREDS}))
    picks = np.random.default_rng(7).integers(0, n_rows, reads).tolist()
    proxy = FaultProxy(endpoint, BUCKET)  # both readers go through it: same path, requests counted
    options = {"endpoint": proxy.endpoint, **CREDS}
    store = VLAStore.open(url, storage_options=options)
    reader = store.reader(family)
    n_shards = store.layout(family).n_shards
    proxy.reset()
    t0 = time.perf_counter()
    for r in picks:
        reader.row(r)
    t_ours = time.perf_counter() - t0
    gets = [r for r in proxy.requests("GET") if "/values/" in r.key]
    index_reads = sum(1 for r in gets if (r.range or "").startswith("bytes=-"))
    print(f"\n4. random single rows without the cache: {reads:,} rows of {width} bfloat16 over {n_shards} shards")
    print(
        f"   vlastore: {reads / t_ours:,.0f} rows/s, {(len(gets) - index_reads) / reads:.2f} request per row "
        f"(goal 1) + {index_reads} index reads (one per shard touched, {index_reads / reads:.2f} per row here)"
    )
    try:
        import zarr
        from obstore.store import S3Store
        from zarr.storage import ObjectStore
    except ImportError:
        print("   zarr-python: obstore not installed (pip install obstore) for zarr's ObjectStore")
        proxy.close()
        return
    prefix = url[len(f"s3://{BUCKET}/") :]
    zstore = ObjectStore(
        S3Store(
            BUCKET,
            prefix=prefix,
            endpoint=proxy.endpoint,
            access_key_id="bench",
            secret_access_key="bench",
            region="us-east-1",
            client_options={"allow_http": True},
        ),
        read_only=True,
    )
    array = zarr.open_array(store=zstore, path=values_path(family, store.generation(family).generation), mode="r")
    array[picks[0]]
    proxy.reset()
    t0 = time.perf_counter()
    for r in picks:
        array[r]
    t_zarr = time.perf_counter() - t0
    zarr_gets = len([r for r in proxy.requests("GET") if "/values/" in r.key])
    proxy.close()
    print(
        f"   zarr-python {zarr.__version__} (ObjectStore/obstore): {reads / t_zarr:,.0f} rows/s, "
        f"{zarr_gets / reads:.2f} requests per row; vlastore / zarr-python = {t_zarr / t_ours:.2f}x rows/s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", action="store_true", help="only the client comparison")
    parser.add_argument("--cache", action="store_true", help="only the node cache figures")
    parser.add_argument("--train", action="store_true", help="only training from S3 (VLADataset) vs local disk")
    parser.add_argument("--ranged", action="store_true", help="only random single rows without the cache")
    parser.add_argument("--train-rows", type=int, default=16_384, help="feature rows of the training store")
    parser.add_argument("--width", type=int, default=2048, help="bfloat16 values per row")
    parser.add_argument("--rows-per-shard", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reads", type=int, default=2000, help="random single rows read remotely")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    both = not (args.clients or args.cache or args.train or args.ranged)
    server, endpoint = start_server()
    workdir = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=args.workdir))
    try:
        if args.clients or both:
            bench_clients(endpoint, args.repeats)
        if args.cache or both:
            bench_cache(endpoint, args.shards, args.shard_mib, args.ranks, args.rows, workdir)
        if args.train or both:
            bench_train(endpoint, args.train_rows, args.width, args.rows_per_shard, args.batch, workdir)
        if args.ranged or both:
            bench_ranged(endpoint, args.train_rows, args.width, args.rows_per_shard, args.reads, workdir)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
