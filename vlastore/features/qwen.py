"""Features from a Hugging Face transformers vision-language model (Qwen2-VL, Qwen2.5-VL, ...).

One row per item: the model reads the item's images and its episode's
instruction as one user turn of the chat template, and the hidden states of
one layer are pooled: ``mean`` over the tokens, the ``last`` token, or ``all``
tokens as a variable-length row ``[L, hidden]``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

from .extractor import ExtractorError, FeatureExtractor, Item
from .fingerprint import model_fingerprint

__all__ = ["TransformersVLExtractor", "load_processor", "load_model", "POOLINGS", "DEFAULT_MODEL"]

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
POOLINGS = ("mean", "last", "all")

# used when a processor has no chat template: Qwen2-VL's user turn
_FALLBACK_PROMPT = "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
_FALLBACK_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _image_text_processor_class() -> Any:
    """Qwen2-VL's processor without its video part (which needs torchvision)."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextProcessor(Qwen2VLProcessor):
        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
        ) -> None:
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.image_token
            )
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.video_token
            )
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageTextProcessor


def load_processor(model: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained(model)``; without torchvision, an image+text Qwen2-VL processor.

    Qwen2-VL processors also build a video processor, which needs torchvision;
    features need images only, so a machine without torchvision still works.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model, **kwargs)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        first_error = exc
    try:
        return _image_text_processor_class().from_pretrained(model, **kwargs)
    except Exception as exc:
        raise ExtractorError(
            f"cannot load a processor from {model}: {first_error} (image+text fallback: {exc}); "
            "check the path, or install torchvision"
        ) from None


def load_model(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None = None,
    torch_dtype: Any = None,
    device: Any = None,
    **kwargs: Any,
) -> Any:
    """A vision-language model from a hub id or folder, with an optional PEFT/LoRA adapter, in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype or torch.float32, **kwargs)
    if adapter is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise ExtractorError(f"--adapter {adapter} needs peft: pip install peft") from None
        loaded = PeftModel.from_pretrained(loaded, adapter)
    if device is not None:
        loaded = loaded.to(device)
    return loaded.eval()


def _backbone(model: Any) -> Any:
    """The part of the model that returns hidden states (skips the LM head: most of a 150k-vocab matmul)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "model", None)
    if backbone is not None and hasattr(backbone, "forward") and hasattr(backbone, "language_model"):
        return backbone
    return inner


def _hidden_size(config: Any) -> int:
    for cfg in (getattr(config, "text_config", None), config):
        size = getattr(cfg, "hidden_size", None)
        if isinstance(size, int):
            return size
    raise ExtractorError(f"cannot tell the hidden size of {type(config).__name__}; give it a text_config.hidden_size")


class TransformersVLExtractor(FeatureExtractor):
    """Pooled hidden states of a transformers vision-language model.

    Args:
        model: a loaded model (e.g. the one being LoRA-trained; used as is, never
            copied) in eval mode for the rebuild.
        processor: its processor (tokenizer + image processor + chat template).
        pooling: ``"mean"`` (over non-padding tokens), ``"last"`` (last token) or
            ``"all"`` (one ``[L, hidden]`` row per item).
        layer: hidden-state layer; -1 is the final (normed) layer.
        dtype: dtype of the stored rows: ``bfloat16``, ``float16`` or ``float32``.
        model_name: recorded in the manifest (defaults to the model's ``name_or_path``).
        autocast: run the forward under bfloat16 autocast on GPU (default: yes on CUDA).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        pooling: str = "mean",
        layer: int = -1,
        dtype: str = "bfloat16",
        model_name: str = "",
        revision: str = "",
        autocast: bool | None = None,
        prompt: str = "{instruction}",
    ) -> None:
        if pooling not in POOLINGS:
            raise ExtractorError(f"pooling {pooling!r} is not one of {POOLINGS}")
        self.model = model
        self.processor = processor
        self.pooling = pooling
        self.layer = layer
        self.dtype = dtype
        self.ragged = pooling == "all"
        self.row_shape = (_hidden_size(model.config),)
        self.model_name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.revision = revision or str(getattr(model.config, "_commit_hash", "") or "")
        self.prompt = prompt
        self._backbone = _backbone(model)
        self._accepts = set(inspect.signature(self._backbone.forward).parameters)
        device = next(model.parameters()).device
        self.device = device
        self.autocast = device.type == "cuda" if autocast is None else autocast
        self._fingerprint: str | None = None

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        adapter: str | os.PathLike[str] | None = None,
        device: str | None = None,
        pooling: str = "mean",
        layer: int = -1,
        dtype: str | None = None,
        revision: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prompt: str = "{instruction}",
    ) -> TransformersVLExtractor:
        """Load model and processor from a hub id or a local folder.

        ``device`` defaults to ``cuda:<LOCAL_RANK>`` when CUDA is available, else
        CPU; ``dtype`` (of the rows) to bfloat16 on GPU and float32 on CPU.
        """
        import torch

        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        on_gpu = torch.device(device).type == "cuda"
        dtype = dtype or ("bfloat16" if on_gpu else "float32")
        extra = {"revision": revision} if revision else {}
        proc_kwargs: dict[str, Any] = dict(extra)
        if min_pixels is not None:
            proc_kwargs["min_pixels"] = min_pixels
        if max_pixels is not None:
            proc_kwargs["max_pixels"] = max_pixels
        processor = load_processor(model, **proc_kwargs)
        # weights stay in bfloat16 on GPU (autocast), float32 on CPU (exact)
        torch_dtype = torch.bfloat16 if on_gpu else torch.float32
        loaded = load_model(model, adapter=adapter, torch_dtype=torch_dtype, device=device, **extra)
        return cls(
            loaded,
            processor,
            pooling=pooling,
            layer=layer,
            dtype=dtype,
            model_name=str(model),
            revision=revision or "",
            prompt=prompt,
        )

    # ------------------------------------------------------------ manifest

    def params(self) -> dict[str, Any]:
        ip = getattr(self.processor, "image_processor", None)
        size = getattr(ip, "size", None)
        return {
            "extractor": "transformers-vl",
            "pooling": self.pooling,
            "layer": self.layer,
            "prompt": self.prompt,
            "image_size": _plain_size(size),
            "autocast": "bfloat16" if self.autocast else "none",
        }

    def fingerprint(self) -> str:
        """:func:`~vlastore.features.fingerprint.model_fingerprint` of the model (recomputed on each call)."""
        self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # -------------------------------------------------------------- inputs

    def text(self, item: Item) -> str:
        instruction = self.prompt.format(instruction=item.instruction)
        if getattr(self.processor, "chat_template", None):
            content: list[dict[str, Any]] = [{"type": "image"} for _ in item.images]
            content.append({"type": "text", "text": instruction})
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return _FALLBACK_PROMPT.format(images=_FALLBACK_IMAGE * len(item.images), text=instruction)

    def _process(self, items: Sequence[Item]) -> Any:
        images = [image for item in items for image in item.load_images()]
        return self.processor(
            text=[self.text(item) for item in items], images=images or None, return_tensors="pt", padding=True
        )

    def lengths(self, items: Sequence[Item]) -> list[int]:
        """Tokens per item, from the processor alone (no forward)."""
        if not items:
            return []
        return [int(n) for n in self._process(items)["attention_mask"].sum(dim=1).tolist()]

    def prepare(self, items: Sequence[Item]) -> dict[str, Any]:
        inputs = self._process(items)
        tensors = {k: v for k, v in inputs.items() if k in self._accepts and hasattr(v, "to")}
        if self.device.type == "cuda":
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return {"items": list(items), "inputs": tensors}

    # ------------------------------------------------------------- forward

    def compute(self, prepared: dict[str, Any]) -> Any:
        import torch

        inputs = {k: v.to(self.device, non_blocking=True) for k, v in prepared["inputs"].items()}
        mask = inputs["attention_mask"]
        want_layers = self.layer != -1
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _null()
        with torch.inference_mode(), autocast:
            out = self._backbone(**inputs, use_cache=False, output_hidden_states=want_layers, return_dict=True)
        hidden = out.hidden_states[self.layer] if want_layers else out.last_hidden_state
        out_dtype = getattr(torch, self.dtype)
        if self.pooling == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden.float() * weights.float()).sum(1) / weights.float().sum(1).clamp_min(1)
            return pooled.to(out_dtype).cpu()
        if self.pooling == "last":
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * mask.bool()).amax(dim=1)
            return hidden[torch.arange(len(hidden), device=hidden.device), last].to(out_dtype).cpu()
        rows = hidden.to(out_dtype).cpu()
        keep = mask.bool().cpu()
        return [rows[i][keep[i]] for i in range(len(rows))]


def _plain_size(size: Any) -> Any:
    """An image processor's size setting as plain JSON (SizeDict or dict, None fields dropped)."""
    if size is None:
        return None
    items = dict(size) if isinstance(size, dict) else getattr(size, "__dict__", None)
    if items is None:
        return str(size)
    return {k: v for k, v in items.items() if v is not None and not k.startswith("_")}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
