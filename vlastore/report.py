"""`info` and `verify`: what a store holds, and whether every stored byte is intact."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .commitlog import CommitLog, SnapshotNotFoundError
from .format import (
    CHECKSUM_FIELD,
    FEATURES_GROUP,
    GENERATION_KEY,
    MANIFEST_KEY,
    META_NAME,
    TOP_GROUPS,
    FormatError,
    family_path,
    generation_node_of,
    generation_path,
    meta_key,
    series_path,
)
from .integrity import check_group_meta
from .layout import FamilyLayout
from .living import check_meta_crc, read_small
from .nodes import ZarrNodes
from .shardcodec import ChecksumError, ShardIndex, decode_index, index_nbytes
from .snapshot import log_key
from .storage import LocalStorage, StoreNotFoundError, UnsafeFileError, open_storage
from .store import VLAStore

__all__ = ["store_info", "format_info", "verify_store", "VerifyReport", "Corruption", "Missing", "total_shards"]


def _family_info(store: VLAStore, family: str) -> dict[str, Any]:
    entry = store.manifest.families[family]
    try:
        info = store.generation(family)
        layout = store.layout(family)
        coverage = store.coverage(family)
        nbytes, files = store.storage.disk_usage(family_path(family))
    except (FormatError, ChecksumError, OSError) as exc:  # a damaged family: say so, show the others
        return {
            "current_generation": entry.current_generation,
            "generations": list(entry.generations),
            "error": str(exc),
        }
    spec = info.spec
    return {
        "current_generation": entry.current_generation,
        "generations": list(entry.generations),
        "rows": info.rows,
        "rows_present": int(coverage.sum()),
        "row_shape": ["L", *spec.row_shape] if spec.ragged else list(spec.row_shape),
        "ragged": spec.ragged,
        "token_rows": int(layout.lengths.sum()) if spec.ragged else None,
        "dtype": spec.dtype,
        "index": spec.index_name,
        "vlm_reuse_count": spec.vlm_reuse_count,
        "compression": spec.compression,
        "rows_per_shard": spec.rows_per_shard,
        "shards": layout.n_shards,
        "shards_written": int(len(store.written_shards(family))),
        "payload_bytes": int(layout.lengths[coverage].sum()) * spec.row_nbytes,
        "bytes_on_disk": nbytes,
        "files": files,
        "model": info.producer.model,
        "revision": info.producer.revision,
        "fingerprint": info.producer.fingerprint,
        "params": info.producer.params,
        "created": info.created,
    }


def store_info(store: VLAStore) -> dict[str, Any]:
    """Everything ``vlastore info`` shows, as plain JSON-ready data."""
    nbytes, files = store.storage.disk_usage()
    catalog = store.catalog
    return {
        "store": store.location,
        "snapshot": store.snapshot_id,
        "format_version": store.manifest.format_version,
        "vlastore_version": store.manifest.vlastore_version,
        "created": store.manifest.created,
        "episodes": len(catalog),
        "steps": catalog.total_steps,
        "steps_per_episode": {
            "min": int(catalog.steps.min()) if len(catalog) else 0,
            "mean": float(catalog.steps.mean()) if len(catalog) else 0.0,
            "max": int(catalog.steps.max()) if len(catalog) else 0,
        },
        "series": {k: {"columns": list(v.columns), "dtype": v.dtype} for k, v in store.manifest.series.items()},
        "families": {f: _family_info(store, f) for f in store.families},
        "bytes_on_disk": nbytes,
        "files": files,
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def format_info(info: dict[str, Any]) -> str:
    """The human-readable ``vlastore info`` text."""
    spe = info["steps_per_episode"]
    lines = [
        f"store       {info['store']}",
        f"format      v{info['format_version']} (vlastore {info['vlastore_version']}), created {info['created']}"
        + (f", snapshot {info['snapshot']}" if info.get("snapshot") else ""),
        f"episodes    {info['episodes']:,}  steps {info['steps']:,} "
        f"(per episode min {spe['min']}, mean {spe['mean']:.1f}, max {spe['max']})",
        f"on disk     {_human(info['bytes_on_disk'])} in {info['files']:,} files",
    ]
    for key, s in info["series"].items():
        cols = ", ".join(s["columns"][:6]) + (", ..." if len(s["columns"]) > 6 else "")
        lines.append(f"series      {key}: {len(s['columns'])} x {s['dtype']} [{cols}]")
    for name, f in info["families"].items():
        if "error" in f:
            lines += [
                f"family      {name}: DAMAGED: {f['error']}",
                f"  run       vlastore verify {info['store']}   (lists everything damaged)",
            ]
            continue
        shape = "x".join(str(d) for d in f["row_shape"])
        pct = 100.0 * f["rows_present"] / f["rows"] if f["rows"] else 100.0
        lines += [
            f"family      {name}: {f['rows']:,} rows of [{shape}] {f['dtype']} by ({f['index']})"
            + (f", vlm_reuse_count {f['vlm_reuse_count']}" if f["vlm_reuse_count"] else ""),
            f"  coverage  {f['rows_present']:,}/{f['rows']:,} rows present ({pct:.1f}%), "
            f"{f['shards_written']}/{f['shards']} shards",
            f"  producer  {f['model'] or '-'} rev {f['revision'] or '-'} fingerprint {f['fingerprint'] or '-'}",
            f"  storage   generation {f['current_generation']} of {f['generations']}, "
            f"{f['compression'] or 'raw'}, {_human(f['bytes_on_disk'])} in {f['files']} files "
            f"({_human(f['payload_bytes'])} payload)",
        ]
    return "\n".join(lines)


MAX_EXAMPLES = 5
"""Missing rows listed by name per family in a report (all are counted)."""


@dataclass
class Corruption:
    """One damaged place: a row of a family (with its address), or a file."""

    where: str
    family: str | None = None
    dataset: str | None = None
    index: int | None = None
    reason: str = ""
    index_name: str = "index"
    """What ``index`` counts, e.g. ``vlm_idx``."""

    def __str__(self) -> str:
        if self.family is not None and self.dataset is not None:
            return f"{self.family}: ({self.dataset!r}, {self.index_name}={self.index}) {self.reason} [{self.where}]"
        return f"{self.where}: {self.reason}"


@dataclass
class Missing:
    """Planned rows of one family generation that are not stored."""

    rows: int
    planned: int
    examples: list[tuple[str, int]] = field(default_factory=list)
    """A few ``(dataset, index)`` of missing rows, in row order."""
    index_name: str = "index"

    def __str__(self) -> str:
        shown = ", ".join(f"({d!r}, {self.index_name}={i})" for d, i in self.examples)
        more = f" and {self.rows - len(self.examples):,} more" if self.rows > len(self.examples) else ""
        return f"{self.rows:,} of {self.planned:,} planned rows not stored, e.g. {shown}{more}"


@dataclass
class VerifyReport:
    corrupt: list[Corruption] = field(default_factory=list)
    """Damaged rows and files (crc32c mismatch, unreadable, metadata that fails its check)."""
    missing: dict[str, Missing] = field(default_factory=dict)
    """family (``family@generation`` for a non-current generation) -> planned rows not stored."""
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)
    """family -> (rows present, rows planned)"""
    chunks_checked: int = 0
    notes: list[str] = field(default_factory=list)
    """Facts that are not failures (e.g. metadata written before checksums existed)."""

    @property
    def ok(self) -> bool:
        """No corruption and no planned row missing."""
        return not self.corrupt and not self.missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks_checked,
            "coverage": {k: {"present": p, "rows": n} for k, (p, n) in self.coverage.items()},
            "corrupt": [c.__dict__ for c in self.corrupt],
            "missing": {
                k: {"rows": m.rows, "planned": m.planned, "examples": [list(e) for e in m.examples]}
                for k, m in self.missing.items()
            },
            "notes": list(self.notes),
        }


def _rows_corrupt(
    report: VerifyReport, layout: FamilyLayout, family: str, names: Sequence[str], key: str, rows: Any, reason: str
) -> None:
    for row in rows:
        e, item = layout.address(int(row))
        report.corrupt.append(Corruption(key, family, names[e], item, reason, layout.spec.index_name))


def _chunk_ok(buf: np.ndarray, index: ShardIndex, chunk: int, compression: str | None, row_nbytes: int) -> bool:
    try:
        index.chunk_bytes(buf, chunk, compression, row_nbytes)
    except ChecksumError:
        return False
    return True


def _verify_shard(
    store: VLAStore,
    family: str,
    generation: int,
    shard: int,
    layout: FamilyLayout,
    names: Sequence[str],
    report: VerifyReport,
    present_rows: np.ndarray,
    damaged: np.ndarray,
) -> None:
    """Check one shard file; sets ``present_rows`` (stored) and ``damaged`` (reported corrupt) for its rows."""
    key = store.shard_key(family, shard, generation)
    rows = layout.shard_rows(shard)
    rps = layout.rows_per_shard
    n_index = index_nbytes(rps)
    try:
        data = store.storage.get(key)
    except (UnsafeFileError, OSError) as exc:
        _rows_corrupt(report, layout, family, names, key, rows.tolist(), f"shard unreadable ({exc})")
        damaged[rows] = True
        return
    if data is None:  # removed since listed
        return
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        if buf.size < n_index:
            raise ChecksumError(f"{buf.size} bytes, too short for an index")
        index = decode_index(buf[-n_index:], rps, buf.size - n_index)
    except ChecksumError as exc:
        _rows_corrupt(report, layout, family, names, key, rows.tolist(), f"shard index unreadable ({exc})")
        damaged[rows] = True
        return
    spec = layout.spec
    chunk_ok = np.zeros(len(index.present), dtype=bool)
    for chunk in np.flatnonzero(index.present).tolist():
        report.chunks_checked += 1
        chunk_ok[chunk] = _chunk_ok(buf, index, chunk, spec.compression, spec.row_nbytes)
    first = layout.start_of(rows) - shard * rps
    lengths = layout.lengths[rows]
    present = index.present[first]
    if spec.ragged:  # a row is stored when its first chunk is; intact when all its chunks are there and sound
        cum_present = np.concatenate([[0], np.cumsum(index.present)])
        cum_ok = np.concatenate([[0], np.cumsum(chunk_ok)])
        whole = cum_present[first + lengths] - cum_present[first] == lengths
        intact = cum_ok[first + lengths] - cum_ok[first] == lengths
    else:
        whole = present
        intact = chunk_ok[first]
    present_rows[rows] = present & whole
    bad = present & ~(whole & intact)
    damaged[rows[bad]] = True
    for row, is_whole in zip(rows[bad].tolist(), whole[bad].tolist(), strict=True):
        _rows_corrupt(
            report,
            layout,
            family,
            names,
            key,
            [row],
            "crc32c mismatch" if is_whole else "row incomplete (some of its chunks are missing)",
        )
    covered = np.zeros(len(index.present), dtype=bool)  # chunks that belong to a planned row
    for f, n in zip(first.tolist(), lengths.tolist(), strict=True):
        covered[f : f + n] = True
    stray = index.present & ~covered
    if stray.any() and store.snapshot is None:  # format 2: rows of removed episodes stay until gc, unreachable
        report.corrupt.append(
            Corruption(
                key, reason=f"chunks present where no row is planned (chunks {np.flatnonzero(stray)[:5].tolist()})"
            )
        )


def _verify_generation(
    store: VLAStore,
    family: str,
    generation: int,
    report: VerifyReport,
    names: Sequence[str],
    progress: Callable[[int], None],
) -> None:
    label = family if generation == store.manifest.families[family].current_generation else f"{family}@{generation}"
    base = generation_path(family, generation)
    try:
        info = store.generation(family, generation)
        if info.spec.has_keys:
            store.keys(family, generation)
        layout = store.layout(family, generation)
    except (FormatError, ChecksumError, OSError) as exc:
        report.corrupt.append(Corruption(base, family, reason=f"metadata: {exc}"))
        return
    present_rows = np.zeros(layout.rows, dtype=bool)
    damaged = np.zeros(layout.rows, dtype=bool)
    for shard in store.written_shards(family, generation).tolist():
        _verify_shard(store, family, generation, shard, layout, names, report, present_rows, damaged)
        progress(1)
    report.coverage[label] = (int(present_rows.sum()), layout.rows)
    missing = np.flatnonzero(~present_rows & ~damaged)  # a damaged row is reported once, as corrupt
    if missing.size:
        examples = []
        for row in missing[:MAX_EXAMPLES].tolist():
            e, item = layout.address(row)
            examples.append((names[e], item))
        report.missing[label] = Missing(int(missing.size), layout.rows, examples, layout.spec.index_name)


def _group_attributes(node: str, unlisted: set[str]) -> set[str] | None:
    """The attributes of a group vlastore writes at ``node`` (None: an array belongs there; ``{"skip"}``: a
    generation not in the manifest, ignored)."""
    parts = node.split("/") if node else []
    if not parts:
        return {MANIFEST_KEY}
    if (len(parts) == 1 and parts[0] in TOP_GROUPS) or (parts[0] == FEATURES_GROUP and len(parts) == 2):
        return set()
    generation = generation_node_of(node)
    if generation is not None and generation[0] == node:
        return {"skip"} if node in unlisted else {GENERATION_KEY}
    return None


def _check_node_meta(store: VLAStore, key: str, unlisted: set[str], report: VerifyReport) -> None:
    storage = store.storage
    node = key[: -len(META_NAME)].rstrip("/")
    try:
        meta = store.nodes.read_json(key)
        if meta is None:
            return
        group_attrs = _group_attributes(node, unlisted)
        if group_attrs == {"skip"}:
            return
        if group_attrs is not None:
            check_group_meta(meta, group_attrs, storage.where(key))
        elif meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise FormatError(f"{storage.where(key)}: not zarr v3 array metadata; the file is damaged")
    except (FormatError, OSError) as exc:
        if not any(c.where == key for c in report.corrupt):  # a FIFO or link is reported once, before
            report.corrupt.append(Corruption(key, reason=str(exc)))


def _verify_metadata_files(store: VLAStore, report: VerifyReport) -> None:
    """Every group vlastore writes has its ``zarr.json``, every ``zarr.json`` parses and holds what vlastore
    writes, and no file of the store is a link or special file."""
    storage = store.storage
    for group in [*TOP_GROUPS, *(family_path(f) for f in store.families)]:
        if storage.version(meta_key(group)) is None:  # anything there (a link, a FIFO) is reported below
            report.corrupt.append(Corruption(meta_key(group), reason="missing; the store is damaged"))
    if isinstance(storage, LocalStorage):
        for where, reason in storage.unsafe_entries():
            report.corrupt.append(Corruption(where, reason=reason))
    keys = [key for key, _size in storage.list("")]
    listed = {generation_path(f, g) for f, e in store.manifest.families.items() for g in e.generations}
    unlisted = {node[0] for node in map(generation_node_of, keys) if node is not None} - listed
    for node in sorted(unlisted):
        report.notes.append(
            f"{node}: not in the manifest (an interrupted plan, or a deletion that was killed); "
            "ignored by readers, removed by the next plan of that generation"
        )
    for key in keys:
        if key.rsplit("/", 1)[-1] == META_NAME:
            _check_node_meta(store, key, unlisted, report)


def _verify_snapshot_metadata(store: VLAStore, report: VerifyReport) -> None:
    """Format 2: every commit in the log parses and passes its checksum; every array a commit uses has the
    ``zarr.json`` whose crc32c that commit recorded; no file of the store is a link or special file."""
    assert store.snapshot is not None
    log = CommitLog(store.storage)
    if isinstance(store.storage, LocalStorage):
        for where, reason in store.storage.unsafe_entries():
            report.corrupt.append(Corruption(where, reason=reason))
    commits = [store.snapshot]
    for number in log.numbers():
        if number == store.snapshot.commit:
            continue
        try:
            commits.append(log.read(number))
        except SnapshotNotFoundError:  # removed by a gc since listed
            continue
        except (FormatError, OSError) as exc:
            report.corrupt.append(Corruption(log_key(number), reason=f"commit: {exc}"))
    checked: set[tuple[str, str]] = set()  # (array, crc): commits share most arrays
    for snapshot in commits:
        for path, crc in snapshot.arrays.items():
            if (path, crc) in checked:
                continue
            checked.add((path, crc))
            try:
                check_meta_crc(store.nodes, path, snapshot.arrays)
            except (FormatError, OSError) as exc:
                where = meta_key(path)
                if not any(c.where == where for c in report.corrupt):
                    report.corrupt.append(Corruption(where, reason=f"{exc} (commit {snapshot.commit})"))


def _verify_series(store: VLAStore, report: VerifyReport) -> None:
    """Read every stored step of every series (crc32c of each chunk); format 2 names the damaged segment."""
    problems = {path for path, _ in store.open_problems}
    for key in store.series_keys:
        if series_path(key) in problems:
            continue
        if store.snapshot is None:
            try:
                store.series_all(key)
            except (FormatError, OSError) as exc:
                report.corrupt.append(Corruption(series_path(key), reason=f"unreadable: {exc}"))
            continue
        state = store.snapshot.series[key]
        for seg in state.segments:
            try:
                read_small(store.nodes, seg.path, (seg.rows, len(state.columns)), state.dtype, store.snapshot.arrays)
            except (FormatError, OSError) as exc:
                report.corrupt.append(Corruption(seg.path, reason=f"series {key!r} unreadable: {exc}"))


def verify_store(
    store: VLAStore | str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check everything a reader trusts, and read every stored byte.

    Metadata: format 1: the manifest's and every generation's checksum, every
    ``zarr.json`` against the manifest; format 2: every commit's checksum and the
    ``zarr.json`` crc32c of every array a commit uses; both: the catalog and row
    tables. Data: crc32c of every feature chunk (every segment), catalog and
    series arrays (every series segment). Planned rows not stored are
    reported as missing. Never raises for a damaged store: each problem is one
    entry of the report (a store whose root manifest is unreadable cannot be
    checked further: that is the one entry).

    Args:
        store: an open store, or its location (opened leniently: a damaged
            catalog is reported, the families are still checked).
        progress: called with the number of shard files just checked.

    Raises:
        StoreNotFoundError: ``store`` is a location with no store.
    """
    report = VerifyReport()
    tick = progress or (lambda n: None)
    if not isinstance(store, VLAStore):
        try:
            nodes = ZarrNodes.open(open_storage(store))
        except StoreNotFoundError:
            raise
        except (FormatError, OSError) as exc:
            report.corrupt.append(Corruption(META_NAME, reason=f"root metadata: {exc}"))
            return report
    else:
        nodes = ZarrNodes(store.storage, writable=False)  # fresh caches: check from the disk
    try:
        store = VLAStore(nodes, strict=False)
    except (FormatError, ChecksumError, OSError) as exc:
        report.corrupt.append(Corruption(META_NAME, reason=f"root manifest: {exc}"))
        return report
    root_meta = store.nodes.attrs.get(MANIFEST_KEY, {})
    if store.snapshot is None and isinstance(root_meta, dict) and CHECKSUM_FIELD not in root_meta:  # format 2: commits
        report.notes.append(
            "the root manifest has no checksum (written before metadata checksums); it was "
            "cross-checked against the catalog and arrays instead"
        )
    for path, problem in store.open_problems:
        report.corrupt.append(Corruption(path, reason=problem))
    if store.snapshot is not None:
        _verify_snapshot_metadata(store, report)
    else:
        _verify_metadata_files(store, report)
    catalog = "episodes" if store.snapshot is None else store.snapshot.catalog.path
    catalog_ok = not any(path == catalog for path, _ in store.open_problems)
    names = store.catalog.names if catalog_ok else tuple(f"episode #{i}" for i in range(store.manifest.episodes))
    _verify_series(store, report)
    for family in store.families:
        for gen in store.manifest.families[family].generations:
            _verify_generation(store, family, gen, report, names, tick)
            if store.snapshot is None:  # format 2: the commit checksums every generation's metadata
                _note_unsealed(store, family, gen, report)
    return report


def _note_unsealed(store: VLAStore, family: str, gen: int, report: VerifyReport) -> None:
    try:
        attrs = store.nodes.node_attrs(generation_path(family, gen)).get(GENERATION_KEY, {})
        if isinstance(attrs, dict) and CHECKSUM_FIELD not in attrs:
            report.notes.append(
                f"{family} generation {gen}: attributes have no checksum (written before "
                "metadata checksums); cross-checked against the arrays instead"
            )
    except FormatError:
        pass


def total_shards(store: VLAStore) -> int:
    """Shard files a verify reads (for a progress bar); 0 for families whose metadata is damaged."""
    total = 0
    for family in store.families:
        for gen in store.manifest.families[family].generations:
            with contextlib.suppress(FormatError, ChecksumError, OSError):
                total += len(store.written_shards(family, gen))
    return total
