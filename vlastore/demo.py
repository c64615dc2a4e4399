"""A small synthetic store, so every command has something to run on out of the box."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .format import FamilySpec, Producer
from .layout import vlm_items
from .store import EpisodeData, VLAStore

__all__ = ["make_demo_store", "demo_batch", "describe_batch", "DEMO_PATH"]

DEMO_PATH = Path("vlastore-demo.vla")
JOINTS = [f"joint_{i}" for i in range(6)] + ["gripper"]


def make_demo_store(
    path: str | os.PathLike[str] = DEMO_PATH,
    episodes: int = 6,
    hidden: int = 2048,
    token_hidden: int = 256,
    vlm_reuse_count: int = 3,
    seed: int = 0,
) -> VLAStore:
    """Write a demo store: robot series, a bfloat16 VLM family and a ragged token family.

    Each episode's features sit around their own random centre, so they cluster
    by episode the way real task features do.
    """
    import torch  # demo features are made the way users make them: torch bfloat16

    rng = np.random.default_rng(seed)
    data = []
    for i in range(episodes):
        steps = int(rng.integers(40, 90))
        t = np.linspace(0, 1, steps)[:, None]
        phase = rng.uniform(0, np.pi, size=(1, 7))
        state = np.sin(2 * np.pi * t + phase) + 0.01 * rng.normal(size=(steps, 7))
        action = np.gradient(state, axis=0) * steps
        data.append(
            EpisodeData(
                f"episode_2025103{i // 3}_0{i:05d}",
                {"state": state.astype(np.float32), "action": action.astype(np.float32)},
            )
        )
    store = VLAStore.create(path, data, columns={"state": JOINTS, "action": JOINTS})
    items = vlm_items(store.catalog.steps, vlm_reuse_count)
    producer = Producer("demo/random-features", "v0", fingerprint="demo0000", params={"pooling": "mean"})
    store.add_family(
        "qwen_vl", FamilySpec((hidden,), "bfloat16", vlm_reuse_count=vlm_reuse_count), items, producer=producer
    )
    lengths = rng.integers(16, 48, size=int(items.sum()))
    store.add_family(
        "qwen_vl_tokens",
        FamilySpec((token_hidden,), "float16", ragged=True, vlm_reuse_count=vlm_reuse_count),
        items,
        lengths=lengths,
        producer=Producer("demo/random-features", "v0", fingerprint="demo0000", params={"pooling": "all"}),
    )
    centres = rng.normal(size=(episodes, hidden)).astype(np.float32)
    with store.writer("qwen_vl") as writer:
        rows = np.arange(int(items.sum()))
        episode = store.layout("qwen_vl").episode_of_rows(rows)
        values = centres[episode] + 0.3 * rng.normal(size=(len(rows), hidden)).astype(np.float32)
        writer.write_rows(rows, torch.from_numpy(values).to(torch.bfloat16))
    with store.writer("qwen_vl_tokens") as writer:
        token_centres = centres[:, :token_hidden]
        for row, (length, e) in enumerate(zip(lengths.tolist(), episode.tolist(), strict=False)):
            tokens = token_centres[e] + 0.5 * rng.normal(size=(length, token_hidden))
            writer.write_rows([row], [tokens.astype(np.float16)])
    return store


def demo_batch(store: VLAStore, batch_size: int = 4, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A ``VLADataset`` over the demo store and one shuffled batch read through a ``DataLoader``."""
    import torch

    from .dataset import VLADataset

    dataset = VLADataset(store, features=["qwen_vl", "qwen_vl_tokens"], n_obs_steps=2, horizon=8)
    loader = dataset.dataloader(batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return dataset, next(iter(loader))


def describe_batch(batch: dict[str, Any]) -> list[str]:
    """One line per key: shape and dtype of tensors, the first items of lists."""
    lines = []
    for key, value in batch.items():
        if hasattr(value, "shape"):
            lines.append(f"{key}: {tuple(value.shape)} {value.dtype}")
        else:
            lines.append(f"{key}: {len(value)} x {type(value[0]).__name__}, e.g. {value[0]!r}")
    return lines
