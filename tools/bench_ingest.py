"""Benchmark: ingest a synthetic legacy VL cache vs. a plain ``torch.load(weights_only=True)`` loop.

Builds ``--files`` files of ``[1, 2048]`` bfloat16 named ``{dataset}_vlm{vlm_idx}.pt``
(with ``torch.save``, as users made them; 100 files per dataset), and for each size
of ``--sizes`` a folder of hard links to the first files (no more data on disk). Then:

1. pre-touches every file of every folder (a warm page cache, on purpose: the figures
   are those of CPU and system calls, not of the disk; drop the caches yourself to
   measure cold reads);
2. times, on an even sample of ``--sample`` files of the biggest folder: a
   single-process ``torch.load(weights_only=True)`` loop (the baseline) and the safe
   reader alone (``vlastore.ingest.read_pt``), single process;
3. runs ``vlastore ingest pt-cache`` end to end (scan, plan, parallel write; ``--workers``)
   on each folder, each run in a fresh process, by default, with ``--verify`` and (with
   ``--full-scan``) with ``--full-scan``, and reports files/s, the ratio to the baseline
   and the peak RSS of the command's process and of its largest worker.

Ratios are what to compare: the machine is shared and absolute figures move. Example::

    python tools/bench_ingest.py --files 1000000 --sizes 100000,1000000 --dir /tmp/bench_ingest --keep
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS_PER_EPISODE = 100


def file_name(i: int) -> str:
    episode, vlm_idx = divmod(i, ROWS_PER_EPISODE)
    return f"episode_202510{episode // 1000:02d}_{episode % 1000:06d}_vlm{vlm_idx}.pt"


def _make(args: tuple[str, int, int]) -> None:
    import torch

    folder, start, stop = args
    gen = torch.Generator().manual_seed(start)
    for i in range(start, stop):
        torch.save(torch.randn(1, 2048, generator=gen).to(torch.bfloat16), f"{folder}/{file_name(i)}")


def build_cache(folder: Path, files: int, workers: int) -> None:
    """``files`` files made by ``torch.save`` (those already there are kept: a killed build resumes)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = set(os.listdir(folder))
    step = 2000
    jobs = [
        (str(folder), s, min(s + step, files))
        for s in range(0, files, step)
        if not all(file_name(i) in have for i in range(s, min(s + step, files)))
    ]
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_make, jobs):
            pass


def link_subset(cache: Path, folder: Path, files: int) -> None:
    """A folder of hard links to the first ``files`` files of ``cache``."""
    if folder.exists() and len(os.listdir(folder)) == files:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(files):
        os.link(cache / file_name(i), folder / file_name(i))


def warm(folder: Path) -> int:
    """Read every file of ``folder`` once; returns their bytes."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            with open(entry.path, "rb") as f:
                total += len(f.read())
    return total


def peak_rss() -> int:
    """Peak RSS of this process since its ``exec`` (``ru_maxrss`` keeps the peak of the process that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its worker processes that ended."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, workers.ru_utime + workers.ru_stime


def child(args: argparse.Namespace) -> int:
    """One ingest run in this fresh process: prints seconds and peak RSS as JSON."""
    from vlastore.ingest import IngestOptions, ingest_pt_cache

    options = IngestOptions(
        out=args.out, workers=args.workers, progress=False, verify=args.verify, full_scan=args.full_scan
    )
    before = _cpu()
    t = time.perf_counter()
    report = ingest_pt_cache(args.child, options)
    seconds = time.perf_counter() - t
    after = _cpu()
    ok = (
        report.files_ingested == report.files_found
        and not report.problems
        and (not args.verify or bool(report.verify and report.verify["ok"]))
    )
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": after[0] + after[1] - before[0] - before[1],
                "cpu_parent": after[0] - before[0],
                "files": report.files_ingested,
                "ok": ok,
                "rss_parent": peak_rss(),
                "rss_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                "source_bytes": report.source_bytes,
                "store_bytes": report.store_after["bytes"],
                "store_files": report.store_after["files"],
            }
        )
    )
    return 0 if ok else 1


def ingest_once(folder: Path, store: Path, workers: int, *flags: str) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", str(folder), "--out", str(store), "--workers", str(workers), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"ingest {' '.join(flags)} of {folder} failed:\n{done.stdout}{done.stderr}")
    shutil.rmtree(store, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000, help="cache files to build (default: %(default)s)")
    parser.add_argument("--sizes", default="", help="comma-separated folder sizes to ingest (default: --files)")
    parser.add_argument("--sample", type=int, default=20000, help="files timed in the single-process loops")
    parser.add_argument("--workers", type=int, default=0, help="ingest workers (default: one per core)")
    parser.add_argument("--full-scan", action="store_true", help="also time --full-scan (every file read twice)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from vlastore.ingest import read_pt
    from vlastore.ingest.options import cpu_cores

    sizes = sorted({int(s) for s in args.sizes.split(",") if s} or {args.files})
    if sizes[-1] > args.files:
        parser.error(f"--sizes {sizes[-1]} is more than --files {args.files}")
    workers = args.workers or cpu_cores()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_ingest_"))
    cache = work / "cache"
    try:
        if not cache.exists() or len(os.listdir(cache)) != args.files:
            t = time.perf_counter()
            build_cache(cache, args.files, cpu_cores())
            print(f"built {args.files:,} files in {time.perf_counter() - t:.1f} s under {cache}")
        folders = {n: cache if n == args.files else work / f"cache_{n}" for n in sizes}
        for n, folder in folders.items():
            link_subset(cache, folder, n)
        t = time.perf_counter()
        nbytes = sum(warm(folder) for folder in {*folders.values()})
        print(f"pre-touched {nbytes / 2**20:,.0f} MiB in {time.perf_counter() - t:.1f} s: warm page cache")

        biggest = folders[sizes[-1]]
        count = min(args.sample, sizes[-1])
        sample = [str(biggest / file_name(i * sizes[-1] // count)) for i in range(count)]
        t = time.perf_counter()
        for path in sample:
            torch.load(path, weights_only=True)
        baseline = count / (time.perf_counter() - t)
        t = time.perf_counter()
        for path in sample:
            read_pt(path)
        reader = count / (time.perf_counter() - t)

        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; ingest workers: {workers}")
        print(
            f"{'contender':50s} {'files':>9s} {'s':>6s} {'files/s':>8s} {'vs base':>8s} {'CPU s':>6s} "
            f"{'files/CPU-s':>11s} {'RSS parent':>10s} {'worker':>8s}"
        )
        print(
            f"{'torch.load(weights_only=True) loop, 1 process (base)':50s} {count:>9,} "
            f"{count / baseline:>6.1f} {baseline:>8,.0f} {1:>7.2f}x"
        )
        print(
            f"{'vlastore safe .pt reader loop, 1 process':50s} {count:>9,} {count / reader:>6.1f} {reader:>8,.0f} "
            f"{reader / baseline:>7.2f}x"
        )
        contenders = [("ingest pt-cache (fast scan)", ()), ("ingest pt-cache --verify", ("--verify",))]
        if args.full_scan:
            contenders.append(("ingest pt-cache --full-scan", ("--full-scan",)))
        last: dict = {}
        for n, folder in folders.items():
            for name, flags in contenders:
                r = last = ingest_once(folder, work / "store.vla", workers, *flags)
                rate = n / r["seconds"]
                worker = f"{r['rss_worker'] / 2**20:,.0f} MiB" if r["rss_worker"] else "-"  # written in-process
                print(
                    f"{name + f', {workers} workers':50s} {n:>9,} {r['seconds']:>6.1f} {rate:>8,.0f} "
                    f"{rate / baseline:>7.2f}x {r['cpu']:>6.1f} {n / r['cpu']:>11,.0f} "
                    f"{r['rss_parent'] / 2**20:>6,.0f} MiB {worker:>8s}",
                    flush=True,
                )
        print(
            f"last source: {last['source_bytes'] / 2**20:,.1f} MiB; its store: {last['store_files']:,} files, "
            f"{last['store_bytes'] / 2**20:,.1f} MiB"
        )
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
