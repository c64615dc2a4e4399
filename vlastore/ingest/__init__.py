"""One-shot ingestion of existing data into a store: robot data, legacy ``.pt`` caches, VGGT caches.

``vlastore ingest robot|pt-cache|vggt`` (see docs/ingest.md). The library entry
points are :func:`ingest_robot`, :func:`ingest_pt_cache` and :func:`ingest_vggt`,
all driven by :class:`IngestOptions` and returning an :class:`IngestReport`.
"""

from __future__ import annotations

from .features import IngestOptions, ingest_pt_cache, ingest_vggt
from .ptfile import PtFileError, RawTensor, read_pt
from .report import IngestError, IngestReport, IngestUsageError, Problem
from .robot import ingest_robot
from .source import SourceError

__all__ = [
    "IngestOptions",
    "IngestReport",
    "IngestError",
    "IngestUsageError",
    "Problem",
    "PtFileError",
    "SourceError",
    "RawTensor",
    "ingest_pt_cache",
    "ingest_vggt",
    "ingest_robot",
    "read_pt",
]
