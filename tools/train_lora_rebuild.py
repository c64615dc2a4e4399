"""LoRA stage-2 training that rebuilds its feature cache every N epochs, the vlastore way.

The recipe this replaces: train the policy on cached VLM features while the
VLM's LoRA adapter also trains; every few epochs delete the cache and rerun
Make_VL_cache.py under torchrun. Here the cache is a feature family in the
store: every N epochs all ranks compute a new generation with the live model
(:func:`vlastore.features.rebuild_features`), rank 0 switches readers to it
atomically, and the Dataset picks it up at the next epoch boundary
(``refresh()``). Nothing is deleted under a running reader.

    torchrun --nproc_per_node=2 tools/train_lora_rebuild.py --tiny      # CPU, tiny random model, ~1 min
    python tools/train_lora_rebuild.py --tiny --epochs 3                # one process
    torchrun --nproc_per_node=8 tools/train_lora_rebuild.py --store S.vla --data-root DATA \\
        --model Qwen/Qwen2.5-VL-3B-Instruct --epochs 20 --rebuild-every 4
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn

from vlastore.dataset import VLADataset
from vlastore.features import DataFolder, build_features, rebuild_features
from vlastore.features.dist import barrier, broadcast_object, init_from_env, rank_world, shutdown
from vlastore.store import VLAStore


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with the base frozen (what peft's LoRA does to a Linear)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)


def add_lora(model: nn.Module, targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 4) -> list[nn.Parameter]:
    """Freeze the model and wrap its attention projections with LoRA; return the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1234)  # the same adapter initialisation on every rank
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and "visual" not in name:
                setattr(module, child_name, LoRALinear(child, rank=rank).to(child.weight.device))
    return [p for n, p in model.named_parameters() if "lora_" in n]


def average_gradients(params: list[nn.Parameter]) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def prepare_tiny(workdir: str | None) -> tuple[str, str, str]:
    """Rank 0 makes a tiny random Qwen2-VL and episodes; every rank gets the paths."""
    rank, _ = rank_world()
    paths = None
    if rank == 0:
        from vlastore.features.tiny import make_tiny_episodes, make_tiny_qwen2vl

        root = Path(workdir or tempfile.mkdtemp(prefix="vlastore-lora-"))
        if not (root / "store.vla").exists():
            make_tiny_qwen2vl(root / "model")
            make_tiny_episodes(root / "store.vla", root / "data", episodes=4, steps=(12, 18))
        paths = (str(root / "store.vla"), str(root / "data"), str(root / "model"))
        print(f"tiny setup in {root}")
    return broadcast_object(paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="make a tiny random model and episodes (no download)")
    parser.add_argument("--workdir", help="with --tiny: where to put them (default: a new temporary folder)")
    parser.add_argument("--store", help="the store (its catalog names the episodes)")
    parser.add_argument("--data-root", help="images and instructions (see docs/features.md)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct", help="hub id or folder")
    parser.add_argument("--family", default="qwen_vl", help="feature family (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rebuild-every", type=int, default=2, help="rebuild the features every N epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--feature-batch-size", type=int, default=8, help="items per VLM forward when building")
    parser.add_argument("--lora-items", type=int, default=4, help="VLM items per rank per epoch for the LoRA step")
    args = parser.parse_args(argv)

    created = init_from_env()
    rank, world = rank_world()
    if args.tiny:
        args.store, args.data_root, args.model = prepare_tiny(args.workdir)
    elif not (args.store and args.data_root):
        parser.error("give --store and --data-root, or --tiny")

    from vlastore.features.qwen import TransformersVLExtractor

    extractor = TransformersVLExtractor.load(args.model)  # bfloat16 rows on GPU, float32 on CPU
    lora_params = add_lora(extractor.model)
    source = DataFolder(args.data_root)
    build_features(args.store, extractor, source, family=args.family, batch_size=args.feature_batch_size)
    barrier()

    # one sample per (episode, step): the feature row of vlm_idx = step // vlm_reuse_count and the action at step
    data = VLADataset(args.store, features=[args.family], obs_keys=(), n_obs_steps=1, horizon=1)
    actions = torch.from_numpy(data.store.series_all("action")).float()
    hidden = data.store.spec(args.family).row_shape[-1]
    head = nn.Linear(hidden, actions.shape[1])
    if world > 1:
        head = nn.parallel.DistributedDataParallel(head)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = data.dataloader(batch_size=args.batch_size, sampler=sampler)
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    lora_opt = torch.optim.AdamW(lora_params, lr=1e-2)
    store = VLAStore.open(args.store)
    items = source.items(store, args.family, range(store.layout(args.family).rows))

    for epoch in range(args.epochs):
        generation, _rows = data.refresh()[args.family]  # epoch boundary: pick up a switched generation
        sampler.set_epoch(epoch)
        total = 0.0
        for batch in loader:
            loss = nn.functional.mse_loss(head(batch[args.family].float()), batch["action"][:, 0])
            head_opt.zero_grad()
            loss.backward()
            head_opt.step()
            total += loss.item()
        # stage 2: the adapter trains too, so the cached features drift away from the model
        extractor.model.train()
        picked = [
            items[(epoch * world * args.lora_items + rank * args.lora_items + i) % len(items)]
            for i in range(args.lora_items)
        ]
        inputs = {k: v.to(extractor.device) for k, v in extractor.prepare(picked)["inputs"].items()}
        out = extractor._backbone(**inputs, use_cache=False, return_dict=True)
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (out.last_hidden_state.float() * mask).sum(1) / mask.sum(1)
        module = head.module if isinstance(head, nn.parallel.DistributedDataParallel) else head
        target = torch.stack(
            [actions[int(store.catalog.step_offsets[store.catalog.index(it.dataset)]) + it.step] for it in picked]
        )
        lora_loss = nn.functional.mse_loss(module(pooled), target)
        lora_opt.zero_grad()
        lora_loss.backward()
        average_gradients(lora_params)
        lora_opt.step()
        extractor.model.eval()
        if rank == 0:
            print(
                f"epoch {epoch}: policy loss {total / max(1, len(loader)):.4f}, lora loss {lora_loss.item():.4f}, "
                f"reading generation {generation}"
            )
        if (epoch + 1) % args.rebuild_every == 0 and epoch + 1 < args.epochs:
            result = rebuild_features(
                args.store, args.family, extractor, source, batch_size=args.feature_batch_size, progress=rank == 0
            )
            if rank == 0:
                print(
                    f"  rebuilt {args.family}: generation {result.previous} -> {result.generation} "
                    f"(adapter fingerprint {result.info.producer.fingerprint[:20]}...)"
                )
    if created:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
