"""Read benchmark: vlastore against the ways teams store precomputed features today.

Builds its own data in a temporary folder (or --workdir), then prints, in one run:

1. first reads: a fresh ``np.memmap`` and a fresh ``FeatureReader`` per mode read every
   row once in random batches (a DataLoader worker's first epoch: nothing mapped,
   nothing checked), page cache warm (the files read just before);
2. random feature reads in the steady state (page cache warm, every contender's pages
   pre-touched and, for ``verify="once"``, every row checked): one ``.pt`` per
   item (``torch.load(weights_only=True)``), ``np.memmap`` of one packed ``.npy``,
   LMDB, zarr-python ``oindex`` on the sharded array, and vlastore
   (``FeatureReader.gather``) with each checksum mode;
3. first reads with the page cache dropped (``posix_fadvise(DONTNEED)`` on every file
   before each contender's turn): ``--cold-rows`` random rows each;
4. training samples/s through ``DataLoader(num_workers=2)``: a legacy Dataset
   that ``torch.load``s the ``.pt`` and ``np.load``s the episode's ``.npz`` per
   sample, against ``VLADataset`` (through ``ds.dataloader()``, a
   ``VLADataLoader``, and through torch's ``DataLoader``), with ratios to
   ``VLADataset`` in one process (``num_workers=0``);
5. variable-length rows ``[L, dim]`` (L from 64 to 320): read MB/s against
   ``np.memmap`` of the same bytes.

Every figure is also printed as a ratio to the baselines of the same run.

    python tools/bench_read.py                 # 100,000 rows of 2048 bf16 (~2-3 min on 2 cores)
    python tools/bench_read.py --rows 20000    # quicker
    python tools/bench_read.py --reads-only    # 1-3 only, against np.memmap (no .pt files to build)
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlastore.dataset import VLADataset  # noqa: E402
from vlastore.format import FamilySpec, Producer  # noqa: E402
from vlastore.reader import FeatureReader  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402
from vlastore.windows import action_deltas, obs_deltas  # noqa: E402

N_OBS, HORIZON = 2, 8


# ------------------------------------------------------------------ building


def build(root: Path, rows: int, dim: int, reuse: int, rows_per_episode: int, seed: int, legacy: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    n_episodes = -(-rows // rows_per_episode)
    items = np.full(n_episodes, rows_per_episode, dtype=np.int64)
    items[-1] = rows - rows_per_episode * (n_episodes - 1)
    steps = items * reuse
    names = [f"episode_{i:06d}" for i in range(n_episodes)]
    t0 = time.perf_counter()
    values = np.empty((rows, dim), dtype=np.uint16)
    for lo in range(0, rows, 8192):  # random normal features as bfloat16 bits
        block = torch.from_numpy(rng.standard_normal((min(8192, rows - lo), dim), dtype=np.float32))
        values[lo : lo + len(block)] = block.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    episodes = []
    for name, n in zip(names, steps.tolist(), strict=True):
        state = rng.standard_normal((n, 7)).astype(np.float32)
        episodes.append(EpisodeData(name, {"state": state, "action": rng.standard_normal((n, 7)).astype(np.float32)}))

    np.save(root / "packed.npy", values)
    if legacy:
        build_legacy(root, names, items, values, episodes)
    store = VLAStore.create(root / "store.vla", episodes)
    store.add_family(
        "qwen_vl",
        FamilySpec((dim,), "bfloat16", vlm_reuse_count=reuse),
        items,
        producer=Producer("bench/random", fingerprint="bench000"),
    )
    with store.writer("qwen_vl") as writer:
        for lo in range(0, rows, 16384):
            hi = min(rows, lo + 16384)
            writer.write_rows(np.arange(lo, hi), values[lo:hi])
    build_s = time.perf_counter() - t0
    return {"names": names, "items": items, "steps": steps, "build_s": build_s, "values": values}


def build_legacy(root: Path, names: list[str], items: np.ndarray, values: np.ndarray, episodes: list) -> None:
    """One ``.pt`` per item and one ``.npz`` per episode (today's cache), and an LMDB of the rows."""
    rows = len(values)
    legacy = root / "legacy"
    legacy.mkdir()
    row = 0
    for e, name in enumerate(tqdm(names, desc="legacy .pt + .npz", unit="episode")):
        np.savez(legacy / f"{name}.npz", state=episodes[e].series["state"], action=episodes[e].series["action"])
        for vlm_idx in range(int(items[e])):
            tensor = torch.from_numpy(values[row]).view(torch.bfloat16).clone()
            torch.save(tensor, legacy / f"{name}_vlm{vlm_idx}.pt")
            row += 1

    import lmdb

    env = lmdb.open(str(root / "lmdb"), map_size=values.nbytes * 2 + (1 << 30), writemap=True)
    with env.begin(write=True) as txn:
        for r in tqdm(range(rows), desc="lmdb", unit="row", miniters=10000):
            txn.put(r.to_bytes(8, "big"), values[r].tobytes())
    env.close()


# ------------------------------------------------------------ random reads


def interleaved(
    contenders: dict, batches: list[np.ndarray], seconds: float, size=len, slice_seconds: float = 0.1
) -> dict[str, float]:
    """Rate of each contender, contenders taking turns in slices of ``slice_seconds``.

    These machines are shared and their speed drifts within seconds: short turns give every
    contender the same mix of quiet and busy moments. Each turn reads other batches, so no
    contender finds rows left in the CPU caches by the one before.
    """
    for fn in contenders.values():
        fn(batches[0])  # warm: open files, parse indexes
    done = {name: 0 for name in contenders}
    spent = {name: 0.0 for name in contenders}
    cursor = 1
    t_end = time.perf_counter() + seconds * len(contenders)
    while time.perf_counter() < t_end or min(done.values()) == 0:
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            while True:
                batch = batches[cursor % len(batches)]
                cursor += 1
                fn(batch)
                done[name] += size(batch)
                if time.perf_counter() - t0 > slice_seconds:
                    break
            spent[name] += time.perf_counter() - t0
    return {name: done[name] / spent[name] for name in contenders}


def touch_file(path: Path) -> None:
    """Bring a file into the page cache (read it once)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def drop_file(path: Path) -> None:
    """Evict a file's clean pages from the page cache (no root needed; pages mapped somewhere stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touch_map(array: np.ndarray) -> None:
    """Fault in every page of a mapped array (one byte read per 2 KiB)."""
    flat = array.reshape(-1).view(np.uint8)
    int(flat[::2048].sum())


def store_files(root: Path) -> list[Path]:
    return [p for p in (root / "store.vla").rglob("*") if p.is_file()]


def random_reads(root: Path, data: dict, batch: int, seconds: float, seed: int, legacy: bool) -> dict[str, float]:
    """Steady state: page cache warm and every contender's pages pre-touched (its map faulted in, its rows
    read once), so no contender pays a page fault or a first check during the timing."""
    rows = len(data["values"])
    rng = np.random.default_rng(seed + 1)
    batches = [rng.integers(0, rows, size=batch) for _ in range(int(seconds * 400_000 / batch) + 10)]
    for path in [root / "packed.npy", *store_files(root)]:
        touch_file(path)
    contenders = {}
    if legacy:
        paths = []
        for name, n in zip(data["names"], data["items"].tolist(), strict=True):
            paths.extend(str(root / "legacy" / f"{name}_vlm{i}.pt") for i in range(n))
        contenders["torch.load per file"] = lambda b: torch.stack(
            [torch.load(paths[r], weights_only=True) for r in b.tolist()]
        )
    packed = np.load(root / "packed.npy", mmap_mode="r")
    touch_map(packed)
    contenders["np.memmap packed .npy"] = lambda b: torch.from_numpy(packed[b]).view(torch.bfloat16)

    env = None
    if legacy:
        import lmdb
        import zarr

        env = lmdb.open(str(root / "lmdb"), readonly=True, lock=False)
        txn = env.begin()
        contenders["LMDB"] = lambda b: torch.from_numpy(
            np.stack([np.frombuffer(txn.get(r.to_bytes(8, "big")), np.uint16) for r in b.tolist()])
        ).view(torch.bfloat16)
    store = VLAStore.open(root / "store.vla")
    if legacy:
        array = zarr.open_array(str(root / "store.vla" / store.values_path("qwen_vl")), mode="r")
        # zarr-python's oindex wants sorted indices; the cost of sorting is negligible next to it
        contenders["zarr-python oindex"] = lambda b: torch.from_numpy(array.oindex[np.sort(b)]).view(torch.bfloat16)
    for mode, label in (("never", "never"), ("once", "once, rows read before (2nd epoch)"), ("always", "always")):
        reader = FeatureReader(store, "qwen_vl", verify=mode)
        for lo in range(0, rows, 4096):  # pages faulted in (and, for "once", every row checked)
            reader.gather(np.arange(lo, min(rows, lo + 4096)))
        contenders[f"vlastore verify={label}"] = lambda b, reader=reader: torch.from_numpy(reader.gather(b)).view(
            torch.bfloat16
        )
    results = interleaved(contenders, batches, seconds)
    if env is not None:
        env.close()
    # correctness of what was timed: vlastore returns the bytes written
    check = batches[0]
    assert np.array_equal(FeatureReader(store, "qwen_vl", verify="always").gather(check), data["values"][check])
    return results


def first_reads(root: Path, data: dict, batch: int, epochs: int, seed: int, cold_rows: int) -> dict[str, dict]:
    """First reads: every contender opens afresh (a new ``np.memmap``, a new ``FeatureReader``: no page of it
    mapped, no row checked) and reads each row once, in random batches (a DataLoader worker's first epoch).

    ``warm``: the files are in the page cache (read just before). ``cold``: the files' pages are dropped
    from the page cache before every contender's turn (``posix_fadvise(DONTNEED)``), and ``cold_rows``
    random rows are read. Contenders take turns, epoch by epoch; the best epoch of each is kept.
    """
    rows = len(data["values"])
    rng = np.random.default_rng(seed + 3)
    store = VLAStore.open(root / "store.vla")
    files = [root / "packed.npy", *store_files(root)]

    def memmap_epoch(order: list[np.ndarray]) -> None:
        packed = np.load(root / "packed.npy", mmap_mode="r")
        for b in order:
            torch.from_numpy(packed[b]).view(torch.bfloat16)

    def vlastore_epoch(order: list[np.ndarray], mode: str) -> None:
        reader = FeatureReader(store, "qwen_vl", verify=mode)
        for b in order:
            torch.from_numpy(reader.gather(b)).view(torch.bfloat16)

    contenders = {"np.memmap packed .npy": memmap_epoch}
    for mode, label in (("never", "never"), ("once", "once (default)"), ("always", "always")):
        contenders[f"vlastore verify={label}"] = lambda order, mode=mode: vlastore_epoch(order, mode)
    out: dict[str, dict] = {}
    for kind, n_rows, n_epochs in (("warm", rows, epochs), ("cold", min(cold_rows, rows), 1)):
        if n_rows == 0:
            continue
        best = {name: 0.0 for name in contenders}
        for epoch in range(n_epochs):
            perm = rng.permutation(rows)[:n_rows]
            order = [perm[lo : lo + batch] for lo in range(0, n_rows, batch)]
            names = list(contenders) if epoch % 2 == 0 else list(contenders)[::-1]
            for name in names:
                gc.collect()  # the previous contender's maps are gone, so dropped pages really go
                if kind == "cold":
                    os.sync()
                    for path in files:
                        drop_file(path)
                else:
                    for path in files:
                        touch_file(path)
                t0 = time.perf_counter()
                contenders[name](order)
                best[name] = max(best[name], n_rows / (time.perf_counter() - t0))
        out[kind] = best
    return out


# ------------------------------------------------------------- DataLoader


class LegacyDataset(torch.utils.data.Dataset):
    """Today's loader: one torch.load and one np.load per sample."""

    def __init__(self, root: Path, names: list[str], steps: np.ndarray, reuse: int) -> None:
        self.root, self.names, self.reuse = root, names, reuse
        self.episode = np.repeat(np.arange(len(names)), steps)
        self.step = np.concatenate([np.arange(n) for n in steps])

    def __len__(self) -> int:
        return len(self.episode)

    def __getitem__(self, i: int) -> dict:
        e, t = int(self.episode[i]), int(self.step[i])
        name = self.names[e]
        feature = torch.load(self.root / f"{name}_vlm{t // self.reuse}.pt", weights_only=True)
        with np.load(self.root / f"{name}.npz") as npz:
            state, action = npz["state"], npz["action"]
        n = len(state)
        obs_t = np.clip(t + obs_deltas(N_OBS), 0, n - 1)
        act_t = t + action_deltas(HORIZON)
        return {
            "qwen_vl": feature,
            "state": torch.from_numpy(state[obs_t]),
            "state_is_pad": torch.from_numpy(t + obs_deltas(N_OBS) < 0),
            "action": torch.from_numpy(action[np.clip(act_t, 0, n - 1)]),
            "action_is_pad": torch.from_numpy(act_t >= n),
            "episode": name,
            "step": t,
        }


def loader_rates(loaders: dict, seconds: float, rounds: int = 4) -> dict[str, float]:
    """Samples/s of each loader, loaders taking turns (``rounds`` turns each, ``seconds`` in all).

    Worker start-up is left out (a few batches are read first). A paused loader's workers
    prefetch a few batches, which flatters the slower loader a little: the ratios are conservative.
    """
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for it in iterators.values():
        for _ in range(4):
            next(it)
    done = {name: 0 for name in loaders}
    spent = {name: 0.0 for name in loaders}
    for _ in range(rounds):
        for name, it in iterators.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / rounds:
                done[name] += len(next(it)["step"])
            spent[name] += time.perf_counter() - t0
    return {name: done[name] / spent[name] for name in loaders}


def dataloader_bench(root: Path, data: dict, reuse: int, batch: int, seconds: float) -> dict[str, float]:
    legacy = LegacyDataset(root / "legacy", data["names"], data["steps"], reuse)
    ds = VLADataset(root / "store.vla", features=["qwen_vl"], n_obs_steps=N_OBS, horizon=HORIZON)

    def sampler(dataset: torch.utils.data.Dataset) -> torch.utils.data.Sampler:
        return torch.utils.data.RandomSampler(
            dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0)
        )

    loaders = {
        "legacy .pt + .npz": torch.utils.data.DataLoader(
            legacy, batch_size=batch, sampler=sampler(legacy), num_workers=2
        ),
        # ds.dataloader() is a VLADataLoader (vlastore/loader.py); torch_loader=True: torch's own
        "VLADataset": ds.dataloader(batch_size=batch, sampler=sampler(ds), num_workers=2),
        "VLADataset, torch's DataLoader": ds.dataloader(
            batch_size=batch, sampler=sampler(ds), num_workers=2, torch_loader=True
        ),
        "VLADataset, num_workers=0": ds.dataloader(batch_size=batch, sampler=sampler(ds)),
    }
    return loader_rates(loaders, seconds)


# ------------------------------------------------------------------ ragged


def ragged_bench(root: Path, n_rows: int, dim: int, seconds: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed + 2)
    lengths = rng.integers(64, 321, size=n_rows)
    total = int(lengths.sum())
    values = rng.integers(0, 0x7F00, size=(total, dim), dtype=np.uint16)  # finite bfloat16 bits
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    np.save(root / "ragged.npy", values)
    store = VLAStore.create(root / "ragged.vla", [EpisodeData("episode_0", steps=n_rows)])
    store.add_family(
        "tokens", FamilySpec((dim,), "bfloat16", ragged=True, vlm_reuse_count=1), [n_rows], lengths=lengths
    )
    with store.writer("tokens") as writer:
        for r in range(n_rows):
            writer.write_rows([r], [values[offsets[r] : offsets[r + 1]]])
    del values
    packed = np.load(root / "ragged.npy", mmap_mode="r")
    batches = [rng.integers(0, n_rows, size=8) for _ in range(2000)]
    row_bytes = dim * 2
    contenders = {}
    # both sides hand out each row as one contiguous tensor (what a model's forward consumes)
    contenders["np.memmap ragged"] = lambda b: [
        torch.from_numpy(np.array(packed[offsets[r] : offsets[r + 1]])) for r in b.tolist()
    ]
    for mode in ("never", "once", "always"):
        reader = FeatureReader(store, "tokens", verify=mode)
        contenders[f"vlastore verify={mode}"] = lambda b, reader=reader: [
            torch.from_numpy(np.ascontiguousarray(v)) for v in reader.rows(b)
        ]
    warm = FeatureReader(store, "tokens", verify="once")
    warm.rows(np.arange(n_rows))
    contenders["vlastore verify=once, 2nd epoch"] = lambda b: [
        torch.from_numpy(np.ascontiguousarray(v)) for v in warm.rows(b)
    ]
    padded = FeatureReader(store, "tokens", verify="once")
    contenders["vlastore padded batch (once)"] = lambda b: torch.from_numpy(padded.gather_padded(b)[0])
    mb = interleaved(contenders, batches, seconds, size=lambda b: int(lengths[b].sum()) * row_bytes)
    results = {k: v / 1e6 for k, v in mb.items()}
    check = batches[0]
    got = FeatureReader(store, "tokens", verify="always").rows(check)
    for value, r in zip(got, check.tolist(), strict=True):
        assert np.array_equal(value, packed[offsets[r] : offsets[r + 1]])
    return results


# ------------------------------------------------------------------ report


def show(title: str, results: dict[str, float], unit: str, baselines: list[str]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in results)
    print(f"  {'':{width}}  {unit:>12}  " + "  ".join(f"{'x ' + b:>22}" for b in baselines))
    for name, value in results.items():
        ratios = "  ".join(f"{value / results[b]:>22.2f}" for b in baselines)
        print(f"  {name:{width}}  {value:>12,.0f}  {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="feature rows (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=2048, help="bfloat16 values per row (default: %(default)s)")
    parser.add_argument("--reuse", type=int, default=3, help="vlm_reuse_count (default: %(default)s)")
    parser.add_argument("--rows-per-episode", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per contender (default: %(default)s)")
    parser.add_argument(
        "--ragged-rows",
        type=int,
        default=600,
        help="variable-length rows [L, dim], L in 64..320 (default: %(default)s, ~460 MB)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="first-read epochs per contender, page cache warm; best kept (default: %(default)s)",
    )
    parser.add_argument(
        "--cold-rows",
        type=int,
        default=20_000,
        help="rows read once with the page cache dropped, per contender (0: skip; default: %(default)s)",
    )
    parser.add_argument(
        "--reads-only",
        action="store_true",
        help="only the feature reads against np.memmap: no .pt files, LMDB, zarr, DataLoader or "
        "variable-length rows (builds in seconds)",
    )
    parser.add_argument("--workdir", help="build here (kept) instead of a temporary folder (removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    legacy = not args.reads_only

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlastore-bench-"))
    if args.workdir:
        if root.exists() and any(root.iterdir()):
            parser.error(f"--workdir {root} is not empty; give a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building {args.rows:,} rows of {args.dim} bfloat16 in {root} ...", flush=True)
        data = build(root, args.rows, args.dim, args.reuse, args.rows_per_episode, args.seed, legacy)
        extra = ""
        if legacy:
            pt_bytes = sum(f.stat().st_size for f in (root / "legacy").iterdir() if f.suffix == ".pt")
            extra = f", {pt_bytes / 1e6:,.0f} MB of .pt files"
        print(
            f"built in {data['build_s']:.0f} s ({len(data['names']):,} episodes{extra} for "
            f"{data['values'].nbytes / 1e6:,.0f} MB of payload)"
        )
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")

        first = first_reads(root, data, args.batch, args.epochs, args.seed, args.cold_rows)
        show(
            f"first reads, batch {args.batch}: a fresh map / reader reads every row once, page cache warm "
            f"(best of {args.epochs} epochs)",
            first["warm"],
            "items/s",
            ["np.memmap packed .npy"],
        )
        reads = random_reads(root, data, args.batch, args.seconds, args.seed, legacy)
        show(
            f"random feature reads, batch {args.batch}, one process, page cache warm and pages pre-touched "
            "(steady state)",
            reads,
            "items/s",
            ["torch.load per file", "np.memmap packed .npy", "LMDB"] if legacy else ["np.memmap packed .npy"],
        )
        if "cold" in first:
            show(
                f"first reads, batch {args.batch}, page cache dropped before each contender "
                f"({min(args.cold_rows, args.rows):,} random rows)",
                first["cold"],
                "items/s",
                ["np.memmap packed .npy"],
            )
        if legacy:
            loaders = dataloader_bench(root, data, args.reuse, args.batch, args.seconds * 2)
            show(
                f"training samples through DataLoader(num_workers=2, batch_size={args.batch}), feature + "
                f"state x{N_OBS} + action x{HORIZON} (tools/bench_loader.py: the loaders alone, in detail)",
                loaders,
                "samples/s",
                ["legacy .pt + .npz", "VLADataset, num_workers=0"],
            )
            del data
            ragged = ragged_bench(root, args.ragged_rows, args.dim, args.seconds, args.seed)
            show(
                "variable-length rows [L, dim], L in 64..320, batches of 8 rows, each row as a contiguous tensor",
                ragged,
                "MB/s",
                ["np.memmap ragged"],
            )
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
