"""Exact series statistics (vlastore.stats) against a numpy pass over the same data in RAM.

Builds ``--steps`` x ``--columns`` float32 robot-like data (offsets far from zero, small
spread) cut into episodes of 100-600 steps, touches it once (so page faults are no
contender's cost), then times, all in one process, best of ``--repeat``:

- numpy as usually written: ``np.quantile(x, qs, axis=0)``, ``x.mean/std(axis=0,
  dtype=float64)``, ``x.min/max(axis=0)``;
- numpy column by column (the fastest plain-numpy pass found here: a contiguous copy
  of each column, then the same functions, ``np.quantile(..., overwrite_input=True)``);
- ``vlastore.stats.summarize``: per-episode partials (kept for subsets and edits) plus
  the quantiles by selection;
- a 10% subset of the episodes: ``summarize(x, offsets, subset)`` against numpy column
  by column on the subset already gathered in RAM;
- the subset's mean/std/min/max from stored per-episode partials (no data read).

Exactness: vlastore's quantiles, min and max against numpy's on the concatenated data
(bit equality), and the largest relative difference of mean and std.

``--store-steps N`` (format 2, statistics stored with every commit): creates a store of N
steps x ``--columns`` in a temporary folder, appends ``--append`` episodes ``--appends``
times, and reports the time of each commit and the part of it spent on the statistics
(reading the visible series, summarising it, writing the small arrays), then the time of
``store.stats(key)`` read back from the commit.

    python tools/bench_stats.py --steps 10000000 --columns 20
    python tools/bench_stats.py --steps 0 --store-steps 2000000 --columns 20 --append 10 --appends 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vlastore.store as store_module  # noqa: E402
from vlastore.stats import EpisodeMoments, summarize  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402


def make_data(steps: int, columns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 601, size=steps // 100 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), steps) + 1]
    lengths[-1] -= int(lengths.sum()) - steps
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.empty((steps, columns), dtype=np.float32)
    for lo in range(0, steps, 1 << 20):  # in blocks: no float64 array of the whole size
        hi = min(steps, lo + (1 << 20))
        block = rng.standard_normal((hi - lo, columns)) * rng.uniform(0.01, 2.0, columns)
        values[lo:hi] = block + rng.uniform(-100, 100, columns)
    return values, offsets


def numpy_axis0(x: np.ndarray, qs: list[float]) -> dict[str, Any]:
    return {
        "q": np.quantile(x, qs, axis=0),
        "mean": x.mean(axis=0, dtype=np.float64),
        "std": x.std(axis=0, dtype=np.float64),
        "min": x.min(axis=0),
        "max": x.max(axis=0),
    }


def numpy_columns(x: np.ndarray, qs: list[float]) -> dict[str, Any]:
    out: dict[str, list[Any]] = {"q": [], "mean": [], "std": [], "min": [], "max": []}
    for c in range(x.shape[1]):
        col = np.ascontiguousarray(x[:, c])
        out["mean"].append(col.mean(dtype=np.float64))
        out["std"].append(col.std(dtype=np.float64))
        out["min"].append(col.min())
        out["max"].append(col.max())
        out["q"].append(np.quantile(col, qs, overwrite_input=True))
    return {k: np.stack(v, axis=-1) for k, v in out.items()}


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    seconds, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        seconds = min(seconds, time.perf_counter() - t0)
    return seconds, result


def check(name: str, stats: Any, reference: dict[str, Any], qs: list[float]) -> None:
    exact = all(np.array_equal(stats.quantiles[q], reference["q"][i]) for i, q in enumerate(qs))
    exact_mm = np.array_equal(stats.min, reference["min"]) and np.array_equal(stats.max, reference["max"])
    rel_mean = float(np.max(np.abs(stats.mean - reference["mean"]) / np.abs(reference["mean"])))
    rel_std = float(np.max(np.abs(stats.std - reference["std"]) / reference["std"]))
    print(
        f"  {name}: quantiles equal np.quantile on the concatenated data: {exact}; min/max equal: {exact_mm}; "
        f"mean rel. diff {rel_mean:.1e}, std rel. diff {rel_std:.1e}"
    )


def bench_store(steps: int, columns: int, append: int, appends: int, seed: int) -> None:
    """Commit times of a format-2 store and the share of the statistics stored with each commit."""
    spent: list[float] = []
    original = store_module.with_stats

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    store_module.with_stats = timed  # type: ignore[assignment]
    x, offsets = make_data(steps, columns, seed)
    extra, extra_offsets = make_data(append * appends * 350, columns, seed + 1)

    def cut(values: np.ndarray, offs: np.ndarray, lo: int, hi: int, prefix: str) -> list[EpisodeData]:
        return [
            EpisodeData(f"{prefix}{e:06d}", {"state": values[offs[e] : offs[e + 1]]})
            for e in range(lo, min(hi, len(offs) - 1))
        ]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.vla"
        eps = cut(x, offsets, 0, len(offsets) - 1, "ep")
        t0 = time.perf_counter()
        store = VLAStore.create(path, eps, format_version=2)
        total = time.perf_counter() - t0
        print(f"\nformat 2 store: {steps:,} steps x {columns} float32 in {len(eps):,} episodes")
        print(
            f"  create                          {total:8.2f} s, statistics {spent[-1]:6.2f} s ({spent[-1] / total:.0%})"
        )
        store = VLAStore.open(path, writable=True)
        for i in range(appends):
            new = cut(extra, extra_offsets, i * append, (i + 1) * append, "new")
            t0 = time.perf_counter()
            store.add_episodes(new)
            total = time.perf_counter() - t0
            n = sum(e.step_count() for e in new)
            print(
                f"  append {len(new)} episodes ({n:,} steps) {total:8.2f} s, statistics {spent[-1]:6.2f} s "
                f"({spent[-1] / total:.0%})"
            )
        t0 = time.perf_counter()
        store.remove_episodes([store.datasets[0]])
        total = time.perf_counter() - t0
        print(
            f"  remove 1 episode                {total:8.2f} s, statistics {spent[-1]:6.2f} s ({spent[-1] / total:.0%})"
        )
        t0 = time.perf_counter()
        VLAStore.open(path).stats("state")
        print(f"  open + store.stats('state') read from the commit: {time.perf_counter() - t0:.4f} s")
    store_module.with_stats = original  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000_000)
    parser.add_argument("--columns", type=int, default=20)
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.01, 0.99])
    parser.add_argument("--subset", type=float, default=0.1, help="fraction of episodes in the subset")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store-steps", type=int, default=0, help="also time commits of a format-2 store this big")
    parser.add_argument("--append", type=int, default=10, help="episodes per append (with --store-steps)")
    parser.add_argument("--appends", type=int, default=3, help="appends (with --store-steps)")
    args = parser.parse_args()
    if args.store_steps:
        bench_store(args.store_steps, args.columns, args.append, args.appends, args.seed)
    if not args.steps:
        return
    qs = list(args.quantiles)
    t0 = time.perf_counter()
    x, offsets = make_data(args.steps, args.columns, args.seed)
    n_episodes = len(offsets) - 1
    print(
        f"data: {args.steps:,} steps x {args.columns} float32 ({x.nbytes / 1e9:.2f} GB) in {n_episodes:,} episodes, "
        f"built in {time.perf_counter() - t0:.1f} s; quantiles {qs}; best of {args.repeat}"
    )
    float(x.sum(dtype=np.float64))  # touch every page once

    rows: list[tuple[str, float]] = []
    t_axis0, ref = best(lambda: numpy_axis0(x, qs), args.repeat)
    rows.append(("numpy, axis=0 on [steps, columns]", t_axis0))
    t_cols, ref_cols = best(lambda: numpy_columns(x, qs), args.repeat)
    rows.append(("numpy, column by column", t_cols))
    t_ours, ours = best(lambda: summarize(x, offsets, quantiles=qs), args.repeat)
    rows.append(("vlastore summarize (all episodes)", t_ours))

    rng = np.random.default_rng(args.seed + 1)
    subset = np.sort(rng.choice(n_episodes, size=max(1, int(n_episodes * args.subset)), replace=False))
    gathered = np.concatenate([x[offsets[e] : offsets[e + 1]] for e in subset])
    t_sub_np, ref_sub = best(lambda: numpy_columns(gathered, qs), args.repeat)
    t_sub, ours_sub = best(lambda: summarize(x, offsets, subset, quantiles=qs), args.repeat)
    moments = EpisodeMoments.compute(x, offsets)
    t_merge, _ = best(lambda: summarize(None, offsets, subset, quantiles=(), moments=moments), args.repeat)

    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'all episodes':<{width}} {'seconds':>8} {'x numpy axis=0':>15} {'x numpy columns':>16}")
    for name, seconds in rows:
        print(f"{name:<{width}} {seconds:>8.2f} {seconds / t_axis0:>15.2f} {seconds / t_cols:>16.2f}")
    print(f"\nsubset of {len(subset):,} episodes ({len(gathered):,} steps)")
    print(f"  numpy column by column on the gathered subset  {t_sub_np:8.3f} s")
    print(f"  vlastore summarize(x, offsets, subset)         {t_sub:8.3f} s  ({t_sub / t_sub_np:.2f}x numpy)")
    print(f"  vlastore mean/std/min/max from partials only   {t_merge:8.4f} s  ({t_merge / t_sub_np:.4f}x numpy)")
    print("\nexactness")
    check("all episodes vs numpy axis=0", ours, ref, qs)
    check("all episodes vs numpy columns", ours, ref_cols, qs)
    check("subset vs numpy on the gathered subset", ours_sub, ref_sub, qs)


if __name__ == "__main__":
    main()
