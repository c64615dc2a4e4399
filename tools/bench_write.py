"""Write benchmark: vlastore's parallel-region writer against np.save of the same bytes.

    python tools/bench_write.py [--rows 262144] [--dim 2048] [--batch 1024] [--repeat 3] [--fsync both]

Builds ``rows`` random bfloat16 rows in memory (finite values; the default is 1 GiB),
then, in one process and on the same disk, alternately:

* ``np.save``: the whole ``[rows, dim]`` uint16 array to one ``.npy`` file (the
  fastest way to put those bytes in a file; no checksums, no index);
* ``vlastore``: ``FamilyWriter.write_rows`` fed torch bfloat16 batches of
  ``--batch`` rows, into a fresh store (NaN/Inf check, crc32c per row, shard
  index, atomic write-once shard files), with the default ``write_behind=True``
  (rows go straight into the shard's temporary file, one copy, with a background
  thread writing one block while the caller checksums the next; complete shards
  are linked into place, and fsynced with ``--fsync yes``, by background threads);
* ``vlastore-sync``: the same with ``write_behind=False`` (all in the caller's thread).

``--fsync no``: nothing is fsynced (page cache speed, until the kernel's dirty-page
limit makes a writer wait for the disk: with a few GiB that is the disk's speed);
``yes``: every file is fsynced before it counts as written, on both sides (np.save:
its file; vlastore: every shard file and folder, ``fsync=True``); ``both`` (the
default): each of the two in turn, in the same run. Before every timed write the
dirty pages of the one before are flushed (``os.sync``, untimed), so no contender
pays for another's writeback.

Prints, per setting, each contender's best and median time, throughput, and the
ratio vlastore / np.save of each round (contenders of one round run back to back,
so a round's ratio is measured under the same load), with their median. Then bytes
on disk against the raw payload and rows per file. Targets: bytes on disk <= 1.05x
payload, at most one file per 4,096 rows; throughput >= 0.8x np.save at 1 GiB and more.
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


def bench_npsave(bits: np.ndarray, folder: Path, fsync: bool) -> tuple[float, float]:
    path = folder / "rows.npy"
    cpu = time.process_time()
    start = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, bits)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    path.unlink()
    return elapsed, cpu


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
    store = VLAStore.create(
        folder / "bench.vla", [EpisodeData(f"episode_{i:06d}", steps=3 * n) for i, n in enumerate(sizes)]
    )
    store.add_family("qwen_vl", FamilySpec((dim,), "bfloat16", vlm_reuse_count=3))
    return store


def bench_vlastore(
    bits: np.ndarray, folder: Path, batch: int, fsync: bool, write_behind: bool = False
) -> tuple[float, float, VLAStore]:
    import torch

    store = plan_store(folder, len(bits), bits.shape[1])
    os.sync()  # the plan's small files are not part of the timed write
    tensor = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)  # what an extractor hands over
    cpu = time.process_time()  # this process's CPU time, the background thread's included
    start = time.perf_counter()
    with store.writer("qwen_vl", rank=0, world_size=1, fsync=fsync, write_behind=write_behind) as writer:
        for lo in range(0, len(bits), batch):
            rows = np.arange(lo, min(lo + batch, len(bits)))
            writer.write_rows(rows, tensor[lo : lo + len(rows)])
    return time.perf_counter() - start, time.process_time() - cpu, store


def run_setting(
    bits: np.ndarray, base: Path, batch: int, repeat: int, fsync: bool, report: dict[str, int] | None
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, int] | None]:
    """(wall s, CPU s) of every run of each contender."""
    times: dict[str, list[tuple[float, float]]] = {"np.save": [], "vlastore": [], "vlastore-sync": []}
    for i in range(repeat):
        # the order alternates, so none always runs after the same one
        for name in list(times) if i % 2 == 0 else list(times)[::-1]:
            os.sync()
            if name == "np.save":
                times[name].append(bench_npsave(bits, base, fsync))
                continue
            run = base / f"{name}-{i}"
            run.mkdir()
            elapsed, cpu, store = bench_vlastore(bits, run, batch, fsync, name == "vlastore")
            times[name].append((elapsed, cpu))
            if report is None:  # check the first store fully
                report = _check(store, bits)
            shutil.rmtree(run)
    return times, report


def show(times: dict[str, list[tuple[float, float]]], payload: int, fsync: bool) -> None:
    print(f"\nfsync {'on both sides' if fsync else 'on neither side'}")
    print(f"{'contender':<14} {'best s':>7} {'median s':>9} {'MiB/s':>7} {'CPU s':>6}   all runs (s)")
    for name, runs in times.items():
        wall = [w for w, _ in runs]
        print(
            f"{name:<14} {min(wall):>7.2f} {float(np.median(wall)):>9.2f} {payload / 2**20 / min(wall):>7.0f} "
            f"{float(np.median([c for _, c in runs])):>6.2f}   " + ", ".join(f"{x:.2f}" for x in wall)
        )
    save = times["np.save"]
    for name in ("vlastore", "vlastore-sync"):
        rounds = [a[0] / b[0] for a, b in zip(save, times[name], strict=True)]
        cpu = [a[1] / b[1] for a, b in zip(save, times[name], strict=True)]
        print(
            f"  {name} / np.save: "
            + ", ".join(f"{r:.2f}" for r in rounds)
            + f" per round; median {float(np.median(rounds)):.2f}, best vs best "
            f"{min(w for w, _ in save) / min(w for w, _ in times[name]):.2f}; CPU time (median) "
            f"{float(np.median(cpu)):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=262_144, help="rows to write (default: %(default)s, 1 GiB)")
    parser.add_argument("--dim", type=int, default=2048, help="bfloat16 values per row (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1024, help="rows per write_rows call (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each contender (default: 3)")
    parser.add_argument("--dir", default=None, help="folder to write in (default: a temporary folder)")
    parser.add_argument(
        "--fsync",
        choices=("no", "yes", "both"),
        default="both",
        help="fsync every file, on both sides (default: %(default)s: without, then with)",
    )
    args = parser.parse_args()

    bits = make_rows(args.rows, args.dim)
    payload = bits.nbytes
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vlastore-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"{args.rows:,} rows of {args.dim} bfloat16 = {payload / 2**20:,.1f} MiB payload, in {base}")
    settings = {"no": [False], "yes": [True], "both": [False, True]}[args.fsync]
    report = None
    results = {}
    try:
        for fsync in settings:
            results[fsync], report = run_setting(bits, base, args.batch, args.repeat, fsync, report)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    assert report is not None
    for fsync, times in results.items():
        show(times, payload, fsync)
    floor = {k: min(bench_floor(bits)[k] for _ in range(2)) for k in ("crc32c per row", "NaN/Inf check")}
    print(
        "\nwork a writer of this format adds to np.save, measured alone: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in floor.items())
    )
    disk = report["store_bytes"] / payload
    max_shard_files = -(-args.rows // 4096)
    fixed_files = report["store_files"] - report["shard_files"]
    print(f"bytes on disk / payload (store)    {disk:.4f}   (target <= 1.05; {report['store_bytes']:,} bytes)")
    print(
        f"shard files                        {report['shard_files']}      (target <= ceil(rows / 4096) = "
        f"{max_shard_files}; plus {fixed_files} metadata files whatever the size)"
    )


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
