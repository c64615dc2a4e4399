"""`info` and `verify`: what a store holds, and whether every stored byte is intact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .format import FEATURES_GROUP, family_path
from .shardcodec import ChecksumError, crc32c, decode_index, index_nbytes
from .store import VLAStore

__all__ = ["store_info", "format_info", "verify_store", "VerifyReport", "Corruption"]


def _family_info(store: VLAStore, family: str) -> dict[str, Any]:
    entry = store.manifest.families[family]
    info = store.generation(family)
    layout = store.layout(family)
    coverage = store.coverage(family)
    nbytes, files = store.storage.disk_usage(family_path(family))
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
        f"format      v{info['format_version']} (vlastore {info['vlastore_version']}), created {info['created']}",
        f"episodes    {info['episodes']:,}  steps {info['steps']:,} "
        f"(per episode min {spe['min']}, mean {spe['mean']:.1f}, max {spe['max']})",
        f"on disk     {_human(info['bytes_on_disk'])} in {info['files']:,} files",
    ]
    for key, s in info["series"].items():
        cols = ", ".join(s["columns"][:6]) + (", ..." if len(s["columns"]) > 6 else "")
        lines.append(f"series      {key}: {len(s['columns'])} x {s['dtype']} [{cols}]")
    for name, f in info["families"].items():
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


@dataclass
class Corruption:
    """One damaged place: a row of a family (with its address) or a whole array."""

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
class VerifyReport:
    corrupt: list[Corruption] = field(default_factory=list)
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)
    """family -> (rows present, rows planned)"""
    chunks_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks_checked,
            "coverage": {k: {"present": p, "rows": n} for k, (p, n) in self.coverage.items()},
            "corrupt": [c.__dict__ for c in self.corrupt],
        }


def _verify_family(store: VLAStore, family: str, generation: int, report: VerifyReport,
                   progress: Callable[[int], None]) -> None:
    layout = store.layout(family, generation)
    names = store.catalog.names
    index_name = layout.spec.index_name
    present_rows = np.zeros(layout.rows, dtype=bool)
    for shard in store.written_shards(family, generation).tolist():
        key = store.shard_key(family, shard, generation)
        data = store.storage.read_bytes(key)
        progress(1)
        if data is None:
            continue
        buf = np.frombuffer(data, dtype=np.uint8)
        rows = layout.shard_rows(shard)
        try:
            index = decode_index(buf[-index_nbytes(layout.rows_per_shard):], layout.rows_per_shard)
        except ChecksumError as exc:
            for row in rows.tolist():
                e, item = layout.address(row)
                report.corrupt.append(Corruption(key, family, names[e], item, f"shard index unreadable ({exc})",
                                                 index_name))
            continue
        bad_rows: set[int] = set()
        for chunk in np.flatnonzero(index.present).tolist():
            off, nb = int(index.offsets[chunk]), int(index.nbytes[chunk])
            report.chunks_checked += 1
            raw = buf[off : off + nb]
            ok = nb >= 4 and off + nb <= buf.size - index_nbytes(layout.rows_per_shard) and crc32c(
                np.ascontiguousarray(raw[:-4])) == int.from_bytes(raw[-4:].tobytes(), "little")
            if not ok:
                bad_rows.update(int(r) for r in layout.rows_of_chunks(shard, np.asarray([chunk])) if r >= 0)
        first_chunk = layout.starts[rows] - shard * layout.rows_per_shard
        present_rows[rows] = index.present[first_chunk]
        for row in sorted(bad_rows):
            e, item = layout.address(row)
            report.corrupt.append(Corruption(key, family, names[e], item, "crc32c mismatch", index_name))
    report.coverage[family if generation == store.generation(family).generation else f"{family}@{generation}"] = (
        int(present_rows.sum()), layout.rows)


def verify_store(store: VLAStore, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Read every stored byte: crc32c of every feature chunk, catalog and series arrays.

    Args:
        progress: called with the number of shard files just checked.
    """
    report = VerifyReport()
    tick = progress or (lambda n: None)
    small = ["episodes/name", "episodes/steps", "episodes/step_offsets"]
    small += [f"series/{k}" for k in store.series_keys]
    for family in store.families:
        for gen in store.manifest.families[family].generations:
            base = f"{FEATURES_GROUP}/{family}/gen-{gen:04d}"
            small += [f"{base}/episode_rows"]
            if store.generation(family, gen).spec.ragged:
                small += [f"{base}/starts", f"{base}/lengths"]
            if store.generation(family, gen).spec.has_keys:
                small += [f"{base}/keys"]
    for path in small:
        try:
            store.storage.read_small_array(path)
        except Exception as exc:  # zarr raises codec-specific errors on a crc mismatch
            report.corrupt.append(Corruption(path, reason=f"unreadable: {type(exc).__name__}: {exc}"))
    for family in store.families:
        for gen in store.manifest.families[family].generations:
            _verify_family(store, family, gen, report, tick)
    return report


def total_shards(store: VLAStore) -> int:
    return sum(len(store.written_shards(f, g)) for f in store.families for g in store.manifest.families[f].generations)
