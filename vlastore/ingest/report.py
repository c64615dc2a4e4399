"""What an ingestion found and did: problems, the plan summary and the final report."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Problem", "IngestError", "IngestReport", "REASONS", "human_bytes"]

REASONS: dict[str, str] = {
    "not-zip": "not a zip archive (not written by torch.save >= 1.6)",
    "truncated": "truncated file",
    "corrupt": "damaged file (bad CRC, bad zip entry or unreadable pickle)",
    "unsafe-pickle": "loading it would run pickled code; never executed",
    "unreadable": "cannot be read (permissions, I/O error)",
    "no-tensor": "holds no float tensor",
    "wrong-shape": "shape differs from its family",
    "wrong-dtype": "dtype differs from its family",
    "nonfinite": "holds NaN or Inf",
    "duplicate-key": "same (episode, index) as another file",
    "unmatched-name": "file name matches no pattern and the file holds no key metadata",
    "no-mapping-row": "not listed in the mapping file",
    "unknown-episode": "episode not in the store's catalog",
    "index-out-of-range": "index beyond the episode's rows",
    "bad-name": "episode name not usable as a store name",
    "bad-series": "robot data file that cannot be parsed or is inconsistent",
    "changed": "file changed between the scan and the write, or since an earlier run skipped it",
}
"""Reason code -> what it means; every skipped file carries one."""


@dataclass(frozen=True)
class Problem:
    """A source file (or entry in it) that is skipped, and why."""

    path: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"[{self.reason}] {self.message}"


class IngestError(RuntimeError):
    """Ingestion stopped: ``--strict`` with problems, a plan that disagrees with the store, a failed worker."""

    def __init__(self, message: str, problems: list[Problem] | None = None,
                 report: IngestReport | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []
        self.report = report
        """The report so far (e.g. the plan that ``--strict`` refused), for ``--report-json``."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class IngestReport:
    """Everything ``vlastore ingest`` prints at the end (and writes with ``--report-json``)."""

    source: str
    store: str
    kind: str
    dry_run: bool = False
    files_found: int = 0
    files_ingested: int = 0
    source_bytes: int = 0
    episodes: int = 0
    steps: int = 0
    episode_rows: dict[str, int] = field(default_factory=dict)
    """Episode -> rows of the ingested family (steps, for robot data)."""
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: dict[str, list[str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    store_before: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "files": 0})
    store_after: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "files": 0})
    estimated_bytes: int = 0
    estimated_files: int = 0
    rows_written: int = 0
    rows_already_done: int = 0
    seconds: float = 0.0
    verify: dict[str, Any] | None = None

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.problems).most_common())

    @property
    def files_skipped(self) -> int:
        return len({p.path for p in self.problems})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        out["skipped_by_reason"] = self.skipped_by_reason
        out["files_skipped"] = self.files_skipped
        return out

    def write_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
            f.write("\n")

    def format(self, max_problems: int = 20) -> str:
        """Human-readable report (plan for a dry run, results otherwise)."""
        lines = [f"{'DRY RUN: nothing written. ' if self.dry_run else ''}{self.kind} ingest of {self.source}"
                 f" -> {self.store}"]
        lines.append(f"  source files: {self.files_found:,} ({human_bytes(self.source_bytes)})")
        lines.append(f"  episodes: {self.episodes:,}, steps: {self.steps:,}")
        if self.episode_rows:
            what = "steps" if self.kind == "robot" else "rows"
            shown = ", ".join(f"{name} ({n:,} {what})" for name, n in list(self.episode_rows.items())[:4])
            more = f", ... ({len(self.episode_rows) - 4:,} more)" if len(self.episode_rows) > 4 else ""
            lines.append(f"    {shown}{more}")
        for key, columns in self.series.items():
            shown = ", ".join(columns[:8]) + (f", ... ({len(columns)} columns)" if len(columns) > 8 else "")
            lines.append(f"  series {key}: {shown}")
        for name, fam in self.families.items():
            shape = "[L, " + ", ".join(map(str, fam["row_shape"])) + "]" if fam["ragged"] else str(
                list(fam["row_shape"]))
            line = (f"  family {name}: {fam['rows']:,} rows of {shape} {fam['dtype']}, "
                    f"{fam['rows_with_source']:,} with a source file")
            if "rows_present" in fam:
                line += f", {fam['rows_present']:,} stored ({fam['coverage']:.1%} coverage)"
            lines.append(line)
        if self.dry_run:
            what = "added to the store" if self.store_before["files"] else "of the new store"
            lines.append(f"  estimated size {what}: {human_bytes(self.estimated_bytes)} in about "
                         f"{self.estimated_files:,} files")
        else:
            rate = self.files_ingested / self.seconds if self.seconds else 0.0
            line = f"  files ingested: {self.files_ingested:,}, skipped: {self.files_skipped:,}"
            if self.families:
                line += (f"; rows written now: {self.rows_written:,}, already done by an earlier run: "
                         f"{self.rows_already_done:,}")
            lines.append(line)
            lines.append(f"  store before: {human_bytes(self.store_before['bytes'])} in {self.store_before['files']:,} "
                         f"files; after: {human_bytes(self.store_after['bytes'])} in "
                         f"{self.store_after['files']:,} files")
            lines.append(f"  time: {self.seconds:.1f} s ({rate:,.0f} files/s)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.problems:
            counts = ", ".join(f"{reason}: {n:,}" for reason, n in self.skipped_by_reason.items())
            lines.append(f"  problems ({len(self.problems):,}; {counts}):")
            for p in self.problems[:max_problems]:
                lines.append(f"    {p}")
            if len(self.problems) > max_problems:
                lines.append(f"    ... {len(self.problems) - max_problems:,} more (see --report-json)")
        else:
            lines.append("  problems: none")
        if self.verify is not None:
            v = self.verify
            lines.append(f"  verify: {v['rows_checked']:,} rows compared bit-exactly with their sources, "
                         f"{len(v['mismatches'])} mismatches -> {'OK' if v['ok'] else 'FAILED'}")
            for m in v["mismatches"][:max_problems]:
                lines.append(f"    MISMATCH {m}")
        return "\n".join(lines)
