"""The engine of ``ingest pt-cache|vggt``: plan, create the families, write in parallel, report, verify.

Two ways to a plan (:class:`Planned`):

* :func:`plan_named`: a legacy cache whose file names give every key, planned from
  the names (:mod:`vlastore.ingest.names`) plus a sample of files for shape and dtype;
  the parent keeps one byte per row and nothing per file;
* :func:`plan_listed`: any other source (VGGT caches, keys inside files, a mapping,
  ragged families, ``--full-scan``/``--dry-run``/``--strict``): the file list, and
  every file read first unless its name gives its key (a fast scan).

:func:`run` then writes: worker parts own whole shards (:mod:`vlastore.ingest.shardwork`)
and read their rows' files themselves; the parent only adds up their counts.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ..format import FamilySpec, FormatError, validate_name
from ..store import EpisodeData, VLAStore
from .names import NameListing, sample_rows
from .output import open_or_create_store, store_usage
from .plan import (
    ONLY_TENSOR,
    CatalogPlan,
    FamilyPlan,
    Item,
    ScannedFile,
    core_shape,
    distinct_files,
    estimate_size,
    plan_catalog,
    plan_families,
)
from .report import IngestError, IngestReport, IngestUsageError, Problem, ProblemLog
from .scan import Listing, inspect_pt
from .shardwork import FamilyWork, PartResult, WriteJob, load_value, verify_part, write_part
from .source import file_size
from .workers import parallel_map, run_parts

if TYPE_CHECKING:
    from .options import IngestOptions

__all__ = [
    "Planned",
    "Placer",
    "plan_listed",
    "plan_named",
    "run",
    "outside_problems",
    "FAST_SCAN_NOTE",
    "PARTS_PER_WORKER",
    "store_catalog",
]

Placer = Callable[[list[ScannedFile]], tuple[list[Item], dict[tuple[str, int], str], list[Problem]]]

FAST_SCAN_NOTE = (
    "fast scan: keys from file names, shape and dtype from a sample of files; each file is fully "
    "checked while it is written (--full-scan checks all before writing)"
)

PARTS_PER_WORKER = 8
"""Parts of the shards per worker process: a slow worker (a busy core) leaves its later parts to the others."""

SAMPLE_FILES = 64
"""Files read to fix a fast scan's shape and dtype."""


@dataclass
class Planned:
    """A plan, and what the report says about the sources before anything is written."""

    catalog: CatalogPlan
    plans: list[FamilyPlan]
    problems: ProblemLog
    files_found: int
    source_bytes: int | None
    """None: the workers add up the sizes of the files they read (plans made from names)."""
    notes: list[str] = field(default_factory=list)


def outside_problems(outside: list[tuple[str, str]]) -> list[Problem]:
    return [
        Problem(
            p,
            "outside-source",
            f"{p}: symbolic link to {t}, outside the source folder; not read (--skip-outside-links)",
        )
        for p, t in outside
    ]


def store_catalog(options: IngestOptions) -> tuple[list[str], np.ndarray] | None:
    """``(names, steps)`` of the ``--into`` store's catalog; None for a new store."""
    if not options.into:
        return None
    existing = VLAStore.open(options.into)
    return list(existing.catalog.names), existing.catalog.steps


# ----------------------------------------------------------------- plans


def plan_named(named: NameListing, options: IngestOptions, family: str, vlm_reuse_count: int) -> Planned | None:
    """The plan of a cache planned from its names; None when a sample of its files does not fix one shape."""
    sources = named.sources
    assumed = _sample_shape(sources.paths(sample_rows(sources.has_source, SAMPLE_FILES)), options.max_file_bytes)
    if assumed is None:
        return None
    validate_name(family, "family name")
    shape, dtype = assumed
    spec = FamilySpec(
        shape,
        dtype,
        ragged=False,
        index_name="vlm_idx",
        vlm_reuse_count=vlm_reuse_count,
        allow_nonfinite=options.allow_nonfinite,
        compression=options.compression,
        rows_per_shard=options.rows_per_shard,
        has_keys=False,
    )
    plan = FamilyPlan(family, ONLY_TENSOR, spec, named.catalog.items.copy(), sources)
    return Planned(named.catalog, [plan], named.problems, named.found, None, [FAST_SCAN_NOTE])


def plan_listed(
    listing: Listing,
    place: Placer,
    options: IngestOptions,
    family: str,
    index_name: str,
    vlm_reuse_count: int | None,
    keyed: bool,
    rows_by_count: bool = False,
) -> Planned:
    """The plan of listed source files: a fast scan when names give every key, else every file read first."""
    paths, skipped = listing.paths, []
    if options.skip_outside_links and listing.outside:
        outside = {p for p, _ in listing.outside}
        paths = [p for p in paths if p not in outside]
        skipped = outside_problems(listing.outside)
    notes = []
    fast = None if options.full_scan or options.dry_run or options.strict else _fast_scan(paths, place, options)
    if fast is not None:
        files, items, row_keys, problems = fast
        notes.append(FAST_SCAN_NOTE)
    else:
        inspect = functools.partial(inspect_pt, max_bytes=options.max_file_bytes)
        with tqdm(total=len(paths), unit="file", desc="scan", disable=not options.progress or None) as bar:
            files = list(parallel_map(inspect, paths, options.n_workers, bar.update))
        items, row_keys, problems = place(files)
    catalog = plan_catalog(items, store_catalog(options), vlm_reuse_count, rows_by_count)
    plans, family_problems = plan_families(
        files,
        items,
        catalog,
        family,
        index_name=index_name,
        vlm_reuse_count=vlm_reuse_count,
        layout=options.layout,
        allow_nonfinite=options.allow_nonfinite,
        compression=options.compression,
        rows_per_shard=options.rows_per_shard,
        keyed=keyed,
        row_keys=row_keys,
    )
    log = ProblemLog()
    log.extend(skipped + problems + family_problems)
    return Planned(catalog, plans, log, len(files) + len(skipped), sum(f.nbytes for f in files), notes)


def _sample_shape(paths: list[str], max_bytes: int) -> tuple[tuple[int, ...], str] | None:
    """``(core shape, dtype)`` of the one tensor 3 in 4 of the sampled files hold; None when they do not agree.

    A ragged family needs every row's length before writing, so files that differ
    (or hold several tensors) call for a full scan.
    """
    seen = [inspect_pt(path, max_bytes) for path in paths]
    good = [s for s in seen if s.problem is None]
    if not good or any(len(s.tensors) != 1 for s in good):
        return None
    kinds = Counter((core_shape(shape), dtype) for s in good for shape, dtype, _ in s.tensors.values())
    (shape, dtype), count = kinds.most_common(1)[0]
    if count * 4 < len(good) * 3:  # no clear fixed shape: maybe ragged, which needs every length
        return None
    return shape, dtype


def _fast_scan(
    paths: list[str], place: Placer, options: IngestOptions
) -> tuple[list[ScannedFile], list[Item], dict[tuple[str, int], str], list[Problem]] | None:
    """Plan listed files without reading each, when their names give every key and a sample agrees on one shape.

    Returns None when a full scan is needed: a name gives no key (the key is
    inside the file), or :func:`_sample_shape` finds no clear shape. Files that
    differ from the sample's shape are skipped while writing, with the same
    reasons a full scan gives.
    """
    files = [ScannedFile(p, file_size(p)) for p in paths]
    items, row_keys, problems = place(files)
    if problems or not items:
        return None
    picks = sorted({int(i) for i in np.linspace(0, len(items) - 1, min(SAMPLE_FILES, len(items)))})
    assumed = _sample_shape([files[items[i].file].path for i in picks], options.max_file_bytes)
    if assumed is None:
        return None
    shared = {"": (*assumed, True)}  # one shared dict: a million files cost no more
    for sf in files:
        sf.tensors = shared  # type: ignore[assignment]  # checked for real while writing
    return files, items, row_keys, problems


# ----------------------------------------------------------------- run


def run(
    source: str,
    kind: str,
    planned: Planned,
    options: IngestOptions,
    notes: list[str],
    outside: list[tuple[str, str]],
    started: float,
) -> IngestReport:
    """Write the plan into the store (unless a dry run) and report what was done.

    Raises:
        IngestError: ``--strict`` with problems, a failed write. IngestUsageError: the plan
            differs from the one of an earlier run that created the family.
    """
    report = IngestReport(
        source=source, store=options.target, kind=kind, dry_run=options.dry_run, notes=notes + planned.notes
    )
    report.outside_links = [f"{p} -> {t}" for p, t in outside]
    report.store_before = store_usage(options.target)
    report.store_after = dict(report.store_before)
    _report_plan(report, planned, options)
    if options.strict and report.problem_count:
        raise IngestError(
            f"--strict: {report.problem_count} problem(s) in {source}; nothing written", report.problems, report
        )
    if options.dry_run or not planned.plans or not planned.catalog.names:
        report.seconds = time.perf_counter() - started
        return report
    store = _prepare_store(options, planned.catalog)
    _add_families(store, planned.plans, options)
    job = WriteJob(
        store.location,
        [FamilyWork(p.name, p.entry, p.spec, p.sources) for p in planned.plans],
        max_file_bytes=options.max_file_bytes,
        repair=options.repair,
    )
    parts = _parts(store, planned.plans, options.n_workers)
    write_problems = _write(report, store, planned, job, options, parts)
    _finish_report(report, store, planned.plans, job)
    if options.verify:
        report.verify = _verify(job, options, parts, sum(p.rows_with_source for p in planned.plans))
    report.seconds = time.perf_counter() - started
    if options.strict and write_problems:
        raise IngestError(f"--strict: {write_problems} file(s) changed during ingestion", report.problems, report)
    return report


def _report_plan(report: IngestReport, planned: Planned, options: IngestOptions) -> None:
    catalog, plans = planned.catalog, planned.plans
    report.files_found = planned.files_found
    report.add_problems(planned.problems)
    if planned.source_bytes is not None:
        report.source_bytes = planned.source_bytes
    else:  # plans made from names know no sizes: the workers count their rows' files, here the others
        report.source_bytes = sum(file_size(p.path) for p in report.problems if p.reason != "outside-source")
    report.episodes, report.steps = len(catalog.names), int(catalog.steps.sum())
    report.episode_rows = {n: int(r) for n, r in zip(catalog.names, catalog.items.tolist(), strict=True)}
    report.families = {p.name: p.summary() for p in plans}
    report.files_usable = distinct_files(plans)
    for p in plans:
        nbytes, nfiles = estimate_size(p)
        report.estimated_bytes += nbytes
        report.estimated_files += nfiles
    if not options.into:
        report.estimated_files += 8  # catalog arrays and group metadata


def _prepare_store(options: IngestOptions, catalog: CatalogPlan) -> VLAStore:
    if options.into:
        return VLAStore.open(options.into, writable=True)
    episodes = [EpisodeData(n, steps=int(s)) for n, s in zip(catalog.names, catalog.steps.tolist(), strict=True)]
    store, _ = open_or_create_store(str(options.out), episodes, format_version=options.format_version)
    return store


def _add_families(store: VLAStore, plans: list[FamilyPlan], options: IngestOptions) -> None:
    for p in plans:
        existed = p.name in store.families
        try:
            store.add_family(p.name, p.spec, p.items_per_episode, p.lengths, options.producer, p.keys)
        except FormatError as exc:
            if not existed:
                raise IngestError(f"family {p.name!r}: {exc}") from None
            raise IngestUsageError(
                f"{exc}. The plan of this run differs from the earlier run that created the family: the source "
                "files or the options (--layout, --rows-per-shard, --vlm-reuse-count) changed. Rerun with the "
                "same ones, or use --family NEW_NAME"
            ) from None


def _parts(store: VLAStore, plans: list[FamilyPlan], workers: int) -> int:
    """How many parts to cut the shards into: one in-process, else a few per worker (never more than shards)."""
    if workers <= 1:
        return 1
    shards = max(store.layout(p.name).n_shards for p in plans)
    return max(1, min(shards, workers * PARTS_PER_WORKER))


def _sorted(log: ProblemLog) -> ProblemLog:
    log.listed.sort(key=lambda p: (p.path, p.reason))  # parts finish in any order: the report does not
    return log


def _write(
    report: IngestReport, store: VLAStore, planned: Planned, job: WriteJob, options: IngestOptions, parts: int
) -> int:
    """Write every pending row; returns how many problems the workers found."""
    pending = 0
    for p in planned.plans:
        done = int(np.count_nonzero(store.coverage(p.name) & p.sources.has_source))
        report.rows_already_done += done
        pending += p.rows_with_source - done
    with tqdm(total=pending, unit="file", desc="write", disable=not options.progress or None) as bar:
        results = run_parts(write_part, job, parts, options.n_workers, "write", bar.update)
    log = ProblemLog()
    for result in results:
        log.merge(result.problems)
        report.rows_written += result.rows_written
        if planned.source_bytes is None:
            report.source_bytes += result.source_bytes
    report.add_problems(_sorted(log))
    return len(log)


def _finish_report(report: IngestReport, store: VLAStore, plans: list[FamilyPlan], job: WriteJob) -> None:
    reported = {p.path for p in report.problems}
    masks = []
    for p in plans:
        present = store.coverage(p.name)
        masks.append(present)
        fam = report.families[p.name]
        fam["rows_present"] = int(np.count_nonzero(present))
        fam["coverage"] = float(present.mean()) if present.size else 1.0
        if not report.problems_unlisted:  # past the listing limit a re-read would count problems twice
            report.add_problems(_holes(store, p, present, reported, job))
    report.files_ingested = distinct_files(plans, masks)
    report.store_after = store_usage(store.location)


def _holes(store: VLAStore, plan: FamilyPlan, present: np.ndarray, reported: set[str], job: WriteJob) -> list[Problem]:
    """Why rows are missing from written shards (an earlier run skipped their files): their files read again.

    Rows of shards not written (left for a rerun after a transient error) are not skipped files.
    """
    layout = store.layout(plan.name)
    written = np.zeros(layout.n_shards, dtype=bool)
    written[store.written_shards(plan.name)] = True
    holes = np.flatnonzero(~present & plan.sources.has_source)
    holes = holes[written[layout.shard_of(holes)]]
    problems = []
    for row, path in zip(holes.tolist(), plan.sources.paths(holes), strict=True):
        if path in reported:
            continue
        _, problem = load_value(path, plan.entry, plan.spec, int(layout.lengths[row]), job.max_file_bytes)
        problems.append(
            problem
            or Problem(
                path,
                "changed",
                f"{path}: was skipped when its shard was written by an earlier run and reads "
                "fine now; rerun the same command to add it (or ingest into a new --family)",
            )
        )
        reported.add(path)
    return problems


def _verify(job: WriteJob, options: IngestOptions, parts: int, total: int) -> dict[str, Any]:
    with tqdm(total=total, unit="file", desc="verify", disable=not options.progress or None) as bar:
        results: list[PartResult] = run_parts(verify_part, job, parts, options.n_workers, "verify", bar.update)
    mismatches = sorted(m for r in results for m in r.mismatches)
    count = sum(r.mismatch_count for r in results)
    return {
        "rows_checked": sum(r.rows_checked for r in results),
        "rows_missing": sum(r.rows_missing for r in results),
        "mismatches": mismatches,
        "mismatch_count": count,
        "ok": count == 0,
    }
