"""What an extractor is: :class:`Item` in, feature rows out (:class:`FeatureExtractor`), and its errors.

The registry (:mod:`.registry`) names extractors; the built-in ones (:mod:`.qwen`)
implement this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import tensor_to_numpy
from ..format import FamilySpec, Producer

__all__ = ["Item", "FeatureExtractor", "FunctionExtractor", "ExtractorError"]


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
            self.row_shape,
            self.dtype,
            ragged=self.ragged,
            vlm_reuse_count=vlm_reuse_count,
            rows_per_shard=rows_per_shard,
            compression=compression,
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
        rows = [
            _as_numpy(self.function(images, item.instruction))
            for item, images in zip(prepared["items"], prepared["images"], strict=True)
        ]
        return rows


def _as_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        return tensor_to_numpy(value)
    return np.asarray(value)
