"""From scanned source files to feature families: pure planning, no I/O.

A scan yields one :class:`ScannedFile` per source file (what tensors it holds,
their shapes and dtypes, any problem) and one :class:`Item` per file whose
``(episode, index)`` is known. :func:`plan_families` turns those into
:class:`FamilyPlan` objects: a :class:`~vlastore.format.FamilySpec` per
tensor entry, where every row comes from (:class:`RowSources`), ragged
lengths, keys, and a :class:`~vlastore.report.Problem` for every file left
out. The same files always give the same plan, which is what makes a rerun
resume instead of start over.

Row sources hold nothing per file beyond a number: a :class:`FileTable` (row
-> file number -> path) for scanned files, or :class:`NamedRows` for caches
whose files are named after their rows (``{dataset}_vlm{idx}.pt``), which
keeps one byte per row however many files there are.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format import FamilySpec, FormatError, default_rows_per_shard, validate_name
from ..layout import vlm_items
from ..shardcodec import index_nbytes
from .report import Problem

__all__ = [
    "ONLY_TENSOR",
    "pick_entry",
    "ScannedFile",
    "Item",
    "FamilyPlan",
    "RowSources",
    "FileTable",
    "NamedRows",
    "CatalogPlan",
    "plan_catalog",
    "plan_families",
    "place_rows",
    "placement_problem",
    "duplicate_problem",
    "distinct_files",
    "usable_name",
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


class RowSources:
    """Where the rows of one family come from: whether each row has a source file, and its path."""

    has_source: np.ndarray
    """bool per row: the plan takes this row from a file."""

    def paths(self, rows: np.ndarray) -> list[str]:
        """Source paths of ``rows`` (each with a source)."""
        raise NotImplementedError

    def file_ids(self, rows: np.ndarray) -> np.ndarray:
        """A number per source file of ``rows``, the same in every family of one plan (to count files)."""
        raise NotImplementedError


class FileTable(RowSources):
    """Rows' files by number: ``row_file[row]`` indexes ``path_list`` (-1: no source)."""

    def __init__(self, row_file: np.ndarray, path_list: Sequence[str]) -> None:
        self.row_file = row_file
        self.path_list = path_list
        self.has_source = row_file >= 0

    def paths(self, rows: np.ndarray) -> list[str]:
        return [self.path_list[f] for f in self.row_file[rows].tolist()]

    def file_ids(self, rows: np.ndarray) -> np.ndarray:
        return self.row_file[rows]


class NamedRows(RowSources):
    """Rows whose file is named after them, ``{episode}_vlm{index}.pt`` in one folder: nothing kept per file.

    ``renamed`` holds the file name of the few rows whose file is named otherwise
    (``ep_vlm007.pt``, or every file under another ``--pattern``).
    """

    def __init__(
        self,
        folder: str,
        episodes: Sequence[str],
        episode_rows: np.ndarray,
        has_source: np.ndarray,
        renamed: dict[int, str],
    ) -> None:
        self.folder = folder
        self.episodes = episodes
        self.episode_rows = episode_rows
        self.has_source = has_source
        self.renamed = renamed
        self._prefixes: list[str] | None = None

    def paths(self, rows: np.ndarray) -> list[str]:
        episode = np.searchsorted(self.episode_rows, rows, side="right") - 1
        index = rows - self.episode_rows[episode]
        if self._prefixes is None:  # made once per process (one string per episode), not once per row
            self._prefixes = [os.path.join(self.folder, f"{name}_vlm") for name in self.episodes]
        prefixes, renamed, folder = self._prefixes, self.renamed, self.folder
        if not renamed:
            return [f"{prefixes[e]}{i}.pt" for e, i in zip(episode.tolist(), index.tolist(), strict=True)]
        return [
            os.path.join(folder, renamed[row]) if row in renamed else f"{prefixes[e]}{i}.pt"
            for row, e, i in zip(rows.tolist(), episode.tolist(), index.tolist(), strict=True)
        ]

    def file_ids(self, rows: np.ndarray) -> np.ndarray:
        return rows


@dataclass
class FamilyPlan:
    """One family to write: its spec and where every row comes from."""

    name: str
    entry: str
    spec: FamilySpec
    items_per_episode: np.ndarray
    sources: RowSources
    lengths: np.ndarray | None = None
    keys: list[str] | None = None

    @property
    def rows(self) -> int:
        return int(self.sources.has_source.size)

    @property
    def rows_with_source(self) -> int:
        return int(np.count_nonzero(self.sources.has_source))

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


def distinct_files(plans: Sequence[FamilyPlan], masks: Sequence[np.ndarray] | None = None) -> int:
    """Source files that give at least one row (of ``masks[i]`` rows in plan ``i``, default: every row)."""
    chosen = [p.sources.has_source if masks is None else p.sources.has_source & masks[i] for i, p in enumerate(plans)]
    if len(plans) == 1:  # a file gives one row of a family: no need to list them
        return int(np.count_nonzero(chosen[0]))
    ids = [p.sources.file_ids(np.flatnonzero(c)) for p, c in zip(plans, chosen, strict=True)]
    return int(np.unique(np.concatenate(ids)).size) if ids else 0


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


def plan_catalog(
    items: list[Item],
    store_catalog: tuple[list[str], np.ndarray] | None,
    vlm_reuse_count: int | None,
    rows_by_count: bool,
) -> CatalogPlan:
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
        if usable_name(item.episode) and (store_catalog is not None or item.index < index_limit(files[item.episode])):
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


def usable_name(name: str) -> bool:
    """Whether ``name`` can be an episode name in a store."""
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
    placed, problems = place_rows(files, items, catalog, index_name)
    entries = sorted({entry for item in placed.values() for entry in files[item.file].tensors})
    if all(len(files[item.file].tensors) <= 1 for item in placed.values()) and entries:
        entries = [ONLY_TENSOR]  # one tensor per file: one family, whatever the dict key (or a bare tensor)
    for item in placed.values():
        sf = files[item.file]
        if not sf.tensors:
            problems.append(
                Problem(
                    sf.path, "no-tensor", f"{sf.path}: holds no float tensor (metadata only: {sorted(sf.meta)[:6]})"
                )
            )
    paths = [f.path for f in files]
    keys = _row_keys(placed, catalog, row_keys) if keyed else None
    plans: list[FamilyPlan] = []
    for entry in entries:
        name = family if len(entries) == 1 else f"{family}_{entry}"
        validate_name(name, "family name")
        members = [(row, item, pick_entry(files[item.file].tensors, entry)) for row, item in sorted(placed.items())]
        shape_plan = _FamilyShape(
            name, entry, [(row, item, info) for row, item, info in members if info is not None], layout, allow_nonfinite
        )
        row_file, lengths, family_problems = shape_plan.rows(files, int(catalog.items.sum()))
        problems += family_problems
        spec = FamilySpec(
            shape_plan.row_shape,
            shape_plan.dtype,
            ragged=shape_plan.ragged,
            index_name=index_name,
            vlm_reuse_count=vlm_reuse_count,
            allow_nonfinite=allow_nonfinite,
            compression=compression,
            rows_per_shard=_shard_rows(shape_plan, lengths, rows_per_shard),
            has_keys=keyed,
        )
        plans.append(FamilyPlan(name, entry, spec, catalog.items.copy(), FileTable(row_file, paths), lengths, keys))
    return plans, problems


def place_rows(
    files: Sequence[ScannedFile], items: list[Item], catalog: CatalogPlan, index_name: str
) -> tuple[dict[int, Item], list[Problem]]:
    """Row -> the item placed there, in priority then path order; a problem for every item left out."""
    problems: list[Problem] = []
    episode_pos = {name: e for e, name in enumerate(catalog.names)}
    episode_rows = np.concatenate([[0], np.cumsum(catalog.items)]).astype(np.int64)
    placed: dict[int, Item] = {}
    for i in sorted(range(len(items)), key=lambda i: (items[i].priority, files[items[i].file].path)):
        item = items[i]
        sf = files[item.file]
        if sf.problem is not None:
            problems.append(Problem(sf.path, *sf.problem))
            continue
        e = episode_pos.get(item.episode)
        problem = placement_problem(sf.path, item.episode, item.index, e, catalog, index_name)
        if problem is None:
            row = int(episode_rows[e]) + item.index  # type: ignore[index]
            if row in placed:
                problem = duplicate_problem(sf.path, item.episode, item.index, files[placed[row].file].path, index_name)
            else:
                placed[row] = item
        if problem is not None:
            problems.append(problem)
    return placed, problems


def placement_problem(
    path: str, episode: str, index: int, e: int | None, catalog: CatalogPlan, index_name: str
) -> Problem | None:
    """Why a file keyed ``(episode, index)`` has no row in ``catalog`` (``e``: the episode's position), or None."""
    if e is None and not usable_name(episode):
        return Problem(
            path,
            "bad-name",
            f"{path}: episode name {episode!r} is not usable in a store (letters, "
            "digits and ._-+=@,:~ only); rename it or fix --pattern",
        )
    if e is None:
        return Problem(
            path,
            "unknown-episode",
            f"{path}: episode {episode!r} is not in the store's catalog; "
            "ingest its robot data first or leave the file out",
        )
    n = int(catalog.items[e])
    if 0 <= index < n:
        return None
    hint = (
        "check --vlm-reuse-count"
        if catalog.from_store
        else (
            "the other files of the episode make such an index implausible (a misnamed file?); rename it, or "
            "ingest into a store whose catalog gives the episode's steps (--into)"
        )
    )
    return Problem(
        path,
        "index-out-of-range",
        f"{path}: {index_name}={index} but episode {episode!r} has {n} rows ({index_name} 0..{n - 1}); {hint}",
    )


def duplicate_problem(path: str, episode: str, index: int, kept: str, index_name: str) -> Problem:
    return Problem(
        path, "duplicate-key", f"{path}: ({episode!r}, {index_name}={index}) is also given by {kept}, which is kept"
    )


class _FamilyShape:
    """Row shape, dtype and layout of one family, from the files that hold its entry (the most common wins)."""

    def __init__(
        self, name: str, entry: str, members: list[tuple[int, Item, Any]], layout: str, allow_nonfinite: bool
    ) -> None:
        self.name = name
        self.entry = entry
        self.members = members
        self.allow_nonfinite = allow_nonfinite
        self.cores = [core_shape(info[0]) for _, _, info in members]
        self.dtypes = [info[1] for _, _, info in members]
        self.row_shape, self.ragged = _family_shape(self.cores, layout)
        self.dtype = _mode(self.dtypes)

    def rows(self, files: Sequence[ScannedFile], rows: int) -> tuple[np.ndarray, np.ndarray | None, list[Problem]]:
        """``(row_file, lengths, problems)``: each member that fits the family gives its row."""
        row_file = np.full(rows, -1, dtype=np.int64)
        lengths = np.ones(rows, dtype=np.int64) if self.ragged else None
        problems = []
        for (row, item, info), core, dtype in zip(self.members, self.cores, self.dtypes, strict=True):
            n, problem = self._fit(files[item.file].path, info, core, dtype)
            if problem is not None:
                problems.append(problem)
                continue
            row_file[row] = item.file
            if lengths is not None:
                lengths[row] = n
        return row_file, lengths, problems

    def _fit(self, path: str, info: Any, core: tuple[int, ...], dtype: str) -> tuple[int, Problem | None]:
        """Rows (ragged length) the file gives, or why it does not fit."""
        shape, _, finite = info
        label = path + (f" entry {self.entry!r}" if self.entry != ONLY_TENSOR else "")
        what = f"[L, {', '.join(map(str, self.row_shape))}]" if self.ragged else str(list(self.row_shape))
        n = _fits(core, self.row_shape, self.ragged)
        if not n:
            return 0, Problem(
                path, "wrong-shape", f"{label}: shape {list(shape)}, but family {self.name!r} holds {what} rows"
            )
        if dtype != self.dtype:
            return 0, Problem(
                path,
                "wrong-dtype",
                f"{label}: dtype {dtype}, but family {self.name!r} is "
                f"{self.dtype}; convert the file or ingest it into another family",
            )
        if not finite and not self.allow_nonfinite:
            return 0, Problem(path, "nonfinite", f"{label}: holds NaN or Inf; fix the source or pass --allow-nonfinite")
        return n, None


def _shard_rows(shape: _FamilyShape, lengths: np.ndarray | None, rows_per_shard: int) -> int:
    if shape.ragged and lengths is not None and rows_per_shard == 0 and lengths.size:
        # long token rows: a shard must hold the longest row
        return max(default_rows_per_shard(shape.row_shape, shape.dtype, True), int(lengths.max()))
    return rows_per_shard


def _row_keys(placed: dict[int, Item], catalog: CatalogPlan, row_keys: dict[tuple[str, int], str] | None) -> list[str]:
    """The key of every row: the placed file's, else the one listed for a row without a file (a manifest)."""
    episode_pos = {name: e for e, name in enumerate(catalog.names)}
    episode_rows = np.concatenate([[0], np.cumsum(catalog.items)]).astype(np.int64)
    keys = [""] * int(episode_rows[-1])
    for (episode, index), key in (row_keys or {}).items():
        e = episode_pos.get(episode)
        if e is not None and index < catalog.items[e]:
            keys[int(episode_rows[e]) + index] = key
    for row, item in placed.items():
        keys[row] = item.key or ""
    return keys


def estimate_size(plan: FamilyPlan) -> tuple[int, int]:
    """``(bytes, files)`` the family will take on disk (raw shards: payload, crc per row, index per shard)."""
    spec = plan.spec
    has_source = plan.sources.has_source
    token_rows = int(plan.lengths[has_source].sum()) if plan.lengths is not None else plan.rows_with_source
    capacity = int(plan.lengths.sum()) if plan.lengths is not None else plan.rows
    shards = -(-capacity // spec.rows_per_shard) if capacity else 0
    nbytes = token_rows * (spec.row_nbytes + 4) + shards * index_nbytes(spec.rows_per_shard)
    small_files = 4 + (2 if spec.ragged else 0) + (1 if spec.has_keys else 0)
    return nbytes, shards + small_files
