"""Compute feature families with a model, on one or many GPUs, and rebuild them during training.

Entry points: :func:`build_features` (plan + compute, resumable, ``torchrun``-aware),
:func:`rebuild_features` (a new generation from a live model, switched in atomically),
the extractor registry (:func:`get_extractor`, :func:`register_extractor`) and
:func:`model_fingerprint`. The command line is ``vlastore build-features``.
"""

from __future__ import annotations

from .build import BuildStats, FeatureMismatchError, build_features, compute_rows
from .fingerprint import model_fingerprint, state_dict_fingerprint
from .rebuild import RebuildResult, rebuild_features
from .registry import (
    ExtractorError,
    FeatureExtractor,
    FunctionExtractor,
    Item,
    available_extractors,
    get_extractor,
    register_extractor,
)
from .source import DataFolder

__all__ = [
    "BuildStats",
    "DataFolder",
    "ExtractorError",
    "FeatureExtractor",
    "FeatureMismatchError",
    "FunctionExtractor",
    "Item",
    "RebuildResult",
    "available_extractors",
    "build_features",
    "compute_rows",
    "get_extractor",
    "model_fingerprint",
    "rebuild_features",
    "register_extractor",
    "state_dict_fingerprint",
]
