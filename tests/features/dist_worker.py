"""Run under ``torchrun`` by the tests: `vlastore build-features`, then a rebuild with the live, changed model.

Usage: torchrun --standalone --nproc_per_node=2 dist_worker.py STORE DATA MODEL OUT
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from vlastore.cli import main
from vlastore.features import DataFolder, get_extractor, rebuild_features


def perturb(model: torch.nn.Module) -> None:
    """The same small change on every rank, as a training step would make."""
    with torch.no_grad():
        weight = dict(model.named_parameters())["model.language_model.layers.0.mlp.up_proj.weight"]
        weight.mul_(1.5)


def run(store: str, data: str, model: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    code = main(
        [
            "build-features",
            store,
            "--data-root",
            data,
            "--model",
            model,
            "--rows-per-shard",
            "2",
            "--batch-size",
            "3",
            "-q",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--stats-json",
            f"{out}/stats-{{rank}}.json",
        ]
    )
    assert code == 0, code
    extractor = get_extractor("transformers-vl", model=model, device="cpu", dtype="float32")
    perturb(extractor.model)
    result = rebuild_features(store, "qwen_vl", extractor, DataFolder(data), batch_size=3, progress=False)
    with open(f"{out}/rebuild-{rank}.json", "w") as f:
        json.dump(
            {
                "generation": result.generation,
                "previous": result.previous,
                "rows": result.stats.rows,
                "fingerprint": result.stats.fingerprint,
            },
            f,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    run(*sys.argv[1:5])
