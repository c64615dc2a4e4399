"""Shared fixtures: small real stores in tmp_path (data builders live in helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import their data builders from helpers.py

from helpers import build_full_store, episodes  # noqa: E402

pytest_plugins = ["s3_server"]  # a real S3 server (moto) on loopback, its fault proxy and their fixtures

from vlastore.store import VLAStore  # noqa: E402


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.vla"


@pytest.fixture
def empty_store(store_path: Path) -> VLAStore:
    """Four episodes (7, 5, 9, 3 steps), series state/action, no families."""
    return VLAStore.create(store_path, episodes(), columns={"state": ["x", "y", "z"]})


@pytest.fixture
def full_store(store_path: Path) -> tuple[VLAStore, dict[str, object]]:
    """A local store with three complete families (see helpers.build_full_store) and its values."""
    return build_full_store(store_path)
