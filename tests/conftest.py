"""Shared fixtures: small real stores in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import their data builders from helpers.py

from helpers import episodes, fill_family, random_rows, ragged_rows, spec_for  # noqa: E402

from vlastore.store import VLAStore  # noqa: E402


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.vla"


@pytest.fixture
def empty_store(store_path: Path) -> VLAStore:
    """Four episodes (7, 5, 9, 3 steps), series state/action, no families."""
    return VLAStore.create(store_path, episodes(), columns={"state": ["x", "y", "z"]})


@pytest.fixture
def full_store(empty_store: VLAStore) -> tuple[VLAStore, dict[str, object]]:
    """``empty_store`` plus three complete families; returns the store and the values written.

    ``fixed`` [8] bfloat16 raw, 4 rows per shard; ``tokens`` ragged [L, 4] float16 raw,
    6 token rows per shard; ``packed`` [8] float32 zstd, 3 rows per shard.
    """
    store = empty_store
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
