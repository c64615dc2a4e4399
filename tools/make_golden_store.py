"""Write the tiny golden store that every test run reads (tests/test_golden.py).

    python tools/make_golden_store.py [--out tests/data/golden-v1.vla]
    python tools/make_golden_store.py --format 2     (tests/data/golden-v2.vla: the same content, by commits)

The store is committed: a change to the code that makes it unreadable, or reads
different values from it, is a format change (bump FORMAT_VERSION, keep reading
version 1, add golden-v2). Rerun this script only for a new format version.

Every value is a deterministic function of its position (see :func:`expected`), so
the test regenerates them without this store's writer.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlastore.format import FamilySpec, Producer  # noqa: E402
from vlastore.store import EpisodeData, VLAStore  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "data" / "golden-v1.vla"
NAMES = ("episode_20251030_025119", "recv_all_20251027_170308", "episode_20251031_101500")
STEPS = (5, 4, 7)
IMAGES_PER_EPISODE = (1, 2, 1)
TOKEN_LENGTHS = (3, 1, 4, 2, 5, 1, 3)  # rows of tokens: 2 + 2 + 3 at vlm_reuse_count 3
UNWRITTEN_IMAGE_ROW = 3  # geom's last row is never written: coverage must say so


def _grid(shape: tuple[int, ...], salt: int) -> np.ndarray:
    """float32 multiples of 1/8 in [-6, 6]: exact in float16 and bfloat16."""
    k = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return (((k * 7 + salt * 13) % 97) - 48).astype(np.float32) / 8


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def expected() -> dict[str, object]:
    """Everything the golden store holds, in storage form (bfloat16 as uint16 bits)."""
    state = [_grid((n, 3), salt=e) for e, n in enumerate(STEPS)]
    action = [_grid((n, 2), salt=10 + e).astype(np.float64) for e, n in enumerate(STEPS)]
    rows = sum((n + 2) // 3 for n in STEPS)
    return {
        "state": state,
        "action": action,
        "vlm@1": _bf16_bits(_grid((rows, 16), salt=20)),
        "vlm@2": _bf16_bits(_grid((rows, 16), salt=21)),
        "tokens": [_grid((n, 4), salt=30 + r).astype(np.float16) for r, n in enumerate(TOKEN_LENGTHS)],
        "geom": _grid((sum(IMAGES_PER_EPISODE), 2, 3), salt=40),
        "geom_keys": [
            f"{name}/cam0/{i:06d}.jpg" for name, n in zip(NAMES, IMAGES_PER_EPISODE, strict=True) for i in range(n)
        ],
    }


def make_golden_store(out: str | Path = DEFAULT_OUT) -> VLAStore:
    """Write the golden store at ``out`` (replacing it)."""
    import torch

    values = expected()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    store = VLAStore.create(
        out,
        format_version=1,
        episodes=[
            EpisodeData(n, {"state": s, "action": a})
            for n, s, a in zip(NAMES, values["state"], values["action"], strict=True)
        ],
        columns={"state": ["x", "y", "gripper"], "action": ["dx", "dy"]},
    )
    producer = Producer("golden/model", "rev1", "fp-0001", {"pooling": "mean"})
    store.add_family("vlm", FamilySpec((16,), "bfloat16", vlm_reuse_count=3, rows_per_shard=4), producer=producer)
    with store.writer("vlm") as writer:  # bfloat16 given the way users give it: torch tensors
        bits = values["vlm@1"]
        writer.write_rows(np.arange(len(bits)), torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16))
    store.new_generation("vlm", Producer("golden/model", "rev2", "fp-0002", {"pooling": "mean"}))
    with store.writer("vlm", generation=2) as writer:
        writer.write_rows(np.arange(len(values["vlm@2"])), values["vlm@2"])
    store.switch_generation("vlm", 2, keep_previous=None)
    store.add_family(
        "tokens",
        FamilySpec((4,), "float16", ragged=True, vlm_reuse_count=3, compression="zstd", rows_per_shard=8),
        lengths=TOKEN_LENGTHS,
        producer=producer,
    )
    with store.writer("tokens") as writer:
        writer.write_rows(np.arange(len(TOKEN_LENGTHS)), values["tokens"])
    store.add_family(
        "geom",
        FamilySpec((2, 3), "float32", index_name="image", compression="zstd", rows_per_shard=2, has_keys=True),
        items_per_episode=IMAGES_PER_EPISODE,
        keys=values["geom_keys"],
        producer=Producer("golden/geometry", "rev1", "fp-geom"),
    )
    with store.writer("geom") as writer:
        rows = [r for r in range(sum(IMAGES_PER_EPISODE)) if r != UNWRITTEN_IMAGE_ROW]
        writer.write_rows(rows, values["geom"][rows])
    return store


DEFAULT_OUT_V2 = ROOT / "tests" / "data" / "golden-v2.vla"
TASKS = ("pick the red cube", "open the drawer", "pick the red cube")
FPS = (10.0, 15.0, None)
DROPPED = "dropped_20251029_120000"  # appended, then removed: its steps and rows stay on disk, unreachable


def _rows_of(values: dict[str, object], e: int) -> tuple[int, int]:
    reuse = [(n + 2) // 3 for n in STEPS]
    return sum(reuse[:e]), sum(reuse[: e + 1])


def make_golden_v2(out: str | Path = DEFAULT_OUT_V2) -> VLAStore:
    """Format 2: the same content as golden-v1, built by commits (create, families, an append, a remove, a new
    generation and a switch), with episode metadata. Commits: 1 create, 2-4 families, 5 append, 6 remove,
    7 new generation, 8 switch."""
    from vlastore.store import SegmentRows

    values = expected()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    eps = [
        EpisodeData(n, {"state": s, "action": a}, task=t, fps=f, attrs={"operator": f"op{e}"})
        for e, (n, s, a, t, f) in enumerate(zip(NAMES, values["state"], values["action"], TASKS, FPS, strict=True))
    ]
    dropped = EpisodeData(DROPPED, {"state": np.ones((2, 3), np.float32), "action": np.ones((2, 2))})
    columns = {"state": ["x", "y", "gripper"], "action": ["dx", "dy"]}
    store = VLAStore.create(out, eps[:2], columns=columns, format_version=2)
    producer = Producer("golden/model", "rev1", "fp-0001", {"pooling": "mean"})
    store.add_family("vlm", FamilySpec((16,), "bfloat16", vlm_reuse_count=3, rows_per_shard=4), producer=producer)
    two_rows = _rows_of(values, 1)[1]
    store.add_family(
        "tokens",
        FamilySpec((4,), "float16", ragged=True, vlm_reuse_count=3, compression="zstd", rows_per_shard=8),
        lengths=TOKEN_LENGTHS[:two_rows],
        producer=producer,
    )
    store.add_family(
        "geom",
        FamilySpec((2, 3), "float32", index_name="image", compression="zstd", rows_per_shard=2, has_keys=True),
        items_per_episode=IMAGES_PER_EPISODE[:2],
        keys=values["geom_keys"][:3],
        producer=Producer("golden/geometry", "rev1", "fp-geom"),
    )
    geom_new = SegmentRows(np.asarray([0, IMAGES_PER_EPISODE[2]]), None, values["geom_keys"][3:])
    store.add_episodes(
        [dropped, eps[2]],
        rows={"tokens": SegmentRows(np.asarray([1, 3]), np.asarray([2, *TOKEN_LENGTHS[two_rows:]])), "geom": geom_new},
    )
    store.remove_episodes([DROPPED])
    _write_v2(store, values)
    store.new_generation("vlm", Producer("golden/model", "rev2", "fp-0002", {"pooling": "mean"}))
    with store.writer("vlm", generation=2) as writer:
        writer.write_rows(np.arange(len(values["vlm@2"])), values["vlm@2"])
    store.switch_generation("vlm", 2, keep_previous=None)
    return store


def _write_v2(store: VLAStore, values: dict[str, object]) -> None:
    import torch

    with store.writer("vlm") as writer:
        bits = values["vlm@1"]
        writer.write_rows(np.arange(len(bits)), torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16))
    with store.writer("tokens") as writer:
        writer.write_rows(np.arange(len(TOKEN_LENGTHS)), values["tokens"])
    with store.writer("geom") as writer:
        rows = [r for r in range(sum(IMAGES_PER_EPISODE)) if r != UNWRITTEN_IMAGE_ROW]
        writer.write_rows(rows, values["geom"][rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default=None, help=f"where to write it (default: {DEFAULT_OUT}, or {DEFAULT_OUT_V2} with --format 2)"
    )
    parser.add_argument("--format", type=int, choices=(1, 2), default=1, help="format version (default 1)")
    args = parser.parse_args()
    if args.format == 2:
        args.out = args.out or str(DEFAULT_OUT_V2)
        store = make_golden_v2(args.out)
    else:
        args.out = args.out or str(DEFAULT_OUT)
        store = make_golden_store(args.out)
    files = [p for p in Path(args.out).rglob("*") if p.is_file()]
    print(f"wrote {store.location}: {len(files)} files, {sum(p.stat().st_size for p in files):,} bytes")


if __name__ == "__main__":
    main()
