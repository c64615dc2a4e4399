"""Loader benchmark: VLADataset through DataLoader workers against the same dataset in-process.

Builds a store of ``--rows`` feature rows (2048 bfloat16, ``vlm_reuse_count`` 3,
100 rows per episode, 7-column ``state``/``action`` series) or reads ``--store``,
then prints, in one run:

1. **batch work** in one process (``__getitems__`` + ``collate``) split into the
   feature gather (``FeatureReader.gather`` of the same rows) and the rest
   (windows and metadata), as CPU time of the thread, median of alternating turns;
2. **samples/s through loaders** at each ``--batch`` size: ``num_workers=0``, a
   plain ``torch.utils.data.DataLoader(num_workers=--workers)`` and
   :class:`vlastore.loader.VLADataLoader` (same arguments), taking turns of
   ``--turn`` seconds so that every contender sees the same mix of quiet and busy
   moments, with ratios to ``num_workers=0``, the CPU time all their processes
   spent per batch, and the load average. Every process has read every feature row
   once before (the in-process one, and each worker in ``worker_init_fn``): all
   contenders in the state of a second epoch; ``--cold-workers`` skips it for workers.

Pages are pre-touched on purpose: ``--cache warm`` (default) reads every store file
first; ``--cache cold`` drops the store's pages from the page cache
(``posix_fadvise(DONTNEED)``) before each batch-work measurement (loaders always
run warm: a cold loader run measures the disk).

    python tools/bench_loader.py                       # 100,000 rows, batches 64 and 256
    python tools/bench_loader.py --rows 30000 --seconds 6
    taskset -c 0,1 python tools/bench_loader.py        # two cores of a bigger machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlastore.dataset import VLADataset, collate  # noqa: E402
from vlastore.format import FamilySpec, Producer  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402

N_OBS, HORIZON = 2, 8


def build(path: Path, rows: int, dim: int = 2048, reuse: int = 3, per_episode: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_episodes = -(-rows // per_episode)
    items = np.full(n_episodes, per_episode, dtype=np.int64)
    items[-1] = rows - per_episode * (n_episodes - 1)
    episodes = [
        EpisodeData(
            f"episode_{i:06d}",
            {
                "state": rng.standard_normal((n * reuse, 7)).astype(np.float32),
                "action": rng.standard_normal((n * reuse, 7)).astype(np.float32),
            },
        )
        for i, n in enumerate(items.tolist())
    ]
    store = VLAStore.create(path, episodes)
    store.add_family(
        "qwen_vl",
        FamilySpec((dim,), "bfloat16", vlm_reuse_count=reuse),
        items,
        producer=Producer("bench/random", fingerprint="bench000"),
    )
    with store.writer("qwen_vl") as writer:
        for lo in range(0, rows, 16384):
            hi = min(rows, lo + 16384)
            writer.write_rows(np.arange(lo, hi), rng.integers(0, 0x7F00, size=(hi - lo, dim), dtype=np.uint16))


def store_files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def touch(path: Path, cache: str) -> None:
    """Pre-touch the store on purpose: read every file (warm), or drop its pages (cold)."""
    for f in store_files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            if cache == "warm":
                while os.read(fd, 1 << 24):
                    pass
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------- batch work


def batch_work(ds: VLADataset, root: Path, batch: int, turns: int, cache: str, seed: int) -> dict[str, float]:
    """Microseconds of thread CPU time per batch: gather alone, the whole batch, and the rest."""
    reader = ds._readers["qwen_vl"]
    rng = np.random.default_rng(seed)
    per_turn = max(20, 12800 // batch)
    batches = [rng.integers(0, len(ds), batch) for _ in range(per_turn * turns)]
    first_rows = reader.layout.episode_rows
    rowsets = []
    for b in batches:  # the rows each batch gathers, taken from the batch itself
        x = collate(ds.__getitems__(b.tolist()))
        rowsets.append(first_rows[x["episode_index"].numpy()] + x["qwen_vl_vlm_idx"].numpy())
    clock = time.thread_time
    gather, whole = [], []
    for turn in range(turns):
        part = slice(turn * per_turn, (turn + 1) * per_turn)
        if cache == "cold":
            touch(root, "cold")
        t0 = clock()
        for rows in rowsets[part]:
            reader.gather(rows)
        gather.append((clock() - t0) / per_turn)
        lists = [b.tolist() for b in batches[part]]
        if cache == "cold":
            touch(root, "cold")
        t0 = clock()
        for indices in lists:
            collate(ds.__getitems__(indices))
        whole.append((clock() - t0) / per_turn)
    g, w = float(np.median(gather)) * 1e6, float(np.median(whole)) * 1e6
    return {"gather": g, "whole": w, "rest": w - g}


# ---------------------------------------------------------------- loaders


def endless(ds: VLADataset, seed: int) -> torch.utils.data.Sampler:
    return torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=10**12, generator=torch.Generator().manual_seed(seed)
    )


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (Linux /proc; 0 where unreadable)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def loader_rates(loaders: dict[str, Any], seconds: float, turn: float) -> dict[str, tuple[float, float, float]]:
    """``{name: (samples/s, CPU us per batch of all processes, of the training process)}``.

    Loaders take turns of ``turn`` seconds (``seconds`` each in all). Worker start-up is left
    out (a few batches are read first). A paused loader's workers fill their prefetch queue (a
    few batches) and then wait; that flatters it by well under 1%.
    """
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for it in iterators.values():
        for _ in range(8):
            next(it)
    pids = {name: [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])] for name, it in iterators.items()}
    done = {name: 0 for name in loaders}
    batches = {name: 0 for name in loaders}
    spent = {name: 0.0 for name in loaders}
    cpu = {name: 0.0 for name in loaders}
    main_cpu = {name: 0.0 for name in loaders}
    rounds = max(1, round(seconds / turn))
    for _ in range(rounds):
        for name, it in iterators.items():
            c0 = cpu_seconds(pids[name])
            m0 = cpu_seconds(pids[name][:1])
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < turn:
                done[name] += len(next(it)["step"])
                batches[name] += 1
            spent[name] += time.perf_counter() - t0
            cpu[name] += cpu_seconds(pids[name]) - c0
            main_cpu[name] += cpu_seconds(pids[name][:1]) - m0
    del iterators
    return {
        name: (done[name] / spent[name], cpu[name] / batches[name] * 1e6, main_cpu[name] / batches[name] * 1e6)
        for name in loaders
    }


def read_every_row(ds: VLADataset) -> None:
    """Read (and check) every feature row once: page tables filled, ``verify="once"`` done, as in a 2nd epoch."""
    for reader in ds._readers.values():
        rows = reader.layout.rows
        for lo in range(0, rows, 8192):
            reader.gather(np.arange(lo, min(rows, lo + 8192)))


def warm_worker(worker_id: int) -> None:
    """worker_init_fn: a worker starts where the in-process contender is (every row read once)."""
    info = torch.utils.data.get_worker_info()
    assert info is not None
    read_every_row(info.dataset)


def make_loaders(
    ds: VLADataset, batch: int, workers: int, pin: bool, seed: int, kinds: list[str], warm: bool
) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    loaders: dict[str, Any] = {}
    common = {"batch_size": batch, "collate_fn": collate, "pin_memory": pin}
    if "inproc" in kinds:
        loaders["num_workers=0"] = DataLoader(ds, sampler=endless(ds, seed), **common)
    with_workers = {
        "num_workers": workers,
        "persistent_workers": True,
        "worker_init_fn": warm_worker if warm else None,
        **common,
    }
    if "plain" in kinds:
        loaders[f"DataLoader(num_workers={workers})"] = DataLoader(ds, sampler=endless(ds, seed), **with_workers)
    if "vla" in kinds:
        try:
            from vlastore.loader import VLADataLoader
        except ImportError:
            pass
        else:
            loaders[f"VLADataLoader(num_workers={workers})"] = VLADataLoader(
                ds, sampler=endless(ds, seed), **with_workers
            )
    return loaders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="feature rows to build (default: %(default)s)")
    parser.add_argument("--store", help="read this store (a family 'qwen_vl', series state/action) instead")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="time per loader and batch size (default: %(default)s)"
    )
    parser.add_argument("--turn", type=float, default=1.0, help="seconds per turn (default: %(default)s)")
    parser.add_argument("--turns", type=int, default=15, help="batch-work turns (default: %(default)s)")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm", help="(default: %(default)s)")
    parser.add_argument("--pin-memory", action="store_true", help="pin_memory=True for every loader")
    parser.add_argument(
        "--loaders",
        nargs="+",
        default=["inproc", "plain", "vla"],
        choices=["inproc", "plain", "vla"],
        help="(default: all)",
    )
    parser.add_argument("--skip-loaders", action="store_true", help="batch work only")
    parser.add_argument(
        "--cold-workers",
        action="store_true",
        help="workers start without reading every row first (a first epoch: page faults and checksums in every worker)",
    )
    parser.add_argument("--verify", default="once", choices=["once", "always", "never"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tmp = None
    if args.store:
        root = Path(args.store)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="vlastore-loader-"))
        root = tmp / "store.vla"
        t0 = time.perf_counter()
        build(root, args.rows)
        print(f"built {args.rows:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        ds = VLADataset(root, features=["qwen_vl"], n_obs_steps=N_OBS, horizon=HORIZON, verify=args.verify)
        touch(root, "warm")
        read_every_row(ds)  # every row read (and checked) once: the state of a second epoch
        print(
            f"{ds!r}\nmachine: {os.cpu_count()} CPUs (this process may use {len(os.sched_getaffinity(0))}), "
            f"torch {torch.__version__}, numpy {np.__version__}, verify={args.verify!r}"
        )
        print(f"\nbatch work in one process ({args.cache} page cache, thread CPU time, median of {args.turns} turns)")
        print(f"  {'batch':>5}  {'gather us':>10}  {'whole us':>9}  {'rest us':>8}  {'rest / gather':>13}  load")
        for batch in args.batch:
            work = batch_work(ds, root, batch, args.turns, args.cache, args.seed)
            print(
                f"  {batch:>5}  {work['gather']:>10.0f}  {work['whole']:>9.0f}  {work['rest']:>8.0f}  "
                f"{work['rest'] / work['gather']:>13.2f}  {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        if args.cache == "cold":
            touch(root, "warm")
        if args.skip_loaders:
            return 0
        workers_state = "cold workers" if args.cold_workers else "workers read every row first"
        print(
            f"\nsamples/s through loaders (warm page cache, {workers_state}, persistent workers, "
            f"pin_memory={args.pin_memory}, turns of {args.turn} s, {args.seconds} s each); CPU us per batch "
            "of all processes and of the training process; 'idle' = the ratio CPU time allows on idle cores"
        )
        print(
            f"  {'':>10}  {'loader':<28} {'samples/s':>11}  {'x w=0':>6}  {'CPU all':>8}  {'CPU main':>8}  {'idle':>8}"
        )
        for batch in args.batch:
            loaders = make_loaders(
                ds, batch, args.workers, args.pin_memory, args.seed, args.loaders, not args.cold_workers
            )
            load_before = os.getloadavg()[0]
            rates = loader_rates(loaders, args.seconds, args.turn)
            base, base_cpu, _ = rates.get("num_workers=0", (0.0, 0.0, 0.0))
            for name, (rate, cpu_us, main_us) in rates.items():
                ratio = f"{rate / base:.2f}x" if base else ""
                # on idle cores: the processes' CPU spread over the cores, or the training process alone
                ideal = cpu_us / min(args.workers + 1, os.cpu_count() or 1) if name != "num_workers=0" else cpu_us
                bound = f"{base_cpu / max(ideal, main_us):.2f}x" if base_cpu else ""
                print(
                    f"  batch {batch:>4}  {name:<28} {rate:>11,.0f}  {ratio:>6}  {cpu_us:>8,.0f}  {main_us:>8,.0f}"
                    f"  {bound:>8}"
                )
            print(f"             load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after", flush=True)
            del loaders
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
