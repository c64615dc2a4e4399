"""Planning a legacy VL cache from its file names alone, in memory that does not grow with the files.

A folder of ``{dataset}_vlm{idx}.pt`` files is listed once (``os.scandir``) and each
name gives its ``(dataset, vlm_idx)``. Nothing is kept per file: per episode a count
of its files and one byte per row (a file gives that row), plus the names of the few
files not named exactly ``{dataset}_vlm{idx}.pt`` (``ep_vlm007.pt``; every file under
another ``--pattern``), of duplicates, of links leading outside the folder, and the
problems (the first :data:`~vlastore.ingest.report.MAX_PROBLEMS_LISTED`, then counts).

The plan is the one :func:`~vlastore.ingest.plan.plan_catalog` and
:func:`~vlastore.ingest.plan.place_rows` make of the same names (same catalog, same
rows, same problems; a duplicate key keeps the first path in name order), with rows
taken from :class:`~vlastore.ingest.plan.NamedRows`. The files themselves are read by
the workers, which check each one as they write it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..layout import vlm_items
from .plan import CatalogPlan, NamedRows, duplicate_problem, index_limit, placement_problem, usable_name
from .report import IngestError, Problem, ProblemLog
from .scan import NAME_PATTERN
from .source import outside_root

__all__ = ["NameListing", "scan_names", "sample_rows"]


@dataclass(slots=True)
class _Episode:
    """What the names say about one episode."""

    usable: bool
    files: int = 0
    """Names giving this episode, whatever their index (the plausible index range grows with it)."""
    rows: bytearray = field(default_factory=bytearray)
    """``rows[i] == 1``: a file gives index ``i``."""
    renamed: dict[int, str] = field(default_factory=dict)
    """Index -> file name, where it is not ``{episode}_vlm{index}.pt``."""
    later: list[tuple[int, str]] = field(default_factory=list)
    """``(index, name)`` beyond the range plausible so far: decided once every name is seen."""
    clashes: dict[int, list[str]] = field(default_factory=dict)
    """Index -> the other names giving it (duplicates), resolved at the end."""


@dataclass
class NameListing:
    """A cache folder planned from its names: catalog, row sources, problems, links."""

    folder: str
    catalog: CatalogPlan
    sources: NamedRows
    problems: ProblemLog
    found: int
    """Entries named ``*.pt``."""
    others: int
    """Other entries (ignored)."""
    outside: list[tuple[str, str]]
    """``(path, target)`` of symbolic links leading outside the folder (bounded by the number of such links)."""


class _NameScan:
    """One pass over the names of a folder (see the module docstring)."""

    def __init__(
        self,
        folder: str,
        pattern: str,
        store: tuple[list[str], np.ndarray] | None,
        vlm_reuse_count: int,
        skip_outside_links: bool,
        index_name: str,
    ) -> None:
        self.folder = folder
        self.regex = re.compile(pattern)
        self.canonical = pattern == NAME_PATTERN  # only then is a file's name known from its row
        self.store = store
        self.store_rows = (
            None if store is None else dict(zip(store[0], vlm_items(store[1], vlm_reuse_count).tolist(), strict=True))
        )
        self.vlm_reuse_count = vlm_reuse_count
        self.skip_outside_links = skip_outside_links
        self.index_name = index_name
        self.episodes: dict[str, _Episode] = {}
        self.problems = ProblemLog()
        self.found = self.others = 0
        self.outside: list[tuple[str, str]] = []

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def run(self) -> bool:
        """List the folder; False when a name gives no key (the keys are inside the files: a full scan is needed)."""
        real = os.path.realpath(self.folder)
        try:
            with os.scandir(self.folder) as entries:
                return self._scan(entries, real)
        except OSError as exc:
            raise IngestError(f"{self.folder}: cannot list the folder ({exc.strerror or exc})") from None

    def _scan(self, entries: Iterator[os.DirEntry[str]], real: str) -> bool:
        # a million names pass here: the rare cases are methods, the common one stays in this loop
        split, add, canonical = self._split, self._add, self.canonical
        found = others = 0
        try:
            for entry in entries:
                name = entry.name
                if not name.endswith(".pt"):
                    others += 1
                    continue
                found += 1
                if entry.is_symlink() and self._skipped_link(entry, real):
                    continue
                # the default pattern without the regex (as _split), inline: the last "_vlm" before the digits splits
                dataset, sep, index = name[:-3].rpartition("_vlm") if canonical else ("", "", "")
                if not (sep and dataset and index.isdecimal() and "\n" not in dataset):
                    key = split(name)
                    if key is None:
                        return False
                    dataset, index = key
                if index.isdigit() and len(index) <= 18:
                    add(dataset, index, name)
                else:
                    self.problems.add(
                        Problem(
                            entry.path,
                            "index-out-of-range",
                            f"{entry.path}: index {index[:24]!r} "
                            "from the file name is not a whole number below 10^18; rename the file",
                        )
                    )
        finally:
            self.found, self.others = self.found + found, self.others + others
        return True

    def _split(self, name: str) -> tuple[str, str] | None:
        """``(dataset, index digits)`` of a name, as the pattern's groups give them; None when it does not match."""
        if self.canonical:  # the default pattern without the regex: the last "_vlm" before the digits splits
            dataset, sep, digits = name[:-3].rpartition("_vlm")
            if sep and dataset and digits.isdecimal() and "\n" not in dataset:
                return dataset, digits
        match = self.regex.match(name)
        return None if match is None else (match["dataset"] or "", match["index"] or "")

    def _skipped_link(self, entry: os.DirEntry[str], real: str) -> bool:
        """Note a link leading outside the folder; True when it is skipped (``--skip-outside-links``)."""
        target = outside_root(entry.path, real)
        if target is None:
            return False
        self.outside.append((entry.path, target))
        if self.skip_outside_links:
            self.problems.add(
                Problem(
                    entry.path,
                    "outside-source",
                    f"{entry.path}: symbolic link to {target}, "
                    "outside the source folder; not read (--skip-outside-links)",
                )
            )
        return self.skip_outside_links

    def _add(self, dataset: str, digits: str, name: str) -> None:
        index = int(digits)
        episode = self.episodes.get(dataset)
        if episode is None:
            episode = self.episodes[dataset] = _Episode(usable_name(dataset))
        files = episode.files = episode.files + 1
        # under the default pattern a name is {dataset}_vlm{digits}.pt: it is the row's own name unless the
        # digits are written otherwise (leading zeros, other scripts)
        canonical = self.canonical and digits.isascii() and (digits[0] != "0" or len(digits) == 1)
        if self.store_rows is not None:  # the store's catalog says which rows there are
            rows = self.store_rows.get(dataset)
            if rows is None or index >= rows:
                self._placement_problem(dataset, index, name, rows)
                return
        elif not episode.usable:
            self._placement_problem(dataset, index, name, None)
            return
        elif index >= index_limit(files):  # implausible so far: decided once every file is counted
            episode.later.append((index, name))
            return
        rows = episode.rows  # _place, inline for the common case: a new row of a file named after it
        if canonical and (index >= len(rows) or not rows[index]):
            if index >= len(rows):
                rows.extend(bytes(index + 1 - len(rows)))
            rows[index] = 1
        else:
            self._place(episode, index, name, canonical)

    def _place(self, episode: _Episode, index: int, name: str, canonical: bool) -> None:
        rows = episode.rows
        if index >= len(rows):
            rows.extend(bytes(index + 1 - len(rows)))
        if rows[index]:
            episode.clashes.setdefault(index, []).append(name)
            return
        rows[index] = 1
        if not canonical:
            episode.renamed[index] = name

    def _placement_problem(self, dataset: str, index: int, name: str, rows: int | None) -> None:
        """The problem :func:`~vlastore.ingest.plan.placement_problem` gives a file without a row."""
        catalog = CatalogPlan(
            [dataset], np.zeros(1, dtype=np.int64), np.array([rows or 0], dtype=np.int64), self.store is not None
        )
        problem = placement_problem(
            self.path(name), dataset, index, None if rows is None else 0, catalog, self.index_name
        )
        if problem is not None:
            self.problems.add(problem)

    def finish(self) -> NameListing:
        """Decide the indexes set aside, resolve duplicates, and make the catalog and the row sources."""
        for dataset, episode in self.episodes.items():
            self._settle(dataset, episode)
        catalog = self._catalog()
        episode_rows = np.concatenate([[0], np.cumsum(catalog.items)]).astype(np.int64)
        has_source = np.zeros(int(episode_rows[-1]), dtype=bool)
        renamed: dict[int, str] = {}
        for e, dataset in enumerate(catalog.names):
            if dataset not in self.episodes:
                continue
            episode = self.episodes.pop(dataset)  # its bytes are copied once, then freed
            start = int(episode_rows[e])
            has_source[start : start + len(episode.rows)] = np.frombuffer(bytes(episode.rows), dtype=np.uint8) != 0
            renamed.update((start + index, name) for index, name in episode.renamed.items())
        self.problems.listed.sort(key=lambda p: (p.path, p.reason))  # listing order is the folder's: not stable
        sources = NamedRows(self.folder, catalog.names, episode_rows, has_source, renamed)
        return NameListing(self.folder, catalog, sources, self.problems, self.found, self.others, sorted(self.outside))

    def _settle(self, dataset: str, episode: _Episode) -> None:
        if episode.later:
            limit = index_limit(episode.files)
            for index, name in episode.later:
                if index < limit:
                    self._place(episode, index, name, self.canonical and name == f"{dataset}_vlm{index}.pt")
            rows = len(episode.rows)
            for index, name in episode.later:
                if index >= limit:  # the episode's row count is final now: the message gives it
                    self._placement_problem(dataset, index, name, rows if rows else None)
            episode.later = []
        for index, others in sorted(episode.clashes.items()):
            holder = episode.renamed.get(index, f"{dataset}_vlm{index}.pt")
            names = sorted([holder, *others])
            kept = names[0]  # the first path in name order, as place_rows keeps it
            if kept != holder:
                episode.renamed[index] = kept
            for name in names[1:]:
                self.problems.add(duplicate_problem(self.path(name), dataset, index, self.path(kept), self.index_name))
        episode.clashes = {}

    def _catalog(self) -> CatalogPlan:
        if self.store is not None:
            names, steps = self.store
            return CatalogPlan(
                list(names), np.asarray(steps, dtype=np.int64), vlm_items(steps, self.vlm_reuse_count), True
            )
        names = sorted(d for d, e in self.episodes.items() if e.usable and len(e.rows))
        rows = np.array([len(self.episodes[n].rows) for n in names], dtype=np.int64)
        return CatalogPlan(names, rows * self.vlm_reuse_count, rows, False)


def scan_names(
    folder: str,
    pattern: str,
    store: tuple[list[str], np.ndarray] | None,
    vlm_reuse_count: int,
    skip_outside_links: bool = False,
    index_name: str = "vlm_idx",
) -> NameListing | None:
    """Plan a cache folder from its file names; None when some name gives no key (a full scan is needed).

    Args:
        folder: the cache folder (checked to be a folder by the caller).
        pattern: file-name regex with groups ``dataset`` and ``index`` (checked by the caller).
        store: ``(names, steps)`` of the store's catalog (``--into``), or None to make the catalog
            from the names (rows per episode = highest plausible index + 1).
        vlm_reuse_count: steps per row.
    """
    scan = _NameScan(folder, pattern, store, vlm_reuse_count, skip_outside_links, index_name)
    if not scan.run():
        return None
    return scan.finish()


def sample_rows(has_source: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` rows with a source, evenly spread (blockwise: no array as long as the rows)."""
    total = int(np.count_nonzero(has_source))
    if not total:
        return np.zeros(0, dtype=np.int64)
    wanted = np.unique(np.linspace(0, total - 1, min(count, total)).astype(np.int64)).tolist()
    picked: list[int] = []
    seen = 0
    block = 1 << 16
    for start in range(0, has_source.size, block):
        part = has_source[start : start + block]
        n = int(np.count_nonzero(part))
        if wanted and wanted[0] < seen + n:
            positions = np.flatnonzero(part)
            while wanted and wanted[0] < seen + n:
                picked.append(start + int(positions[wanted.pop(0) - seen]))
        seen += n
    return np.asarray(picked, dtype=np.int64)
