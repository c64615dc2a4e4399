"""What an ingestion found and did: problems, the plan summary and the final report."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Problem",
    "ProblemLog",
    "IngestError",
    "IngestUsageError",
    "IngestReport",
    "REASONS",
    "MAX_PROBLEMS_LISTED",
    "human_bytes",
    "describe_failure",
    "printable",
]

MAX_PROBLEMS_LISTED = 10_000
"""Problems listed one by one in a report; beyond, they are counted by reason (a million bad files cost no memory)."""

REASONS: dict[str, str] = {
    "not-zip": "not a zip archive (not written by torch.save >= 1.6)",
    "truncated": "truncated file",
    "corrupt": "damaged file (bad CRC, bad zip entry or unreadable pickle)",
    "unsafe-pickle": "loading it would run pickled code; never executed",
    "unreadable": "cannot be read (permissions, I/O error)",
    "not-a-regular-file": "a FIFO, socket, device or directory, not a file; never opened for reading",
    "dangling-symlink": "a symbolic link to nothing",
    "symlink-loop": "a loop of symbolic links",
    "outside-source": "a symbolic link leading outside the source folder (skipped by --skip-outside-links)",
    "too-large": "bigger than a limit (--max-file-size) or declaring more data than it holds",
    "transient-error": "an I/O error that may pass (EIO, EAGAIN, ESTALE, ...) persisted over retries; rerun",
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
    "bad-metadata": "its <episode>.json is not a JSON object with a text 'task' and a positive 'fps'",
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


class ProblemLog:
    """Problems as found: the first ``limit`` listed, the rest counted by reason."""

    def __init__(self, limit: int = MAX_PROBLEMS_LISTED) -> None:
        self.limit = limit
        self.listed: list[Problem] = []
        self.unlisted: Counter[str] = Counter()

    def add(self, problem: Problem) -> None:
        if len(self.listed) < self.limit:
            self.listed.append(problem)
        else:
            self.unlisted[problem.reason] += 1

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.add(problem)

    def merge(self, other: ProblemLog) -> None:
        self.extend(other.listed)
        self.unlisted.update(other.unlisted)

    def __len__(self) -> int:
        return len(self.listed) + sum(self.unlisted.values())


class IngestError(RuntimeError):
    """Ingestion stopped on a data problem: ``--strict`` with problems, nothing usable, a failed worker (exit 1)."""

    def __init__(self, message: str, problems: list[Problem] | None = None, report: IngestReport | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []
        self.report = report
        """The report so far (e.g. the plan that ``--strict`` refused), for ``--report-json``."""


class IngestUsageError(IngestError):
    """The command asks for something that cannot be done as given; the message names the fix (exit 2)."""


_FIXES = {
    errno.ENOSPC: "free some space (or write elsewhere) and rerun the same command: finished shards are kept",
    errno.EDQUOT: "the disk quota is exhausted: free some space and rerun the same command",
    errno.EFBIG: "a file-size limit (ulimit -f) stopped the write: raise it and rerun the same command",
    errno.EROFS: "the store is on a read-only filesystem: write to a writable place",
    errno.EACCES: "no permission to write there: fix the permissions or write elsewhere",
    errno.EPERM: "no permission to write there: fix the permissions or write elsewhere",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun the same command",
}


def describe_failure(exc: BaseException, where: str = "") -> str:
    """One line saying what failed, where, and what to do; no traceback."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        path = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror or exc} [{name}]{path}"
        fix = _FIXES.get(exc.errno, "rerun the same command once the cause is fixed: finished shards are kept")
        return f"{where}{': ' if where else ''}{text}; {fix}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if type(exc).__name__ in ("OwnershipError", "IngestError", "FormatError", "ChecksumError"):
        return f"{where}{': ' if where else ''}{message}"
    return (
        f"{where}{': ' if where else ''}{type(exc).__name__}: {message[:300]} (unexpected: set VLASTORE_DEBUG=1 "
        "for a traceback and report it)"
    )


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as ``\\xff``, safe to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
    files_usable: int = 0
    """Files the plan takes a row from (before writing; what a dry run can promise)."""
    files_ingested: int = 0
    source_bytes: int = 0
    episodes: int = 0
    steps: int = 0
    episode_rows: dict[str, int] = field(default_factory=dict)
    """Episode -> rows of the ingested family (steps, for robot data)."""
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: dict[str, list[str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    """Every problem, or the first :data:`MAX_PROBLEMS_LISTED` of them (the rest are in ``problems_unlisted``)."""
    problems_unlisted: dict[str, int] = field(default_factory=dict)
    """Reason -> problems found beyond the listed ones."""
    notes: list[str] = field(default_factory=list)
    outside_links: list[str] = field(default_factory=list)
    """``path -> target`` of every symbolic link (or HDF5 external link) leading outside the source."""
    store_before: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "files": 0})
    store_after: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "files": 0})
    estimated_bytes: int = 0
    estimated_files: int = 0
    rows_written: int = 0
    rows_already_done: int = 0
    seconds: float = 0.0
    verify: dict[str, Any] | None = None

    def add_problems(self, problems: Iterable[Problem] | ProblemLog) -> None:
        """List ``problems`` (up to :data:`MAX_PROBLEMS_LISTED` in all), count the rest by reason."""
        log = ProblemLog(max(0, MAX_PROBLEMS_LISTED - len(self.problems)))
        if isinstance(problems, ProblemLog):
            log.merge(problems)
        else:
            log.extend(problems)
        self.problems.extend(log.listed)
        unlisted = Counter(self.problems_unlisted)
        unlisted.update(log.unlisted)
        self.problems_unlisted = dict(unlisted)

    @property
    def problem_count(self) -> int:
        return len(self.problems) + sum(self.problems_unlisted.values())

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        counts = Counter(p.reason for p in self.problems)
        counts.update(self.problems_unlisted)
        return dict(counts.most_common())

    @property
    def files_skipped(self) -> int:
        """Files with a problem (each unlisted problem counted as one file)."""
        return len({p.path for p in self.problems}) + sum(self.problems_unlisted.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        out["skipped_by_reason"] = self.skipped_by_reason
        out["files_skipped"] = self.files_skipped
        out["failure"] = self.failure()
        return out

    def failure(self) -> str | None:
        """Why this run counts as failed (``vlastore ingest`` exits 1), with the fix; None when it did its job."""
        if self.verify is not None and not self.verify["ok"]:
            return (
                f"verify failed: {len(self.verify['mismatches']):,} stored value(s) differ from their source; "
                "see the MISMATCH lines"
            )
        transient = [p for p in self.problems if p.reason == "transient-error"]
        count = len(transient) + self.problems_unlisted.get("transient-error", 0)
        if count:
            example = f" (e.g. {transient[0].path})" if transient else ""
            return printable(
                f"{count:,} file(s) could not be read because of I/O errors that may pass{example}; "
                "rerun the same command to retry them: finished shards are kept"
            )
        if (self.files_usable if self.dry_run else self.files_ingested) == 0:
            return printable(f"nothing {'would be' if self.dry_run else 'was'} ingested: {self._why_nothing()}")
        return None

    def _why_nothing(self) -> str:
        if not self.files_found:
            return {
                "pt-cache": f"no .pt files in {self.source}; give the folder that holds the {{dataset}}_vlm{{idx}}.pt "
                "files",
                "vggt": f"no *.vggt_cache.pt files under {self.source}; give the data root that holds one folder of "
                "images (and their caches) per episode",
            }.get(self.kind, f"no source files found in {self.source}")
        if not self.problem_count:
            return f"no file gave a usable row for {self.store}"
        reason, count = next(iter(self.skipped_by_reason.items()))
        examples = ", ".join(os.path.basename(p.path) for p in self.problems if p.reason == reason)
        examples = examples if len(examples) < 120 else examples[:117] + "..."
        hint = {
            "unmatched-name": "have names that do not match the pattern {dataset}_vlm{idx}.pt and hold no "
            "dataset/vlm_idx metadata: give --mapping CSV (columns file,dataset,vlm_idx) or "
            "--pattern REGEX",
            "no-mapping-row": "are not in the --mapping CSV and hold no dataset/vlm_idx metadata: add rows "
            "file,dataset,vlm_idx for them",
            "unknown-episode": f"belong to episodes that are not in the catalog of {self.store}: ingest their robot "
            "data first, or use --out NEW_STORE for a feature-only store",
            "index-out-of-range": "have indexes past their episode's rows: check --vlm-reuse-count (or the names)",
            "no-tensor": "hold no float tensor",
            "bad-series": "do not parse as robot data or disagree with the other episodes",
        }.get(reason, f"were skipped as {reason} ({REASONS.get(reason, '')})")
        others = self.problem_count - count
        return (
            f"{count:,} file(s) {hint} (e.g. {examples})"
            + (f"; {others:,} more skipped for other reasons" if others else "")
            + "; see the problems above"
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON to a regular file (a FIFO there is refused, not waited on)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO nobody reads, a folder
                raise IngestUsageError(f"--report-json {path}: not a regular file; give a file path") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IngestUsageError(f"--report-json {path}: not a regular file; give a file path")
            os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
            f.write("\n")

    def format(self, max_problems: int = 20) -> str:
        """Human-readable report (plan for a dry run, results otherwise)."""
        lines = [
            f"{'DRY RUN: nothing written. ' if self.dry_run else ''}{self.kind} ingest of {self.source} -> {self.store}"
        ]
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
            shape = (
                "[L, " + ", ".join(map(str, fam["row_shape"])) + "]" if fam["ragged"] else str(list(fam["row_shape"]))
            )
            line = (
                f"  family {name}: {fam['rows']:,} rows of {shape} {fam['dtype']}, "
                f"{fam['rows_with_source']:,} with a source file"
            )
            if "rows_present" in fam:
                line += f", {fam['rows_present']:,} stored ({fam['coverage']:.1%} coverage)"
            lines.append(line)
        if self.dry_run:
            what = "added to the store" if self.store_before["files"] else "of the new store"
            lines.append(
                f"  estimated size {what}: {human_bytes(self.estimated_bytes)} in about {self.estimated_files:,} files"
            )
        else:
            rate = self.files_ingested / self.seconds if self.seconds else 0.0
            line = f"  files ingested: {self.files_ingested:,}, skipped: {self.files_skipped:,}"
            if self.families:
                line += (
                    f"; rows written now: {self.rows_written:,}, already done by an earlier run: "
                    f"{self.rows_already_done:,}"
                )
            lines.append(line)
            lines.append(
                f"  store before: {human_bytes(self.store_before['bytes'])} in {self.store_before['files']:,} "
                f"files; after: {human_bytes(self.store_after['bytes'])} in "
                f"{self.store_after['files']:,} files"
            )
            lines.append(f"  time: {self.seconds:.1f} s ({rate:,.0f} files/s)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.problem_count:
            counts = ", ".join(f"{reason}: {n:,}" for reason, n in self.skipped_by_reason.items())
            lines.append(f"  problems ({self.problem_count:,}; {counts}):")
            for p in self.problems[:max_problems]:
                lines.append(f"    {p}")
            if self.problem_count > max_problems:
                listed = f"; it lists the first {len(self.problems):,}" if self.problems_unlisted else ""
                lines.append(f"    ... {self.problem_count - max_problems:,} more (see --report-json{listed})")
        else:
            lines.append("  problems: none")
        if self.verify is not None:
            v = self.verify
            lines.append(
                f"  verify: {v['rows_checked']:,} rows compared bit-exactly with their sources, "
                f"{len(v['mismatches'])} mismatches -> {'OK' if v['ok'] else 'FAILED'}"
            )
            for m in v["mismatches"][:max_problems]:
                lines.append(f"    MISMATCH {m}")
        return printable("\n".join(lines))
