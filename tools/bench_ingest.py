"""Benchmark: ingest a synthetic legacy VL cache vs. a plain ``torch.load(weights_only=True)`` loop.

Builds ``--files`` files of ``[1, 2048]`` bfloat16 named ``{dataset}_vlm{vlm_idx}.pt``
(with ``torch.save``, as users made them), then, in this one process and on
the same warm files:

1. baseline: a single-process ``torch.load(weights_only=True)`` loop over every file;
2. the safe reader alone (``vlastore.ingest.read_pt``), single process, for reference;
3. ``vlastore ingest pt-cache`` end to end (scan, plan, parallel write; ``--workers``);
4. the same with ``--full-scan`` (every file read and checked before writing).

and prints files/s and the ratio to the baseline. Example::

    python tools/bench_ingest.py --files 100000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS_PER_EPISODE = 100


def _make(args: tuple[str, int, int]) -> None:
    import torch

    folder, start, stop = args
    gen = torch.Generator().manual_seed(start)
    for i in range(start, stop):
        episode, vlm_idx = divmod(i, ROWS_PER_EPISODE)
        name = f"episode_202510{episode // 1000:02d}_{episode % 1000:06d}"
        torch.save(torch.randn(1, 2048, generator=gen).to(torch.bfloat16), f"{folder}/{name}_vlm{vlm_idx}.pt")


def build_cache(folder: Path, files: int, workers: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = 2000
    jobs = [(str(folder), s, min(s + step, files)) for s in range(0, files, step)]
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_make, jobs):
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000, help="cache files to build (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="ingest workers (default: one per core)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    import torch

    from vlastore.ingest import IngestOptions, ingest_pt_cache, read_pt
    from vlastore.ingest.scan import list_pt_files

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_ingest_"))
    cache, store = work / "cache", work / "store.vla"
    shutil.rmtree(store, ignore_errors=True)
    try:
        if not cache.exists() or len(os.listdir(cache)) != args.files:
            shutil.rmtree(cache, ignore_errors=True)
            t = time.perf_counter()
            build_cache(cache, args.files, os.cpu_count() or 1)
            print(f"built {args.files:,} files in {time.perf_counter() - t:.1f} s under {cache}")
        paths = list_pt_files(cache).paths
        n = len(paths)
        for path in paths:  # warm the page cache for every contender alike
            with open(path, "rb") as f:
                f.read()

        t = time.perf_counter()
        for path in paths:
            torch.load(path, weights_only=True)
        baseline = n / (time.perf_counter() - t)

        t = time.perf_counter()
        for path in paths:
            read_pt(path)
        reader = n / (time.perf_counter() - t)

        t = time.perf_counter()
        report = ingest_pt_cache(cache, IngestOptions(out=str(store), workers=args.workers, progress=False))
        ingest = n / (time.perf_counter() - t)
        assert report.files_ingested == n and not report.problems, report.format()
        shutil.rmtree(store)

        t = time.perf_counter()
        full = ingest_pt_cache(cache, IngestOptions(out=str(store), workers=args.workers, progress=False,
                                                    full_scan=True))
        ingest_full = n / (time.perf_counter() - t)
        assert full.files_ingested == n and not full.problems, full.format()

        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
              f"ingest workers: {args.workers or os.cpu_count()}")
        print(f"{'contender':58s} {'files/s':>10s} {'vs baseline':>12s}")
        rows = [
            ("torch.load(weights_only=True) loop, 1 process (baseline)", baseline),
            ("vlastore safe .pt reader loop, 1 process", reader),
            ("vlastore ingest pt-cache end to end (default: fast scan)", ingest),
            ("vlastore ingest pt-cache --full-scan (every file read twice)", ingest_full),
        ]
        for name, rate in rows:
            print(f"{name:58s} {rate:>10,.0f} {rate / baseline:>11.2f}x")
        print(f"source: {report.files_found:,} files, {report.source_bytes / 2**20:,.1f} MiB; store: "
              f"{report.store_after['files']:,} files, {report.store_after['bytes'] / 2**20:,.1f} MiB")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
