"""Options every ``vlastore ingest`` source shares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..format import Producer
from ..store import DEFAULT_FORMAT_VERSION
from .report import IngestUsageError
from .source import MAX_FILE_BYTES

__all__ = ["IngestOptions", "cpu_cores"]


@dataclass
class IngestOptions:
    """Options every ``vlastore ingest`` source shares.

    Exactly one of ``out`` (a new store, or one this same command started
    before) and ``into`` (an existing store, e.g. made by ``ingest robot``) is given.
    """

    out: str | None = None
    into: str | None = None
    workers: int = 0
    """Worker processes; 0 means one per CPU core."""
    dry_run: bool = False
    strict: bool = False
    verify: bool = False
    allow_nonfinite: bool = False
    layout: str = "auto"
    compression: str | None = None
    rows_per_shard: int = 0
    producer: Producer = field(default_factory=Producer)
    progress: bool = True
    full_scan: bool = False
    """Read every file before writing (implied by ``dry_run`` and ``strict``); else names and a sample plan."""
    format_version: int = DEFAULT_FORMAT_VERSION
    """Format of a store made with ``--out`` (default: the library's ``DEFAULT_FORMAT_VERSION``): 2 is a living
    store (appends, episode metadata), 1 the older write-once format."""
    replace: bool = False
    """``ingest robot --into``: swap episodes already in the store whose data differ (else they are refused)."""
    repair: bool = False
    """Also rewrite rows whose checksum fails (as ``vlastore verify`` reports them) from their source files."""
    max_file_bytes: int = MAX_FILE_BYTES
    """Source files bigger than this are skipped (``too-large``) unread."""
    skip_outside_links: bool = False
    """Skip (``outside-source``) symbolic links that lead outside the source folder, instead of reading them."""

    @property
    def target(self) -> str:
        if (self.out is None) == (self.into is None):
            raise IngestUsageError(
                "give exactly one of --out STORE (create) and --into STORE (add to an existing store)"
            )
        return str(self.out or self.into)

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers > 0 else cpu_cores()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
