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
from collections.abc import Callable
from typing import Any

from .extractor import ExtractorError, FeatureExtractor, FunctionExtractor, Item

__all__ = [
    "Item",
    "FeatureExtractor",
    "FunctionExtractor",
    "register_extractor",
    "get_extractor",
    "available_extractors",
    "ExtractorError",
]


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
