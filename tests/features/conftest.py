"""Fixtures for the feature tests: a tiny random Qwen2-VL saved to disk, and small episodes with images."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="pip install vlastore[transformers]")
pytest.importorskip("PIL", reason="pip install vlastore[transformers]")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # features_plugins, dist_worker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlastore.features.tiny import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="session")
def tiny_extractor(tiny_model_dir: Path):
    """The tiny model loaded once (float32 on CPU, mean pooling); tests must not change its weights."""
    from vlastore.features import get_extractor

    return get_extractor("transformers-vl", model=str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def _episodes_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from vlastore.features.tiny import make_tiny_episodes

    root = tmp_path_factory.mktemp("episodes")
    return make_tiny_episodes(root / "store.vla", root / "data", episodes=3)


@pytest.fixture
def episodes(_episodes_template: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of a 3-episode store (no families yet) and its data folder."""
    store, data = _episodes_template
    shutil.copytree(store, tmp_path / "store.vla")
    return tmp_path / "store.vla", data
