"""How much of a feature build is spent outside the model forward? (target: <= 5%)

Builds a tiny random Qwen2-VL (no download) and a store of episodes with PNG
images, then runs two contenders on the same data in one process:

* ``serial + .pt``: what a hand-made Make_VL_cache.py does: for each batch,
  load images and run the processor, run the model, ``torch.save`` one file per
  row.
* ``vlastore``: :func:`vlastore.features.build_features`: inputs prepared in a
  background thread while the model runs, rows written into shards.

For each it prints rows/s and the share of wall time outside the forward
(reading inputs, writing rows), and vlastore's ratios against the baseline.

    python tools/bench_features.py                       # default size, a few minutes on 2 cores
    python tools/bench_features.py --episodes 4 --hidden 64   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serial_pt(extractor, source, store, out: Path, batch_size: int) -> dict:
    """The baseline loop: prepare, forward, one torch.save per row, nothing overlapped."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    rows = list(range(store.layout("bench").rows))
    items = source.items(store, "bench", rows)
    forward = 0.0
    start = time.perf_counter()
    for pos in range(0, len(items), batch_size):
        batch = items[pos : pos + batch_size]
        prepared = extractor.prepare(batch)
        t = time.perf_counter()
        values = extractor.compute(prepared)
        forward += time.perf_counter() - t
        for item, value in zip(batch, values, strict=True):
            torch.save(value.clone(), out / f"{item.dataset}_vlm{item.index}.pt")
    total = time.perf_counter() - start
    return {"rows": len(items), "total": total, "forward": forward}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8, help="episodes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="steps per episode (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model hidden size (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="tiny model layers (default: %(default)s)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=112,
        help="images are resized to about this squared (default: %(default)s: 16 tokens each)",
    )
    parser.add_argument("--camera-size", default="240x320", help="stored PNG size HxW (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="items per forward (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", help="where to build (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    import torch

    from vlastore.features import DataFolder, build_features, get_extractor
    from vlastore.features.tiny import make_tiny_episodes, make_tiny_qwen2vl
    from vlastore.store import VLAStore

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlastore-bench-features-"))
    try:
        h, w = (int(x) for x in args.camera_size.split("x"))
        print(
            f"building tiny model (hidden {args.hidden}, {args.layers} layers) and "
            f"{args.episodes} episodes x {args.steps} steps x 2 cameras of {h}x{w} PNG in {work}"
        )
        make_tiny_qwen2vl(work / "model", hidden=args.hidden, layers=args.layers, image_size=args.image_size)
        make_tiny_episodes(
            work / "store.vla", work / "data", episodes=args.episodes, steps=(args.steps, args.steps), image_size=(h, w)
        )
        source = DataFolder(work / "data")
        extractor = get_extractor("transformers-vl", model=str(work / "model"), device="cpu", dtype="float32")

        # warm up (first forwards allocate), outside both measurements
        store = VLAStore.open(work / "store.vla", writable=True)
        names = store.catalog.names
        extractor.compute(extractor.prepare([source.item(names[0], i, 3 * i) for i in range(args.batch_size)]))

        shutil.copytree(work / "store.vla", work / "baseline.vla")
        base_store = VLAStore.open(work / "baseline.vla", writable=True)
        base_store.add_family("bench", extractor.spec(3), producer=extractor.producer(""))
        baseline = serial_pt(extractor, source, base_store, work / "pt", args.batch_size)

        stats = build_features(store, extractor, source, family="bench", batch_size=args.batch_size, progress=False)
        assert VLAStore.open(work / "store.vla").coverage("bench").all()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    def line(name: str, rows: int, total: float, forward: float) -> str:
        outside = max(0.0, 1 - forward / total)
        return (
            f"{name:<16} {rows:>6} rows  {total:7.2f} s  {rows / total:8.1f} rows/s  "
            f"outside forward {100 * outside:5.1f}%"
        )

    print()
    print(line("serial + .pt", baseline["rows"], baseline["total"], baseline["forward"]))
    print(line("vlastore", stats.rows, stats.seconds_total, stats.seconds_forward))
    other = stats.seconds_total - stats.seconds_forward - stats.seconds_wait_inputs - stats.seconds_write
    print(
        f"  vlastore: waiting for inputs {stats.seconds_wait_inputs:.3f} s, "
        f"writing rows {stats.seconds_write:.3f} s, other {other:.3f} s"
    )
    base_outside = 1 - baseline["forward"] / baseline["total"]
    speedup = (stats.rows / stats.seconds_total) / (baseline["rows"] / baseline["total"])
    print(
        f"ratios vs serial + .pt: rows/s x{speedup:.2f}, "
        f"time outside forward x{stats.outside_forward_fraction / base_outside:.2f}"
    )
    print(
        f"target outside forward <= 5%: {'MET' if stats.outside_forward_fraction <= 0.05 else 'NOT MET'} "
        f"({100 * stats.outside_forward_fraction:.1f}%)"
    )
    print(
        f"(torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; on CPU the input thread competes "
        "with the forward for cores, on a GPU it does not)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
