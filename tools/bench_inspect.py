"""Time the vlastore.inspect helpers (what the notebook runs) on a store of a given size.

Builds its own store in a temporary folder: ``--rows`` rows of 2048 bfloat16 (two
generations) and ``--ragged-rows`` ragged rows of ``--tokens`` x 256 float16, spread
over ``--episodes`` episodes. Prints seconds per helper; compare within one run.

    python tools/bench_inspect.py --rows 100000 --ragged-rows 5000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlastore import inspect as vi  # noqa: E402
from vlastore.format import FamilySpec, Producer  # noqa: E402
from vlastore.report import store_info  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402


def build(path: Path, rows: int, ragged_rows: int, tokens: int, episodes: int, seed: int) -> VLAStore:
    rng = np.random.default_rng(seed)
    per_episode = np.full(episodes, rows // episodes)
    per_episode[: rows % episodes] += 1
    steps = per_episode * 3
    store = VLAStore.create(
        path, [EpisodeData(f"ep_{e:05d}", {"state": rng.normal(size=(int(n), 7))}) for e, n in enumerate(steps)]
    )
    store.add_family("vlm", FamilySpec((2048,), "bfloat16", vlm_reuse_count=3), per_episode)
    ragged_items = np.full(episodes, ragged_rows // episodes)
    ragged_items[: ragged_rows % episodes] += 1
    lengths = rng.integers(tokens // 2, tokens * 3 // 2, size=int(ragged_items.sum()))
    store.add_family("tok", FamilySpec((256,), "float16", ragged=True), ragged_items, lengths=lengths)
    block = rng.normal(size=(4096, 2048)).astype(np.float32)
    bits = (block.view(np.uint32) >> 16).astype(np.uint16)
    for generation in (1, 2):
        if generation == 2:
            store.new_generation("vlm", Producer("bench", "v2"))
        with store.writer("vlm", generation=generation) as writer:
            for start in range(0, rows, 4096):
                batch = np.arange(start, min(rows, start + 4096))
                writer.write_rows(batch, bits[: batch.size] + generation)
    with store.writer("tok") as writer:
        for row, n in enumerate(lengths.tolist()):
            writer.write_rows([row], [rng.normal(size=(n, 256)).astype(np.float16)])
    store.switch_generation("vlm", 2, keep_previous=None)
    return VLAStore.open(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--ragged-rows", type=int, default=2_000)
    parser.add_argument("--tokens", type=int, default=200, help="mean token rows per ragged row")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--max-rows", type=int, default=vi.DEFAULT_MAX_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build(Path(tmp) / "bench.vla", args.rows, args.ragged_rows, args.tokens, args.episodes, args.seed)
        print(f"built {store} in {time.perf_counter() - t0:.1f} s")
        steps = [
            ("store_info", lambda: store_info(store)),
            ("coverage_table", lambda: vi.coverage_table(store)),
            ("family_stats vlm", lambda: vi.family_stats(store, "vlm", max_rows=args.max_rows)),
            ("family_stats tok", lambda: vi.family_stats(store, "tok", max_rows=args.max_rows)),
            ("project_rows vlm", lambda: vi.project_rows(store, "vlm", max_rows=args.max_rows)),
            ("project_rows tok", lambda: vi.project_rows(store, "tok", max_rows=args.max_rows)),
            ("generation_drift vlm", lambda: vi.generation_drift(store, "vlm", max_rows=args.max_rows)),
        ]
        for name, step in steps:
            t0 = time.perf_counter()
            step()
            print(f"{name:24s} {time.perf_counter() - t0:7.2f} s")


if __name__ == "__main__":
    main()
