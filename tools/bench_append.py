"""Living stores (format 2): what an append costs, and what many appends cost readers.

    python tools/bench_append.py [--rows 1000000] [--appends 1000] [--dir /tmp]

Part 1, one store of ``--rows`` feature rows (fixed float16 [16], one row per step)
and a ``state`` series: append 1% new episodes (commit + their rows written) against
building that 1% as a new store, and against rebuilding the whole store. Bytes are
the files created or grown.

Part 2, ``--appends`` commits of one episode each onto a small store, then open time
and first-batch latency (VLADataset + its first batch) against a store freshly written
with the same content. Figures are ratios within one run (machines differ).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlastore.dataset import VLADataset  # noqa: E402
from vlastore.format import FamilySpec  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402

SPEC = FamilySpec((16,), "float16", vlm_reuse_count=1, rows_per_shard=4096)
STEPS = 500


def _episodes(first: int, count: int, steps: int = STEPS) -> list[EpisodeData]:
    rng = np.random.default_rng(first)
    return [
        EpisodeData(
            f"ep_{first + i:07d}",
            {
                "state": rng.normal(size=(steps, 7)).astype(np.float32),
                "action": rng.normal(size=(steps, 2)).astype(np.float32),
            },
        )
        for i in range(count)
    ]


def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _written(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(size for path, size in after.items() if before.get(path) != size)


def _fill(store: VLAStore) -> None:
    writer = store.writer("f")
    rows = writer.pending_rows()
    for lo in range(0, len(rows), 65536):
        part = rows[lo : lo + 65536]
        writer.write_rows(part, np.broadcast_to((part % 1000).astype(np.float16)[:, None], (len(part), 16)))
    writer.close()


def _build(path: Path, eps: list[EpisodeData]) -> float:
    t = time.perf_counter()
    VLAStore.create(path, eps, format_version=2)
    store = VLAStore.open(path, writable=True)
    store.add_family("f", SPEC)
    _fill(store)
    return time.perf_counter() - t


def part1(base: Path, rows: int) -> None:
    n = rows // STEPS
    k = max(1, n // 100)
    eps = _episodes(0, n)
    new = _episodes(n, k)
    big = base / "big.vla"
    t_full = _build(big, eps + new)  # the whole store rebuilt (with the new 1%)
    shutil.rmtree(big)
    _build(big, eps)
    before = _files(big)
    t = time.perf_counter()
    store = VLAStore.open(big, writable=True)
    store.add_episodes(new)
    _fill(store)
    t_append = time.perf_counter() - t
    b_append = _written(before, _files(big))
    small = base / "small.vla"
    t_small = _build(small, new)
    b_small = sum(_files(small).values())
    b_full = sum(_files(big).values())
    print(f"part 1: store of {n * STEPS:,} rows ({n} episodes); append {k} episodes ({k * STEPS:,} rows, 1%)")
    print(f"  append into the store     {t_append:7.2f} s  {b_append / 1e6:8.2f} MB written")
    print(
        f"  the 1% as a new store     {t_small:7.2f} s  {b_small / 1e6:8.2f} MB   append/new: time "
        f"{t_append / t_small:.2f}x, bytes {b_append / b_small:.2f}x (goal <= 1.2x)"
    )
    print(
        f"  rebuild the whole store   {t_full:7.2f} s  {b_full / 1e6:8.2f} MB   append/rebuild: time "
        f"{t_append / t_full:.3f}x, bytes {b_append / b_full:.3f}x"
    )
    shutil.rmtree(big)
    shutil.rmtree(small)


def _open_and_batch(path: Path) -> tuple[float, float]:
    t = time.perf_counter()
    store = VLAStore.open(path)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    ds = VLADataset(store, features=["f"], n_obs_steps=2, horizon=4)
    ds.__getitems__(list(range(0, len(ds), max(1, len(ds) // 64)))[:64])
    return t_open, time.perf_counter() - t


def part2(base: Path, appends: int) -> None:
    first = _episodes(0, 100, steps=50)
    later = _episodes(100, appends, steps=50)
    grown = base / "grown.vla"
    VLAStore.create(grown, first, format_version=2)
    store = VLAStore.open(grown, writable=True)
    store.add_family("f", SPEC)
    _fill(store)
    t = time.perf_counter()
    for e in later:
        store.add_episodes([e])
    t_commits = time.perf_counter() - t
    _fill(store)
    fresh = base / "fresh.vla"
    _build(fresh, first + later)
    grown_t = min(_open_and_batch(grown) for _ in range(3))
    fresh_t = min(_open_and_batch(fresh) for _ in range(3))
    print(f"part 2: {appends} appends of one episode onto 100 ({t_commits / appends * 1e3:.1f} ms per commit)")
    print(
        f"  open:        after appends {grown_t[0] * 1e3:8.1f} ms, fresh {fresh_t[0] * 1e3:8.1f} ms "
        f"({grown_t[0] / fresh_t[0]:.2f}x; goal <= 1.5x)"
    )
    print(
        f"  first batch: after appends {grown_t[1] * 1e3:8.1f} ms, fresh {fresh_t[1] * 1e3:8.1f} ms "
        f"({grown_t[1] / fresh_t[1]:.2f}x; goal <= 1.5x)"
    )
    VLAStore.open(grown, writable=True).gc(retention_s=0, compact=True)
    compact_t = min(_open_and_batch(grown) for _ in range(3))
    print(
        f"  after `vlastore gc` (segments compacted, old commits gone): open {compact_t[0] * 1e3:.1f} ms "
        f"({compact_t[0] / fresh_t[0]:.2f}x), first batch {compact_t[1] * 1e3:.1f} ms "
        f"({compact_t[1] / fresh_t[1]:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--appends", type=int, default=1000)
    parser.add_argument("--dir", default=None, help="where to build the stores (default: a temporary folder)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench_append_", dir=args.dir))
    try:
        part1(base, args.rows)
        part2(base, args.appends)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
