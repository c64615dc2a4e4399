"""Builders of real source data for the ingestion tests: .pt caches made with torch.save, CSV/NPZ/HDF5 files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_pt_cache(folder: Path, episodes: dict[str, int], shape: tuple[int, ...] = (1, 16), dtype: str = "bfloat16",
                  ragged: bool = False, seed: int = 0, payload: str = "tensor") -> dict[tuple[str, int], torch.Tensor]:
    """``{dataset}_vlm{idx}.pt`` files; returns the saved tensors by (dataset, vlm_idx)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, n in episodes.items():
        for idx in range(n):
            this = (1, 1 + (idx * 7 + len(name)) % 5, *shape[2:]) if ragged else shape
            t = torch.randn(this, generator=gen).to(DTYPES[dtype])
            obj = t if payload == "tensor" else {"features": t, "dataset": name, "vlm_idx": idx}
            torch.save(obj, folder / f"{name}_vlm{idx}.pt")
            values[(name, idx)] = t
    return values


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 and mtime of every file under ``root`` (to prove sources are untouched)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() + f"@{path.stat().st_mtime_ns}"
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor as numpy (bfloat16 has no numpy dtype)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def robot_csvs(folder: Path, episodes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """One CSV per episode: a text column, 3 joint columns, a gripper and 2 action columns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, steps in episodes.items():
        table = rng.normal(size=(steps, 6))
        out[name] = table
        lines = ["time_str,joint_0,joint_1,joint_2,gripper,action_0,action_1"]
        lines += [f"t{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(table)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return out


class RunsCode:
    """Pickles as a call to ``os.system``: what a malicious (or careless) .pt file holds."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))
