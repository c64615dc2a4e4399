"""Reading feature rows: :class:`FeatureReader` (:mod:`.reader`) over the shard sources of :mod:`.sources`."""

from __future__ import annotations

from ..dtypes import to_tensor
from ..family import StaleGenerationError
from .reader import ARENA_MAX_ROWS, VERIFY_MODES, FeatureReader, MissingRowError

__all__ = ["FeatureReader", "MissingRowError", "StaleGenerationError", "VERIFY_MODES", "ARENA_MAX_ROWS", "to_tensor"]
