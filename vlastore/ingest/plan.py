"""From scanned source files to feature families: pure planning, no I/O.

A scan yields one :class:`ScannedFile` per source file (what tensors it holds,
their shapes and dtypes, any problem) and one :class:`Item` per file whose
``(episode, index)`` is known. :func:`plan_families` turns those into
:class:`FamilyPlan` objects: a :class:`~vlastore.format.FamilySpec` per
tensor entry, the source file of every row, ragged lengths, keys, and a
:class:`~vlastore.report.Problem` for every file left out. The same files
always give the same plan, which is what makes a rerun resume instead of
start over.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format import FamilySpec, FormatError, validate_name
from ..layout import vlm_items
from ..shardcodec import index_nbytes
from .report import Problem

__all__ = [
    "ONLY_TENSOR",
    "pick_entry",
    "ScannedFile",
    "Item",
    "FamilyPlan",
    "CatalogPlan",
    "plan_catalog",
    "plan_families",
    "core_shape",
    "estimate_size",
    "index_limit",
]


@dataclass(slots=True)
class ScannedFile:
    """What the scan learned about one source file (small and picklable)."""

    path: str
    nbytes: int
    problem: tuple[str, str] | None = None
    """``(reason, message)`` when the file cannot be used at all."""
    tensors: dict[str, tuple[tuple[int, ...], str, bool]] = field(default_factory=dict)
    """Entry (``""`` for a bare tensor) -> (shape, dtype, all values finite)."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Item:
    """A source file placed at ``(episode, index)``; ``priority`` breaks duplicate keys (lower wins)."""

    file: int
    episode: str
    index: int
    key: str | None = None
    priority: int = 0


@dataclass
class CatalogPlan:
    """Episodes of the target store, and how many rows each has in a family."""

    names: list[str]
    steps: np.ndarray
    items: np.ndarray
    from_store: bool


@dataclass
class FamilyPlan:
    """One family to write: its spec and where every row comes from."""

    name: str
    entry: str
    spec: FamilySpec
    items_per_episode: np.ndarray
    row_file: np.ndarray
    """Source file number of every row, -1 for rows with no (usable) source."""
    lengths: np.ndarray | None = None
    keys: list[str] | None = None

    @property
    def rows(self) -> int:
        return int(self.row_file.size)

    @property
    def rows_with_source(self) -> int:
        return int((self.row_file >= 0).sum())

    def summary(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "rows": self.rows,
            "rows_with_source": self.rows_with_source,
            "row_shape": list(self.spec.row_shape),
            "ragged": self.spec.ragged,
            "dtype": self.spec.dtype,
            "index": self.spec.index_name,
            "vlm_reuse_count": self.spec.vlm_reuse_count,
            "rows_per_shard": self.spec.rows_per_shard,
            "has_keys": self.spec.has_keys,
        }


ONLY_TENSOR = "*"
"""Entry name meaning "the file's one tensor" (bare, or the single tensor of a dict)."""


def pick_entry(tensors: dict[str, Any], entry: str) -> Any:
    """``tensors[entry]``; for :data:`ONLY_TENSOR` the single value (None when absent or ambiguous)."""
    if entry == ONLY_TENSOR:
        return next(iter(tensors.values())) if len(tensors) == 1 else None
    return tensors.get(entry)


def core_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without its leading singleton (batch) dimensions."""
    shape = tuple(int(d) for d in shape)
    i = 0
    while i < len(shape) and shape[i] == 1:
        i += 1
    return shape[i:]


def _mode(values: list[Any]) -> Any:
    # ties go to the value seen first, so the plan does not depend on hash order
    return Counter(values).most_common(1)[0][0]


def _family_shape(shapes: list[tuple[int, ...]], layout: str) -> tuple[tuple[int, ...], bool]:
    """``(row_shape, ragged)`` of a family from its files' core shapes."""
    fixed = _mode(shapes)
    if layout == "fixed" or (layout == "auto" and Counter(shapes)[fixed] * 2 > len(shapes)):
        return fixed, False
    tokens = [s[1:] for s in shapes if len(s) >= 2]
    if not tokens:
        if layout == "ragged":
            raise FormatError("--layout ragged needs tensors of at least 2 dimensions ([L, ...])")
        return fixed, False
    return _mode(tokens), True


def _fits(core: tuple[int, ...], row_shape: tuple[int, ...], ragged: bool) -> int:
    """Rows (ragged length) of a file that fits the family, 0 when it does not."""
    if not ragged:
        return 1 if core == row_shape else 0
    if core == row_shape:  # a length-1 ragged row lost its leading 1 with the batch dims
        return 1
    return core[0] if len(core) == len(row_shape) + 1 and core[1:] == row_shape else 0


def plan_catalog(items: list[Item], store_catalog: tuple[list[str], np.ndarray] | None, vlm_reuse_count: int | None,
                 rows_by_count: bool) -> CatalogPlan:
    """Episodes and rows per episode.

    Args:
        items: every placed file, usable or not (so a bad file does not change the plan).
        store_catalog: ``(names, steps)`` of an existing store (``--into``), or None for a new one.
        vlm_reuse_count: steps per row; rows per episode are ``ceil(steps / vlm_reuse_count)``
            when the catalog comes from a store.
        rows_by_count: rows per episode are the number of items (per-image features)
            rather than derived from steps.
    """
    by_episode: dict[str, int] = defaultdict(lambda: 0)
    files: Counter[str] = Counter(item.episode for item in items)
    for item in items:
        # without a catalog, rows per episode come from the indexes: one misnamed file (ep_vlm99999999999.pt)
        # must not plan a 745 GiB family; such an index is left out here and reported as out of range
        if _usable_name(item.episode) and (store_catalog is not None or item.index < index_limit(files[item.episode])):
            by_episode[item.episode] = max(by_episode[item.episode], item.index + 1)
    if store_catalog is not None:
        names, steps = store_catalog
        if rows_by_count:
            rows = np.array([by_episode.get(n, 0) for n in names], dtype=np.int64)
        else:
            rows = vlm_items(steps, vlm_reuse_count or 1)
        return CatalogPlan(list(names), np.asarray(steps, dtype=np.int64), rows, True)
    names = sorted(by_episode)
    rows = np.array([by_episode[n] for n in names], dtype=np.int64)
    return CatalogPlan(names, rows * (vlm_reuse_count or 1), rows, False)


def index_limit(files_in_episode: int) -> int:
    """Highest plausible index + 1 of an episode known only from its files: 16 per file, plus 256.

    Sparse caches (every few ``vlm_idx`` kept) stay well inside; a stray huge
    index does not size the plan. With ``--into`` the store's catalog decides.
    """
    return 16 * files_in_episode + 256


def _usable_name(name: str) -> bool:
    try:
        validate_name(name, "episode name")
    except FormatError:
        return False
    return True


def plan_families(
    files: Sequence[ScannedFile],
    items: list[Item],
    catalog: CatalogPlan,
    family: str,
    index_name: str = "vlm_idx",
    vlm_reuse_count: int | None = None,
    layout: str = "auto",
    allow_nonfinite: bool = False,
    compression: str | None = None,
    rows_per_shard: int = 0,
    keyed: bool = False,
    row_keys: dict[tuple[str, int], str] | None = None,
) -> tuple[list[FamilyPlan], list[Problem]]:
    """Families, their row sources and the problems found.

    Args:
        files: scan results, numbered as ``Item.file``.
        items: placed files (file-level problems are reported here too).
        catalog: from :func:`plan_catalog`.
        family: family name for a bare tensor or a payload with one tensor entry;
            with several entries each gets ``<family>_<entry>``.
        layout: ``auto``, ``fixed`` or ``ragged``.
        keyed: rows carry string keys (``Item.key``; ``row_keys`` for rows without a file).
    """
    problems: list[Problem] = []
    episode_pos = {name: e for e, name in enumerate(catalog.names)}
    episode_rows = np.concatenate([[0], np.cumsum(catalog.items)]).astype(np.int64)
    placed: dict[int, tuple[int, Item]] = {}  # row -> (priority rank, item)
    order = sorted(range(len(items)), key=lambda i: (items[i].priority, files[items[i].file].path))
    for i in order:
        item = items[i]
        sf = files[item.file]
        if sf.problem is not None:
            problems.append(Problem(sf.path, *sf.problem))
            continue
        e = episode_pos.get(item.episode)
        if e is None and not _usable_name(item.episode):
            problems.append(Problem(sf.path, "bad-name", f"{sf.path}: episode name {item.episode!r} is not usable "
                                    "in a store (letters, digits and ._-+=@,:~ only); rename it or fix --pattern"))
            continue
        if e is None:
            problems.append(Problem(sf.path, "unknown-episode", f"{sf.path}: episode {item.episode!r} is not in the "
                                    f"store's catalog; ingest its robot data first or leave the file out"))
            continue
        n = int(catalog.items[e])
        if not 0 <= item.index < n:
            hint = "check --vlm-reuse-count" if catalog.from_store else (
                "the other files of the episode make such an index implausible (a misnamed file?); rename it, or "
                "ingest into a store whose catalog gives the episode's steps (--into)")
            problems.append(Problem(sf.path, "index-out-of-range", f"{sf.path}: {index_name}={item.index} but episode "
                                    f"{item.episode!r} has {n} rows ({index_name} 0..{n - 1}); {hint}"))
            continue
        row = int(episode_rows[e]) + item.index
        if row in placed:
            kept = files[placed[row][1].file].path
            problems.append(Problem(sf.path, "duplicate-key", f"{sf.path}: ({item.episode!r}, {index_name}="
                                    f"{item.index}) is also given by {kept}, which is kept"))
            continue
        placed[row] = (i, item)
    rows = int(episode_rows[-1])

    entries = sorted({entry for _, item in placed.values() for entry in files[item.file].tensors})
    if all(len(files[item.file].tensors) <= 1 for _, item in placed.values()) and entries:
        entries = [ONLY_TENSOR]  # one tensor per file: one family, whatever the dict key (or a bare tensor)
    for _, item in placed.values():
        if not files[item.file].tensors:
            sf = files[item.file]
            problems.append(Problem(sf.path, "no-tensor", f"{sf.path}: holds no float tensor "
                                    f"(metadata only: {sorted(sf.meta)[:6]})"))
    plans: list[FamilyPlan] = []
    for entry in entries:
        name = family if len(entries) == 1 else f"{family}_{entry}"
        validate_name(name, "family name")
        members = [(row, item) for row, (_, item) in sorted(placed.items())
                   if pick_entry(files[item.file].tensors, entry) is not None]
        infos = [pick_entry(files[item.file].tensors, entry) for _, item in members]
        cores = [core_shape(info[0]) for info in infos]  # type: ignore[index]
        dtypes = [info[1] for info in infos]  # type: ignore[index]
        row_shape, ragged = _family_shape(cores, layout)
        dtype = _mode(dtypes)
        row_file = np.full(rows, -1, dtype=np.int64)
        lengths = np.ones(rows, dtype=np.int64) if ragged else None
        what = f"[L, {', '.join(map(str, row_shape))}]" if ragged else str(list(row_shape))
        for (row, item), info, core, dt in zip(members, infos, cores, dtypes, strict=True):
            sf = files[item.file]
            shape, _, finite = info  # type: ignore[misc]
            label = f"{sf.path}" + (f" entry {entry!r}" if entry != ONLY_TENSOR else "")
            n = _fits(core, row_shape, ragged)
            if not n:
                problems.append(Problem(sf.path, "wrong-shape", f"{label}: shape {list(shape)}, but family {name!r} "
                                        f"holds {what} rows"))
            elif dt != dtype:
                problems.append(Problem(sf.path, "wrong-dtype", f"{label}: dtype {dt}, but family {name!r} is {dtype}; "
                                        "convert the file or ingest it into another family"))
            elif not finite and not allow_nonfinite:
                problems.append(Problem(sf.path, "nonfinite", f"{label}: holds NaN or Inf; fix the source or pass "
                                        "--allow-nonfinite"))
            else:
                row_file[row] = item.file
                if lengths is not None:
                    lengths[row] = n
        if ragged and lengths is not None and rows_per_shard == 0 and lengths.size:
            # long token rows: a shard must hold the longest row
            from ..format import default_rows_per_shard
            shard_rows = max(default_rows_per_shard(row_shape, dtype, True), int(lengths.max()))
        else:
            shard_rows = rows_per_shard
        spec = FamilySpec(row_shape, dtype, ragged=ragged, index_name=index_name, vlm_reuse_count=vlm_reuse_count,
                          allow_nonfinite=allow_nonfinite, compression=compression, rows_per_shard=shard_rows,
                          has_keys=keyed)
        keys = None
        if keyed:
            keys = [""] * rows
            for key_src, key in (row_keys or {}).items():
                e = episode_pos.get(key_src[0])
                if e is not None and key_src[1] < catalog.items[e]:
                    keys[int(episode_rows[e]) + key_src[1]] = key
            for row, (_, item) in placed.items():
                keys[row] = item.key or ""
        plans.append(FamilyPlan(name, entry, spec, catalog.items.copy(), row_file, lengths, keys))
    return plans, problems


def estimate_size(plan: FamilyPlan) -> tuple[int, int]:
    """``(bytes, files)`` the family will take on disk (raw shards: payload, crc per row, index per shard)."""
    spec = plan.spec
    token_rows = int(plan.lengths[plan.row_file >= 0].sum()) if plan.lengths is not None else plan.rows_with_source
    capacity = int(plan.lengths.sum()) if plan.lengths is not None else plan.rows
    shards = -(-capacity // spec.rows_per_shard) if capacity else 0
    nbytes = token_rows * (spec.row_nbytes + 4) + shards * index_nbytes(spec.rows_per_shard)
    small_files = 4 + (2 if spec.ragged else 0) + (1 if spec.has_keys else 0)
    return nbytes, shards + small_files
