"""Feature extractors and the registry that names them.

An extractor turns a batch of :class:`Item` (the images of one step and the
instruction of its episode) into feature rows. The build loop (:mod:`.build`)
does the rest: planning rows, sharding work over ranks, batching, resuming and
writing. Plug in your own model the way numcodecs plugs in codecs::

    from vlastore.features import FeatureExtractor, register_extractor

    @register_extractor("my-encoder")
    class MyEncoder(FeatureExtractor):
        ...

or name a plain function ``images, instruction -> row`` as ``"my_module:encode"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..format import FamilySpec, Producer

__all__ = [
    "Item",
    "FeatureExtractor",
    "FunctionExtractor",
    "register_extractor",
    "get_extractor",
    "available_extractors",
    "ExtractorError",
]


class ExtractorError(ValueError):
    """An extractor id, option or output that cannot be used."""


@dataclass(frozen=True)
class Item:
    """One feature row to compute: the inputs of ``(dataset, index)``.

    ``index`` is the row's ``vlm_idx``; ``step = index * vlm_reuse_count`` is the
    step whose images are encoded.
    """

    dataset: str
    index: int
    step: int
    images: tuple[Path, ...]
    instruction: str

    def load_images(self) -> list[Any]:
        """The images as RGB ``PIL.Image`` objects (decoded now, file closed)."""
        from PIL import Image

        out = []
        for path in self.images:
            try:
                with Image.open(path) as image:
                    out.append(image.convert("RGB"))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"dataset {self.dataset!r} step {self.step}: image {path} does not exist; check "
                    "--data-root and --image-pattern (see docs/features.md)"
                ) from None
        return out


class FeatureExtractor:
    """Base class: what the build loop needs from a model.

    Subclasses set :attr:`row_shape`, :attr:`dtype`, :attr:`ragged` and implement
    :meth:`prepare` (CPU work, run in a background thread: decode, tokenise,
    pin) and :meth:`compute` (the forward). Ragged extractors also implement
    :meth:`lengths`, which must not need the model: rows are planned before any
    is computed.
    """

    row_shape: tuple[int, ...] = ()
    dtype: str = "float32"
    ragged: bool = False
    model_name: str = ""
    revision: str = ""

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the family's manifest (pooling, layer, ...)."""
        return {}

    def fingerprint(self) -> str:
        """Hash of the weights that produce the rows ("" when there are none)."""
        return ""

    def producer(self, fingerprint: str | None = None) -> Producer:
        fp = self.fingerprint() if fingerprint is None else fingerprint
        return Producer(self.model_name, self.revision, fp, self.params())

    def spec(self, vlm_reuse_count: int, rows_per_shard: int = 0, compression: str | None = None) -> FamilySpec:
        return FamilySpec(
            self.row_shape, self.dtype, ragged=self.ragged, vlm_reuse_count=vlm_reuse_count,
            rows_per_shard=rows_per_shard, compression=compression,
        )

    def lengths(self, items: Sequence[Item]) -> list[int]:
        """Token rows of each item, without running the model (ragged extractors only)."""
        raise NotImplementedError(f"{type(self).__name__} makes fixed rows; it has no lengths()")

    def prepare(self, items: Sequence[Item]) -> Any:
        """Load and preprocess a batch on the CPU; the result is passed to :meth:`compute`."""
        raise NotImplementedError

    def compute(self, prepared: Any) -> Any:
        """Rows for a prepared batch: ``[B, *row_shape]`` (or B arrays ``[L_i, *row_shape]``)."""
        raise NotImplementedError

    def batch_items(self, prepared: Any) -> Sequence[Item]:
        """The items a prepared batch was made from (used to split it after out-of-memory)."""
        return prepared["items"]


class FunctionExtractor(FeatureExtractor):
    """Wraps ``function(images: list[PIL.Image], instruction: str) -> row`` (numpy or torch).

    The row shape and dtype are taken from the function's output on the first
    item (``probe``). Fixed-shape rows only.
    """

    def __init__(self, function: Callable[[list[Any], str], Any], name: str = "") -> None:
        self.function = function
        self.model_name = name or f"{function.__module__}:{getattr(function, '__qualname__', 'function')}"

    def probe(self, item: Item) -> None:
        row = _as_numpy(self.function(item.load_images(), item.instruction))
        self.row_shape = tuple(row.shape)
        self.dtype = str(row.dtype) if str(row.dtype) != "uint16" else "bfloat16"

    def params(self) -> dict[str, Any]:
        return {"function": self.model_name}

    def prepare(self, items: Sequence[Item]) -> Any:
        return {"items": list(items), "images": [item.load_images() for item in items]}

    def compute(self, prepared: Any) -> Any:
        rows = [_as_numpy(self.function(images, item.instruction))
                for item, images in zip(prepared["items"], prepared["images"], strict=True)]
        return rows


def _as_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        return tensor.numpy()
    return np.asarray(value)


# ------------------------------------------------------------------ registry

ExtractorFactory = Callable[..., FeatureExtractor]
_REGISTRY: dict[str, ExtractorFactory] = {}


def register_extractor(extractor_id: str, factory: ExtractorFactory | None = None) -> Any:
    """Register ``factory(**options) -> FeatureExtractor`` under ``extractor_id``.

    Usable as a decorator (``@register_extractor("my-encoder")``) or a call.
    Re-registering an id replaces it (handy in notebooks).
    """
    if not extractor_id or ":" in extractor_id:
        raise ExtractorError(f"extractor id {extractor_id!r} must be non-empty and contain no ':'")

    def add(f: ExtractorFactory) -> ExtractorFactory:
        _REGISTRY[extractor_id] = f
        return f

    return add(factory) if factory is not None else add


def available_extractors() -> list[str]:
    """Registered extractor ids (built-ins first)."""
    _ensure_builtins()
    return list(_REGISTRY)


def get_extractor(extractor_id: str, **options: Any) -> FeatureExtractor:
    """An extractor by registered id, or by ``"module:attribute"``.

    ``module:attribute`` may name a :class:`FeatureExtractor` subclass (built with
    ``options``), a factory returning one, or a plain function
    ``images, instruction -> row`` (wrapped in :class:`FunctionExtractor`).

    Raises:
        ExtractorError: unknown id, or an attribute that is none of the above.
    """
    _ensure_builtins()
    if extractor_id in _REGISTRY:
        return _REGISTRY[extractor_id](**options)
    if ":" not in extractor_id:
        raise ExtractorError(
            f"unknown extractor {extractor_id!r}; registered: {sorted(_REGISTRY)}, or give "
            "'module:function' for your own"
        )
    module_name, _, attr = extractor_id.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ExtractorError(f"cannot load extractor {extractor_id!r}: {exc}; is the module on PYTHONPATH?") from None
    if isinstance(target, type) and issubclass(target, FeatureExtractor):
        return target(**options)
    if not callable(target):
        raise ExtractorError(f"{extractor_id!r} is a {type(target).__name__}, not a function or extractor class")
    if options:
        made = target(**options)
        if not isinstance(made, FeatureExtractor):
            raise ExtractorError(f"{extractor_id!r}(**options) returned {type(made).__name__}, not a FeatureExtractor")
        return made
    return FunctionExtractor(target, name=extractor_id)


def _ensure_builtins() -> None:
    if "transformers-vl" not in _REGISTRY:
        from .qwen import TransformersVLExtractor

        _REGISTRY.setdefault("transformers-vl", TransformersVLExtractor.load)
        _REGISTRY.setdefault("qwen-vl", TransformersVLExtractor.load)
