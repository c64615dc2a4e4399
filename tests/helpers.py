"""Data builders shared by the tests (imported as ``helpers``; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from zarr.abc.store import Store
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync

from vlastore.format import FamilySpec
from vlastore.store import EpisodeData, VLAStore

__all__ = [
    "episodes",
    "random_rows",
    "ragged_rows",
    "snapshot",
    "store_snapshot",
    "to_bits",
    "fill_family",
    "build_full_store",
    "flip_byte",
    "TORCH_DTYPES",
    "as_value",
    "plan_writer_store",
    "expected_values",
    "WRITER_STEPS",
]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def episodes(steps: tuple[int, ...] = (7, 5, 9, 3), seed: int = 0, prefix: str = "episode") -> list[EpisodeData]:
    """Episodes with a 3-column float32 ``state`` and a 2-column float64 ``action``."""
    rng = np.random.default_rng(seed)
    return [
        EpisodeData(
            f"{prefix}_{i:03d}",
            {
                "state": rng.normal(size=(n, 3)).astype(np.float32),
                "action": rng.normal(size=(n, 2)),
            },
        )
        for i, n in enumerate(steps)
    ]


def random_rows(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Finite values of ``dtype`` in their storage form (bfloat16 as uint16 bits, any finite pattern)."""
    rng = np.random.default_rng(seed)
    if dtype == "bfloat16":
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        # exponent all ones is Inf/NaN: move those to the largest finite exponent
        return np.where((bits & 0x7F80) == 0x7F80, bits & 0xFF7F, bits).astype(np.uint16)
    return rng.normal(size=shape).astype(dtype)


def ragged_rows(lengths: np.ndarray, row_shape: tuple[int, ...], dtype: str, seed: int = 0) -> list[np.ndarray]:
    return [random_rows((int(n), *row_shape), dtype, seed=seed * 100_003 + i) for i, n in enumerate(lengths)]


def to_bits(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's storage form as numpy (bfloat16 -> uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def as_value(rows: np.ndarray, dtype: str) -> np.ndarray | torch.Tensor:
    """What a user hands the writer: bfloat16 as a torch tensor, the rest as numpy."""
    if dtype == "bfloat16":
        return torch.from_numpy(rows.view(np.int16).copy()).view(torch.bfloat16)
    return rows


def fill_family(
    store: VLAStore, family: str, values: np.ndarray | list[np.ndarray], rank: int = 0, world_size: int = 1
) -> None:
    """Write every row ``rank`` owns from ``values`` (all rows, storage form)."""
    spec = store.spec(family)
    with store.writer(family, rank=rank, world_size=world_size) as writer:
        rows = writer.pending_rows()
        if spec.ragged:
            writer.write_rows(rows, [as_value(values[r], spec.dtype) for r in rows.tolist()])
        elif rows.size:
            writer.write_rows(rows, as_value(values[rows], spec.dtype))


def snapshot(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: compare before/after to prove nothing changed."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def spec_for(
    dtype: str,
    ragged: bool = False,
    compression: str | None = None,
    rows_per_shard: int = 4,
    row_shape: tuple[int, ...] = (8,),
) -> FamilySpec:
    return FamilySpec(
        row_shape, dtype, ragged=ragged, compression=compression, rows_per_shard=rows_per_shard, vlm_reuse_count=3
    )


def build_full_store(location: str | os.PathLike[str] | Store) -> tuple[VLAStore, dict[str, object]]:
    """Four episodes (7, 5, 9, 3 steps, 9 rows at vlm_reuse_count 3) and three complete families.

    ``fixed`` [8] bfloat16 raw, 4 rows per shard; ``tokens`` ragged [L, 4] float16 raw,
    6 token rows per shard; ``packed`` [8] float32 zstd, 3 rows per shard.
    Returns the store and the values written (storage form).
    """
    store = VLAStore.create(location, episodes(), columns={"state": ["x", "y", "z"]})
    store.add_family("fixed", spec_for("bfloat16"))
    rows = store.layout("fixed").rows
    fixed = random_rows((rows, 8), "bfloat16", seed=1)
    fill_family(store, "fixed", fixed)
    lengths = np.random.default_rng(2).integers(1, 5, size=rows)
    store.add_family("tokens", spec_for("float16", ragged=True, rows_per_shard=6, row_shape=(4,)), lengths=lengths)
    tokens = ragged_rows(lengths, (4,), "float16", seed=3)
    fill_family(store, "tokens", tokens)
    store.add_family("packed", spec_for("float32", compression="zstd", rows_per_shard=3))
    packed = random_rows((rows, 8), "float32", seed=4)
    fill_family(store, "packed", packed)
    return store, {"fixed": fixed, "tokens": tokens, "packed": packed}


def store_snapshot(store: Store) -> dict[str, bytes]:
    """Every key of a zarr store with its bytes (any store kind)."""

    async def keys() -> list[str]:
        return [k async for k in store.list()]

    out = {}
    for key in sorted(sync(keys())):
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
        if buf is not None:
            out[key] = buf.to_bytes()
    return out


def flip_byte(store: Store, key: str, offset: int) -> None:
    """Flip one bit of the object at ``key`` (simulated disk corruption)."""
    data = bytearray(sync(store.get(key, prototype=default_buffer_prototype())).to_bytes())
    offset %= len(data)  # negative offsets count from the end
    data[offset] ^= 0x10
    if hasattr(store, "root"):  # LocalStore: rewrite in place, as a bad disk would
        with open(os.path.join(store.root, key), "r+b") as f:
            f.seek(offset)
            f.write(bytes([data[offset]]))
        return
    sync(store.set(key, cpu.Buffer.from_bytes(bytes(data))))


WRITER_STEPS = (30, 20, 25, 12)
"""Episodes of the multi-process writer tests: 10 + 7 + 9 + 4 = 30 rows at vlm_reuse_count 3."""


def plan_writer_store(location: str | os.PathLike[str]) -> VLAStore:
    """A store with ``fixed`` (bfloat16 [8], 4 rows per shard: 8 shards) and ``tokens``
    (ragged float16 [L, 4], zstd, 10 token rows per shard) planned, nothing written."""
    store = VLAStore.create(location, episodes(WRITER_STEPS))
    store.add_family("fixed", spec_for("bfloat16"))
    lengths = np.random.default_rng(5).integers(1, 6, size=store.layout("fixed").rows)
    store.add_family(
        "tokens",
        spec_for("float16", ragged=True, compression="zstd", rows_per_shard=10, row_shape=(4,)),
        lengths=lengths,
    )
    return store


def expected_values(store: VLAStore) -> dict[str, object]:
    """The values every writer process of a :func:`plan_writer_store` store writes (deterministic)."""
    rows = store.layout("fixed").rows
    return {
        "fixed": random_rows((rows, 8), "bfloat16", seed=11),
        "tokens": ragged_rows(store.layout("tokens").lengths, (4,), "float16", seed=12),
    }
