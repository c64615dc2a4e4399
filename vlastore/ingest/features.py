"""Ingest feature caches (``.pt`` files) into a store: ``ingest pt-cache`` and ``ingest vggt``.

Each entry point lists its source and hands a plan to :mod:`vlastore.ingest.engine`,
which writes it in parallel, reports and verifies.
"""

from __future__ import annotations

import os
import time

from ..format import FormatError
from ..storage import StoreNotFoundError
from ..store import VLAStore
from .engine import Planned, plan_listed, plan_named, run, store_catalog
from .names import scan_names
from .options import IngestOptions, cpu_cores
from .output import open_or_create_store, store_usage
from .plan import Item, ScannedFile
from .report import IngestReport, IngestUsageError, Problem
from .scan import (
    NAME_PATTERN,
    find_manifest,
    list_pt_files,
    list_vggt_files,
    place_pt_cache,
    place_vggt,
    read_manifest,
    read_mapping,
    require_folder,
)

__all__ = ["IngestOptions", "ingest_pt_cache", "ingest_vggt", "open_or_create_store", "store_usage", "cpu_cores"]


def _link_notes(outside: list[tuple[str, str]], unlisted: list[str], source: str, skipped: bool) -> list[str]:
    notes = []
    if outside:
        examples = ", ".join(f"{p} -> {t}" for p, t in outside[:3])
        what = "skipped (--skip-outside-links)" if skipped else "read; --skip-outside-links leaves them out"
        notes.append(
            f"{len(outside):,} symbolic link(s) lead outside {source}, {what}: {examples}"
            + (", ..." if len(outside) > 3 else "")
        )
    if unlisted:
        notes.append(f"{len(unlisted):,} folder(s) could not be listed (e.g. {unlisted[0]})")
    return notes


def _others_note(others: int) -> list[str]:
    return [f"{others:,} entries that are not .pt files were ignored"] if others else []


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

    When every file name gives its key (``{dataset}_vlm{vlm_idx}.pt``) the cache is
    planned from the names and a sample of files, in memory that does not grow with
    the number of files; otherwise from the list of files (see docs/ingest.md).

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
    started = time.perf_counter()
    _check_options(options)
    if vlm_reuse_count < 1:
        raise IngestUsageError(f"--vlm-reuse-count {vlm_reuse_count}: give a whole number of steps >= 1")
    require_folder(folder, "the folder that holds the .pt files")
    place_pt_cache([], pattern)  # a bad --pattern is a usage mistake: say so before reading anything
    mapping_rows = read_mapping(mapping) if mapping else None
    source = str(folder)
    if not (options.full_scan or options.dry_run or options.strict) and options.layout != "ragged":
        store = store_catalog(options)
        named = scan_names(source, pattern, store, vlm_reuse_count, options.skip_outside_links)
        planned = plan_named(named, options, family, vlm_reuse_count) if named is not None else None
        if named is not None and planned is not None:
            notes = _others_note(named.others) + _link_notes(named.outside, [], source, options.skip_outside_links)
            return run(source, "pt-cache", planned, options, notes, named.outside, started)
    listing = list_pt_files(folder)
    notes = _others_note(listing.others) + _link_notes(
        listing.outside, listing.unlisted, source, options.skip_outside_links
    )

    def place(files: list[ScannedFile]) -> tuple[list[Item], dict[tuple[str, int], str], list[Problem]]:
        items, problems = place_pt_cache(files, pattern, mapping_rows)
        return items, {}, problems

    planned = plan_listed(listing, place, options, family, "vlm_idx", vlm_reuse_count, keyed=False)
    return run(source, "pt-cache", planned, options, notes, listing.outside, started)


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
    started = time.perf_counter()
    _check_options(options)
    root = str(root)
    listing = list_vggt_files(root)
    notes = _link_notes(listing.outside, listing.unlisted, root, options.skip_outside_links)
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

    planned: Planned = plan_listed(listing, place, options, family, "image_idx", None, keyed=True, rows_by_count=True)
    return run(root, "vggt", planned, options, notes, listing.outside, started)


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
            raise IngestUsageError(
                f"--into {options.into}: {exc}; --into adds to an existing store (make one with "
                "`vlastore ingest robot ... --out`, or use --out to create one)"
            ) from None
    if options.repair and not options.into and not options.out:
        raise IngestUsageError("--repair needs the store to repair (--into STORE or the --out of the first run)")
