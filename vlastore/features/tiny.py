"""A tiny, randomly initialised Qwen2-VL with its processor, saved to a folder.

For tests, benchmarks and ``--tiny`` examples: no download, a few seconds to
build, and the same code path as ``Qwen/Qwen2.5-VL-3B-Instruct`` (processor,
chat template, vision tower, merged image tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["make_tiny_qwen2vl", "make_tiny_episodes", "TINY_HIDDEN", "TINY_CHAT_TEMPLATE"]

TINY_HIDDEN = 32
"""Hidden size of the tiny model's language model (the feature width)."""

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# the shape of Qwen2-VL's template, cut down to text and images
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(words: int = 200) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab["[UNK]"] = len(vocab)
    for word in _WORDS[:words]:
        vocab.setdefault(word, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-_/\n":
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


_WORDS = """
the a an to of and in on with from into onto pick place put move push pull open close grasp lift drop red green
blue yellow black white cup bowl block box drawer door lid plate bottle sponge towel left right up down top bottom
front back table shelf robot arm gripper slowly carefully then it is user assistant system
""".split()  # noqa: SIM905  (a word list reads better as text)


def make_tiny_qwen2vl(
    path: str | os.PathLike[str],
    hidden: int = TINY_HIDDEN,
    layers: int = 2,
    seed: int = 0,
    image_size: int = 56,
) -> Path:
    """Save a tiny random Qwen2-VL model and a matching processor under ``path``.

    Args:
        path: folder to write (created); load it with ``from_pretrained(path)``.
        hidden: language-model hidden size (the width of pooled features).
        layers: language-model layers.
        seed: weights are a function of the seed.
        image_size: images are resized to about ``image_size`` squared pixels, so an
            image costs ``(image_size / 28) ** 2`` tokens (4 by default).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as ImageProcessor  # type: ignore[assignment]

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    vocab_size = len(tokenizer)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    half = hidden // 4 // 2  # rotary half-dimension of a head (4 heads), split over time/height/width
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    pixels = image_size * image_size
    image_processor = ImageProcessor(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    try:
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=TINY_CHAT_TEMPLATE,
        )
    except ImportError:  # no torchvision: the image+text processor vlastore falls back to
        from .qwen import _image_text_processor_class

        processor = _image_text_processor_class()(image_processor, tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    _name_processor_class(path, "Qwen2VLProcessor")
    (path / "vlastore_tiny.json").write_text(json.dumps({"hidden": hidden, "layers": layers, "seed": seed}))
    return path


def _name_processor_class(path: Path, name: str) -> None:
    """Make the saved processor say what a real Qwen2-VL checkpoint says."""
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        target = path / file
        if target.exists():
            data = json.loads(target.read_text())
            if "processor_class" in data:
                data["processor_class"] = name
                target.write_text(json.dumps(data, indent=2))


_TASKS = [
    "pick up the red cup and place it on the plate",
    "open the top drawer",
    "push the blue block to the left",
    "put the sponge into the bowl then close the lid",
    "lift the bottle",
]


def make_tiny_episodes(
    store_path: str | os.PathLike[str],
    data_root: str | os.PathLike[str],
    episodes: int = 3,
    steps: tuple[int, int] = (9, 15),
    cameras: tuple[str, ...] = ("front", "wrist"),
    image_size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> tuple[Path, Path]:
    """A store (state/action series) and its data folder (PNG per camera per step, instruction.txt).

    Uses the default convention ``<data_root>/<dataset>/<camera>/<step:06d>.png``.
    Returns ``(store_path, data_root)``.
    """
    import numpy as np
    from PIL import Image

    from ..store import EpisodeData, VLAStore

    rng = np.random.default_rng(seed)
    data_root = Path(data_root)
    data = []
    for e in range(episodes):
        name = f"episode_20251030_{e:06d}"
        n = int(rng.integers(steps[0], steps[1] + 1))
        folder = data_root / name
        for camera in cameras:
            (folder / camera).mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, size=(*image_size, 3))
            for step in range(n):
                pixels = (base + 7 * step + rng.integers(0, 20, size=base.shape)) % 256
                Image.fromarray(pixels.astype(np.uint8)).save(folder / camera / f"{step:06d}.png")
        (folder / "instruction.txt").write_text(_TASKS[e % len(_TASKS)] + "\n")
        state = rng.normal(size=(n, 7)).astype(np.float32)
        data.append(EpisodeData(name, {"state": state, "action": np.gradient(state, axis=0)}))
    VLAStore.create(store_path, data)
    return Path(store_path), data_root
