"""Write benchmark: vlastore's parallel-region writer against np.save of the same bytes.

    python tools/bench_write.py [--rows 100000] [--dim 2048] [--batch 1024] [--repeat 3]

Builds ``rows`` random bfloat16 rows in memory (finite values), then, in one
process and on the same disk, alternately:

* ``np.save``: the whole ``[rows, dim]`` uint16 array to one ``.npy`` file (the
  fastest way to put those bytes in a file; no checksums, no index);
* ``vlastore``: ``FamilyWriter.write_rows`` fed torch bfloat16 batches of
  ``--batch`` rows, into a fresh store (NaN/Inf check, crc32c per row, shard
  index, atomic write-once shard files), with the default ``write_behind=True``
  (complete shards are checksummed and written by a background thread);
* ``vlastore-sync``: the same with ``write_behind=False`` (all in the caller's thread).

Prints the best time of each, throughput, the ratio vlastore / np.save, bytes
on disk against the raw payload, and rows per file. Targets (issue #2): bytes on
disk <= 1.05x payload, at most one file per 4,096 rows, throughput >= 50% of np.save.
Nothing is fsynced by either contender (page cache speed, like training jobs see);
``--fsync`` syncs both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlastore.format import FamilySpec  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402


def make_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Random bfloat16 bits with the exponent's top bit cleared: finite, |x| < 2."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 16, size=(rows, dim), dtype=np.uint16)
    bits &= 0xBFFF
    return bits


def bench_npsave(bits: np.ndarray, folder: Path, fsync: bool) -> float:
    path = folder / "rows.npy"
    start = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, bits)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def bench_floor(bits: np.ndarray) -> dict[str, float]:
    """Seconds of the work any writer of this format must add to np.save, measured alone.

    One crc32c call per stored row (the format checksums every inner chunk) and
    the NaN/Inf check of every value (the writer refuses them by default).
    """
    from crc32c import crc32c

    start = time.perf_counter()
    for lo in range(0, len(bits), 4096):
        np.fromiter(map(crc32c, bits[lo : lo + 4096]), dtype="<u4")
    crc = time.perf_counter() - start
    start = time.perf_counter()
    for lo in range(0, len(bits), 1024):
        batch = bits[lo : lo + 1024]
        _ = int(batch.max()) < 0xFF80 and int(batch.view(np.int16).max()) < 0x7F80
    return {"crc32c per row": crc, "NaN/Inf check": time.perf_counter() - start}


def plan_store(folder: Path, rows: int, dim: int, episode_rows: int = 500) -> VLAStore:
    """A store whose episodes hold ``episode_rows`` vlm rows each (3 steps per row)."""
    n_episodes = -(-rows // episode_rows)
    sizes = [episode_rows] * (n_episodes - 1) + [rows - episode_rows * (n_episodes - 1)]
    store = VLAStore.create(folder / "bench.vla", [EpisodeData(f"episode_{i:06d}", steps=3 * n)
                                                    for i, n in enumerate(sizes)])
    store.add_family("qwen_vl", FamilySpec((dim,), "bfloat16", vlm_reuse_count=3))
    return store


def bench_vlastore(bits: np.ndarray, folder: Path, batch: int, fsync: bool,
                   write_behind: bool = False) -> tuple[float, VLAStore]:
    import torch

    store = plan_store(folder, len(bits), bits.shape[1])
    os.sync()  # the plan's small files are not part of the timed write
    tensor = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)  # what an extractor hands over
    start = time.perf_counter()
    with store.writer("qwen_vl", rank=0, world_size=1, fsync=fsync, write_behind=write_behind) as writer:
        for lo in range(0, len(bits), batch):
            rows = np.arange(lo, min(lo + batch, len(bits)))
            writer.write_rows(rows, tensor[lo : lo + len(rows)])
    return time.perf_counter() - start, store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows to write (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=2048, help="bfloat16 values per row (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1024, help="rows per write_rows call (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; best is kept (default: 3)")
    parser.add_argument("--dir", default=None, help="folder to write in (default: a temporary folder)")
    parser.add_argument("--fsync", action="store_true", help="fsync every file (both contenders)")
    args = parser.parse_args()

    bits = make_rows(args.rows, args.dim)
    payload = bits.nbytes
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vlastore-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"{args.rows:,} rows of {args.dim} bfloat16 = {payload / 2**20:,.1f} MiB payload, in {base}")
    times: dict[str, list[float]] = {"np.save": [], "vlastore": [], "vlastore-sync": []}
    report = None
    try:
        for i in range(args.repeat):
            # each contender starts with no dirty pages (os.sync, untimed) and the order alternates,
            # so none pays for another's writeback
            for name in list(times) if i % 2 == 0 else list(times)[::-1]:
                os.sync()
                if name == "np.save":
                    times[name].append(bench_npsave(bits, base, args.fsync))
                    continue
                run = base / f"{name}-{i}"
                run.mkdir()
                elapsed, store = bench_vlastore(bits, run, args.batch, args.fsync, name == "vlastore")
                times[name].append(elapsed)
                if report is None:  # check the first store fully
                    report = _check(store, bits)
                shutil.rmtree(run)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    assert report is not None
    floor = {k: min(bench_floor(bits)[k] for _ in range(2)) for k in ("crc32c per row", "NaN/Inf check")}
    best = {k: min(v) for k, v in times.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\n{'contender':<12} {'best s':>7} {'median s':>9} {'MiB/s':>7}   all runs (s)")
    for name, t in best.items():
        runs = ", ".join(f"{x:.2f}" for x in times[name])
        print(f"{name:<12} {t:>7.2f} {median[name]:>9.2f} {payload / 2**20 / t:>7.0f}   {runs}")
    print("\nthroughput vlastore / np.save      "
          f"{best['np.save'] / best['vlastore']:.2f} best vs best, "
          f"{median['np.save'] / median['vlastore']:.2f} median vs median   (target >= 0.50)")
    print("  with write_behind=False          "
          f"{best['np.save'] / best['vlastore-sync']:.2f} best vs best, "
          f"{median['np.save'] / median['vlastore-sync']:.2f} median vs median")
    bound = best["np.save"] + sum(floor.values())
    print("  floor: " + ", ".join(f"{k} {v:.2f} s" for k, v in floor.items())
          + f"; np.save + these = {bound:.2f} s, so a writer of this format reaches at most "
          f"{best['np.save'] / bound:.2f} of np.save here")
    disk = report["store_bytes"] / payload
    max_shard_files = -(-args.rows // 4096)
    fixed_files = report["store_files"] - report["shard_files"]
    print(f"bytes on disk / payload (store)    {disk:.4f}   (target <= 1.05; {report['store_bytes']:,} bytes)")
    print(f"shard files                        {report['shard_files']}      (target <= ceil(rows / 4096) = "
          f"{max_shard_files}; plus {fixed_files} metadata files whatever the size)")


def _check(store: VLAStore, bits: np.ndarray) -> dict[str, int]:
    """Read the store back (coverage, a few rows) and count its files and bytes."""
    again = VLAStore.open(store.location)
    assert again.coverage("qwen_vl").all()
    for row in (0, len(bits) // 2, len(bits) - 1):
        assert np.array_equal(again.reader("qwen_vl").row(row), bits[row])
    files = [p for p in Path(store.location).rglob("*") if p.is_file()]
    return {
        "shard_files": sum(1 for p in files if "/values/c/" in str(p)),
        "store_bytes": sum(p.stat().st_size for p in files),
        "store_files": len(files),
    }

if __name__ == "__main__":
    main()
