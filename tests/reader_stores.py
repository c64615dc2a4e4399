"""Small stores with known contents, shared by tests/test_reader_fast.py and tests/test_dataset.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlastore.format import FamilySpec, Producer
from vlastore.layout import vlm_items
from vlastore.store import EpisodeData, VLAStore

DTYPES = ("float32", "float16", "bfloat16")
STEPS = [7, 1, 12, 30, 4, 9]
REUSE = {"float32": 2, "float16": 1, "bfloat16": 3}


def random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Values of ``dtype`` in their storage form (bfloat16 as uint16 bits, all finite)."""
    values = rng.standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(dtype)


@dataclass
class KnownStore:
    store: VLAStore
    series: dict[str, np.ndarray]
    values: dict[str, Any] = field(default_factory=dict)
    """family -> [rows, ...] array (fixed) or list of arrays (ragged), storage dtype."""


def make_store(
    location: Any,
    seed: int = 0,
    rows_per_shard: int = 5,
    families: tuple[str, ...] = ("fixed", "ragged"),
    compression: str | None = None,
) -> KnownStore:
    """Episodes of uneven length; families ``fixed_<dtype>`` [2, 3] and ``ragged_<dtype>`` [L, 4].

    Every family spans several shards (``rows_per_shard`` is small).
    """
    rng = np.random.default_rng(seed)
    series = {
        "state": [rng.standard_normal((n, 3)).astype(np.float32) for n in STEPS],
        "action": [rng.standard_normal((n, 2)).astype(np.float32) for n in STEPS],
    }
    episodes = [EpisodeData(f"episode_{i:03d}", {k: v[i] for k, v in series.items()}) for i in range(len(STEPS))]
    store = VLAStore.create(location, episodes)
    known = KnownStore(store, {k: np.concatenate(v) for k, v in series.items()})
    for dtype in DTYPES:
        reuse = REUSE[dtype]
        items = vlm_items(store.catalog.steps, reuse)
        rows = int(items.sum())
        producer = Producer("test/model", "r1", fingerprint=f"fp-{dtype}")
        if "fixed" in families:
            name = f"fixed_{dtype}"
            spec = FamilySpec(
                (2, 3), dtype, vlm_reuse_count=reuse, rows_per_shard=rows_per_shard, compression=compression
            )
            store.add_family(name, spec, items, producer=producer)
            values = random_values(rng, (rows, 2, 3), dtype)
            with store.writer(name) as writer:
                writer.write_rows(np.arange(rows), values)
            known.values[name] = values
        if "ragged" in families:
            name = f"ragged_{dtype}"
            lengths = rng.integers(1, 6, size=rows)
            spec = FamilySpec(
                (4,),
                dtype,
                ragged=True,
                vlm_reuse_count=reuse,
                rows_per_shard=4 * rows_per_shard,
                compression=compression,
            )
            store.add_family(name, spec, items, lengths=lengths, producer=producer)
            ragged = [random_values(rng, (int(n), 4), dtype) for n in lengths]
            with store.writer(name) as writer:
                writer.write_rows(np.arange(rows), ragged)
            known.values[name] = ragged
    return known


def shard_file(store: VLAStore, family: str, shard: int) -> Path:
    path = store.storage.local_path(store.shard_key(family, shard))
    assert path is not None
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
