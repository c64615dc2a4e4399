"""``vlastore.reader``, where :class:`FeatureReader` and its errors were first published: kept for imports
written against it. The reader lives in :mod:`vlastore.read`."""

from __future__ import annotations

from .read import ARENA_MAX_ROWS, VERIFY_MODES, FeatureReader, MissingRowError, StaleGenerationError, to_tensor

__all__ = ["FeatureReader", "MissingRowError", "StaleGenerationError", "VERIFY_MODES", "ARENA_MAX_ROWS", "to_tensor"]
