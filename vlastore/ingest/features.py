"""Ingest feature caches (``.pt`` files) into a store: scan, plan, parallel write, report, verify."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..format import FormatError, Producer
from ..storage import StoreNotFoundError
from ..store import EpisodeData, VLAStore
from .plan import (
    CatalogPlan,
    FamilyPlan,
    Item,
    ScannedFile,
    core_shape,
    estimate_size,
    plan_catalog,
    plan_families,
)
from .report import IngestError, IngestReport, IngestUsageError, Problem
from .scan import (
    NAME_PATTERN,
    Listing,
    find_manifest,
    inspect_pt,
    list_pt_files,
    list_vggt_files,
    place_pt_cache,
    place_vggt,
    read_manifest,
    read_mapping,
)
from .source import MAX_FILE_BYTES, file_size
from .workers import FamilyWork, WriteJob, load_value, parallel_map, run_workers

__all__ = ["IngestOptions", "ingest_pt_cache", "ingest_vggt", "open_or_create_store", "store_usage", "cpu_cores"]

Placer = Callable[[list[ScannedFile]], tuple[list[Item], dict[tuple[str, int], str], list[Problem]]]


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
    repair: bool = False
    """Also rewrite rows whose checksum fails (as ``vlastore verify`` reports them) from their source files."""
    max_file_bytes: int = MAX_FILE_BYTES
    """Source files bigger than this are skipped (``too-large``) unread."""
    skip_outside_links: bool = False
    """Skip (``outside-source``) symbolic links that lead outside the source folder, instead of reading them."""

    @property
    def target(self) -> str:
        if (self.out is None) == (self.into is None):
            raise IngestUsageError("give exactly one of --out STORE (create) and --into STORE (add to an existing "
                                   "store)")
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


def store_usage(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{"bytes", "files"}`` of a store (zeros when there is none yet)."""
    try:
        nbytes, files = VLAStore.open(path).storage.disk_usage()
    except (StoreNotFoundError, FormatError, OSError):
        return {"bytes": 0, "files": 0}
    return {"bytes": nbytes, "files": files}


_CREATING = ".creating-"


def _stale_creations(path: Path) -> list[Path]:
    """Hidden build folders of ``path`` whose run died (``.NAME.creating-PID-XXXXXXXX``); never a glob."""
    prefix = f".{path.name}{_CREATING}"
    stale = []
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                    continue
                pid = entry.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and _alive(int(pid)):
                    continue  # another run of this command is building it right now
                stale.append(Path(entry.path))
    except OSError:
        return []
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def open_or_create_store(out: str, episodes: list[EpisodeData], columns: dict[str, Any] | None = None,
                         same: Callable[[VLAStore], bool] | None = None,
                         other_store_hint: str = "", allow_nonfinite: bool = False,
                         _retried: bool = False) -> tuple[VLAStore, bool]:
    """Open ``out`` if an earlier run of the same ingestion made it, else create it atomically.

    The store is built in a hidden sibling folder and renamed into place, so a
    run killed while creating it leaves no half-made store behind.

    Returns:
        ``(store, created)``.

    Raises:
        IngestUsageError: ``out`` holds another store (different episodes or data) or is not a store.
    """
    path = Path(out)
    try:
        occupied = os.path.lexists(path) and (not path.is_dir() or path.is_symlink() or any(path.iterdir()))
    except OSError as exc:
        raise IngestUsageError(f"--out {out}: cannot look inside ({exc.strerror or exc}); pick another --out") from None
    if occupied:
        try:
            store = VLAStore.open(path, writable=True)
        except (StoreNotFoundError, FormatError, OSError):
            raise IngestUsageError(f"--out {out} exists and is not a vlastore store; pick a new --out") from None
        names = tuple(e.name for e in episodes)
        steps = [e.step_count() for e in episodes]
        if store.catalog.names != names or store.catalog.steps.tolist() != steps or (same and not same(store)):
            what = "other episodes" if store.catalog.names != names else "other data"
            raise IngestUsageError(
                f"--out {out} is an existing store with {what} ({len(store.datasets)} episodes in it, {len(names)} "
                f"from this source); --out only creates a store (or finishes one this same command started). "
                + (other_store_hint or f"To add to it use --into {out}; else pick a new --out"))
        return store, False
    for stale in _stale_creations(path):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run of ours
    tmp = path.parent / f".{path.name}{_CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        VLAStore.create(tmp, episodes, columns=columns, allow_nonfinite=allow_nonfinite)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()  # an empty folder the user made
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.lexists(path) or _retried:
            raise
        # another run of this command renamed its store into place first: use it if it is the same
        return open_or_create_store(out, episodes, columns, same, other_store_hint, allow_nonfinite, _retried=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return VLAStore.open(path, writable=True), True


def _link_notes(listing: Listing, source: str, skipped: bool) -> list[str]:
    notes = []
    if listing.outside:
        examples = ", ".join(f"{p} -> {t}" for p, t in listing.outside[:3])
        what = "skipped (--skip-outside-links)" if skipped else "read; --skip-outside-links leaves them out"
        notes.append(f"{len(listing.outside):,} symbolic link(s) lead outside {source}, {what}: {examples}"
                     + (", ..." if len(listing.outside) > 3 else ""))
    if listing.unlisted:
        notes.append(f"{len(listing.unlisted):,} folder(s) could not be listed (e.g. {listing.unlisted[0]})")
    return notes


def _outside_problems(listing: Listing) -> list[Problem]:
    return [Problem(p, "outside-source", f"{p}: symbolic link to {t}, outside the source folder; not read "
                    "(--skip-outside-links)") for p, t in listing.outside]


# ----------------------------------------------------------------- sources


def ingest_pt_cache(
    folder: str | os.PathLike[str],
    options: IngestOptions,
    family: str = "vl_features",
    vlm_reuse_count: int = 3,
    pattern: str = NAME_PATTERN,
    mapping: str | os.PathLike[str] | None = None,
) -> IngestReport:
    """Ingest a legacy VL feature cache: one ``.pt`` per ``(dataset, vlm_idx)`` in one folder.

    Args:
        folder: the cache folder (``{dataset}_vlm{vlm_idx}.pt`` or hash-named files).
        options: target store, workers, dry run, strictness, verification.
        family: family name (``<family>_<entry>`` when files hold several tensors).
        vlm_reuse_count: steps served by one row.
        pattern: file-name regex with groups ``dataset`` and ``index``.
        mapping: CSV ``file,dataset,vlm_idx`` for files whose name holds no key.

    Raises:
        IngestUsageError: a usage mistake (see :func:`vlastore.ingest.commands.run_ingest`).
        IngestError: ``--strict`` with problems, or a failed write.
    """
    _check_options(options)
    if vlm_reuse_count < 1:
        raise IngestUsageError(f"--vlm-reuse-count {vlm_reuse_count}: give a whole number of steps >= 1")
    listing = list_pt_files(folder)
    place_pt_cache([], pattern)  # a bad --pattern is a usage mistake: say so before reading anything
    mapping_rows = read_mapping(mapping) if mapping else None
    notes = [f"{listing.others:,} entries that are not .pt files were ignored"] if listing.others else []
    notes += _link_notes(listing, str(folder), options.skip_outside_links)

    def place(files: list[ScannedFile]) -> tuple[list[Item], dict[tuple[str, int], str], list[Problem]]:
        items, problems = place_pt_cache(files, pattern, mapping_rows)
        return items, {}, problems

    return _ingest(str(folder), "pt-cache", listing, place, options, family, "vlm_idx", vlm_reuse_count,
                   keyed=False, notes=notes)


def ingest_vggt(
    root: str | os.PathLike[str],
    options: IngestOptions,
    family: str = "vggt",
    manifest: str | os.PathLike[str] | None = "auto",
) -> IngestReport:
    """Ingest VGGT caches stored next to images (``<image>.vggt_cache.pt`` holding ``{"features": tensor}``).

    Episodes are the folders under ``root``; rows are numbered by image order
    (name order, or the manifest's) and keyed by the image path relative to
    ``root``, so a reader finds a feature by ``(episode, image_idx)`` or by path
    (:meth:`VLAStore.feature_by_key`).

    Args:
        manifest: ``"auto"`` (use ``manifest.json/.jsonl/.csv`` at the root if present),
            a path, or None to ignore any manifest.
    """
    _check_options(options)
    root = str(root)
    listing = list_vggt_files(root)
    notes = _link_notes(listing, root, options.skip_outside_links)
    manifest_path = None
    if manifest == "auto":
        manifest_path, note = find_manifest(root)
        notes += [note] if note else []
    elif manifest is not None:
        manifest_path = str(manifest)
    rows = read_manifest(manifest_path) if manifest_path else None
    if manifest_path:
        notes.append(f"image order and episodes from the manifest {manifest_path}")

    def place(files: list[ScannedFile]) -> tuple[list[Item], dict[tuple[str, int], str], list[Problem]]:
        return place_vggt(files, root, rows)

    return _ingest(root, "vggt", listing, place, options, family, "image_idx", None, keyed=True, notes=notes,
                   rows_by_count=True)


def _check_options(options: IngestOptions) -> None:
    options.target  # noqa: B018 - raises when neither or both of --out/--into are given
    if options.workers < 0:
        raise IngestUsageError(f"--workers {options.workers}: give a number of processes >= 1 (0: one per core)")
    if options.rows_per_shard < 0:
        raise IngestUsageError(f"--rows-per-shard {options.rows_per_shard}: give a number >= 1 (0: the default)")
    if options.max_file_bytes < 1:
        raise IngestUsageError("--max-file-size must be a positive size, e.g. 2G")
    if options.into:
        try:
            VLAStore.open(options.into)
        except (StoreNotFoundError, FormatError) as exc:
            raise IngestUsageError(f"--into {options.into}: {exc}; --into adds to an existing store (make one with "
                                   "`vlastore ingest robot ... --out`, or use --out to create one)") from None
    if options.repair and not options.into and not options.out:
        raise IngestUsageError("--repair needs the store to repair (--into STORE or the --out of the first run)")


# ----------------------------------------------------------------- engine


def _ingest(source: str, kind: str, listing: Listing, place: Placer, options: IngestOptions, family: str,
            index_name: str, vlm_reuse_count: int | None, keyed: bool, notes: list[str],
            rows_by_count: bool = False) -> IngestReport:
    started = time.perf_counter()
    target = options.target
    workers = options.n_workers
    report = IngestReport(source=source, store=target, kind=kind, dry_run=options.dry_run, notes=notes)
    report.outside_links = [f"{p} -> {t}" for p, t in listing.outside]
    report.store_before = store_usage(target)
    report.store_after = dict(report.store_before)
    paths, skipped = listing.paths, []
    if options.skip_outside_links and listing.outside:
        outside = {p for p, _ in listing.outside}
        paths = [p for p in paths if p not in outside]
        skipped = _outside_problems(listing)

    fast = None if options.full_scan or options.dry_run or options.strict else _fast_scan(paths, place, options)
    if fast is not None:
        files, items, row_keys, problems = fast
        report.notes.append("fast scan: keys from file names, shape and dtype from a sample of files; each file "
                            "is fully checked while it is written (--full-scan checks all before writing)")
    else:
        inspect = functools.partial(inspect_pt, max_bytes=options.max_file_bytes)
        with tqdm(total=len(paths), unit="file", desc="scan", disable=not options.progress or None) as bar:
            files = list(parallel_map(inspect, paths, workers, bar.update))
        items, row_keys, problems = place(files)
    report.files_found = len(files) + len(skipped)
    report.source_bytes = sum(f.nbytes for f in files)
    store_catalog = None
    if options.into:
        existing = VLAStore.open(options.into)
        store_catalog = (list(existing.catalog.names), existing.catalog.steps)
    catalog = plan_catalog(items, store_catalog, vlm_reuse_count, rows_by_count)
    plans, family_problems = plan_families(
        files, items, catalog, family, index_name=index_name, vlm_reuse_count=vlm_reuse_count,
        layout=options.layout, allow_nonfinite=options.allow_nonfinite, compression=options.compression,
        rows_per_shard=options.rows_per_shard, keyed=keyed, row_keys=row_keys)
    report.problems = skipped + problems + family_problems
    report.episodes, report.steps = len(catalog.names), int(catalog.steps.sum())
    report.episode_rows = {n: int(r) for n, r in zip(catalog.names, catalog.items.tolist(), strict=True)}
    report.families = {p.name: p.summary() for p in plans}
    report.files_usable = len({int(f) for p in plans for f in p.row_file[p.row_file >= 0].tolist()})
    for p in plans:
        nbytes, nfiles = estimate_size(p)
        report.estimated_bytes += nbytes
        report.estimated_files += nfiles
    if not options.into:
        report.estimated_files += 8  # catalog arrays and group metadata
    if options.strict and report.problems:
        raise IngestError(f"--strict: {len(report.problems)} problem(s) in {source}; nothing written",
                          report.problems, report)
    if options.dry_run or not plans or not catalog.names:
        report.seconds = time.perf_counter() - started
        return report

    store = _prepare_store(options, catalog)
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
                "same ones, or use --family NEW_NAME") from None
    job = WriteJob(store.location, [f.path for f in files],
                   [FamilyWork(p.name, p.entry, p.spec, p.row_file, p.lengths) for p in plans],
                   max_file_bytes=options.max_file_bytes, repair=options.repair)
    pending = 0
    for p in plans:
        present = store.coverage(p.name) & (p.row_file >= 0)
        report.rows_already_done += int(present.sum())
        pending += p.rows_with_source - int(present.sum())
    write_problems: list[Problem] = []

    def on_write(msg: tuple) -> None:
        bar.update(msg[1])
        write_problems.extend(msg[2])
        report.rows_written += msg[3]

    with tqdm(total=pending, unit="file", desc="write", disable=not options.progress or None) as bar:
        run_workers(job, workers, "write", on_write)
    report.problems.extend(write_problems)
    _finish_report(report, store, plans, job)
    if options.verify:
        report.verify = _verify(job, workers, options.progress, sum(p.rows_with_source for p in plans))
    report.seconds = time.perf_counter() - started
    if options.strict and write_problems:
        raise IngestError(f"--strict: {len(write_problems)} file(s) changed during ingestion", write_problems,
                          report)
    return report


def _fast_scan(paths: list[str], place: Placer, options: IngestOptions, samples: int = 64
               ) -> tuple[list[ScannedFile], list[Item], dict[tuple[str, int], str], list[Problem]] | None:
    """Plan without reading every file, when file names give every key and a sample agrees on one shape.

    Returns None when a full scan is needed: a name gives no key (the key is
    inside the file), or the sampled files hold several tensors or fewer than
    3 in 4 share one shape and dtype (a ragged family needs every row's length
    before writing). Files that differ from the sample's shape are skipped
    while writing, with the same reasons a full scan gives.
    """
    files = [ScannedFile(p, file_size(p)) for p in paths]
    items, row_keys, problems = place(files)
    if problems or not items:
        return None
    picks = sorted({int(i) for i in np.linspace(0, len(items) - 1, min(samples, len(items)))})
    seen = [inspect_pt(files[items[i].file].path, options.max_file_bytes) for i in picks]
    good = [s for s in seen if s.problem is None]
    if not good or any(len(s.tensors) != 1 for s in good):
        return None
    kinds = Counter((core_shape(shape), dtype) for s in good for shape, dtype, _ in s.tensors.values())
    (shape, dtype), count = kinds.most_common(1)[0]
    if count * 4 < len(good) * 3:  # no clear fixed shape: maybe ragged, which needs every length
        return None
    assumed = {"": (shape, dtype, True)}  # one shared dict: a million files cost no more
    for sf in files:
        sf.tensors = assumed  # checked for real while writing
    return files, items, row_keys, problems


def _prepare_store(options: IngestOptions, catalog: CatalogPlan) -> VLAStore:
    if options.into:
        return VLAStore.open(options.into, writable=True)
    episodes = [EpisodeData(n, steps=int(s)) for n, s in zip(catalog.names, catalog.steps.tolist(), strict=True)]
    store, _ = open_or_create_store(str(options.out), episodes)
    return store


def _finish_report(report: IngestReport, store: VLAStore, plans: list[FamilyPlan], job: WriteJob) -> None:
    paths = job.paths
    ingested: set[int] = set()
    reported = {p.path for p in report.problems}
    for p in plans:
        present = store.coverage(p.name)
        fam = report.families[p.name]
        fam["rows_present"] = int(present.sum())
        fam["coverage"] = float(present.mean()) if present.size else 1.0
        ingested.update(p.row_file[present & (p.row_file >= 0)].tolist())
        layout = store.layout(p.name)
        written = np.zeros(layout.n_shards, dtype=bool)
        written[store.written_shards(p.name)] = True
        # rows missing from written shards (an earlier run skipped their files): say why again, by reading those
        # few files; rows of shards not written (left for a rerun after a transient error) are not skipped files
        for row in np.flatnonzero(~present & (p.row_file >= 0) & written[layout.row_shards]).tolist():
            path = paths[int(p.row_file[row])]
            if path in reported:
                continue
            _, problem = load_value(path, p.entry, p.spec, int(layout.lengths[row]), job.max_file_bytes)
            report.problems.append(problem or Problem(
                path, "changed", f"{path}: was skipped when its shard was written by an earlier run and reads "
                "fine now; rerun the same command to add it (or ingest into a new --family)"))
            reported.add(path)
    report.files_ingested = len(ingested)
    report.store_after = store_usage(store.location)


def _verify(job: WriteJob, workers: int, progress: bool, total: int) -> dict[str, Any]:
    result: dict[str, Any] = {"rows_checked": 0, "rows_missing": 0, "mismatches": []}

    def on_verify(msg: tuple) -> None:
        result["rows_checked"] += msg[1]
        result["rows_missing"] += msg[2]
        result["mismatches"].extend(msg[3])
        bar.update(msg[1] + msg[2])

    with tqdm(total=total, unit="file", desc="verify", disable=not progress or None) as bar:
        run_workers(job, workers, "verify", on_verify)
    result["ok"] = not result["mismatches"]
    return result
