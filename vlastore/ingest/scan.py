"""Scanning feature files: read each safely, record its tensors, and place it at (episode, index).

Two layouts of ``.pt`` feature caches are understood:

* a legacy VL cache: one folder of ``{dataset}_vlm{vlm_idx}.pt`` files, or
  hash-named files whose key is in a mapping CSV or inside the file;
* VGGT caches next to images: ``<root>/<episode>/.../<image>.vggt_cache.pt``,
  optionally listed by a manifest at the root.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .plan import Item, ScannedFile
from .ptfile import read_pt, tensor_entries
from .report import IngestError, IngestUsageError, Problem
from .source import MAX_FILE_BYTES, SourceError, file_size, open_source, outside_root, retrying

__all__ = [
    "NAME_PATTERN",
    "DATASET_FIELDS",
    "INDEX_FIELDS",
    "VGGT_SUFFIX",
    "MANIFEST_NAMES",
    "MAX_INDEX_FILE_BYTES",
    "MAX_INDEX",
    "Listing",
    "require_folder",
    "inspect_pt",
    "list_pt_files",
    "read_mapping",
    "place_pt_cache",
    "list_vggt_files",
    "find_manifest",
    "read_manifest",
    "place_vggt",
    "values_finite",
]

NAME_PATTERN = r"^(?P<dataset>.+)_vlm(?P<index>\d+)\.pt$"
"""Default file-name pattern of a legacy VL cache (``dataset`` may contain ``_`` and digits)."""

DATASET_FIELDS = ("dataset", "dataset_name", "episode", "episode_name")
INDEX_FIELDS = ("vlm_idx", "index", "idx")
VGGT_SUFFIX = ".vggt_cache.pt"
MANIFEST_NAMES = ("manifest.json", "manifest.jsonl", "manifest.csv")

MAX_INDEX_FILE_BYTES = 256 << 20
"""Largest mapping CSV or manifest read (256 MiB: tens of millions of rows)."""

MAX_INDEX = (1 << 62) - 1
"""Largest row index taken from a file name, a mapping or file metadata; beyond it the file is skipped."""


def values_finite(array: np.ndarray, dtype: str) -> bool:
    """True when no element is NaN/Inf (bfloat16 given as its uint16 bits)."""
    if dtype == "bfloat16":
        return not bool(((array & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(array).all())


def inspect_pt(path: str, max_bytes: int = MAX_FILE_BYTES) -> ScannedFile:
    """Read one ``.pt`` file safely and record its tensors; never raises for a bad file.

    Transient I/O errors are retried (:func:`~vlastore.ingest.source.retrying`).
    """
    try:
        return retrying(lambda: _inspect(path, max_bytes))
    except SourceError as exc:
        return ScannedFile(path, file_size(path), (exc.reason, str(exc)))
    except Exception as exc:  # noqa: BLE001 - one bad file is one skipped file, whatever it raises
        return ScannedFile(path, file_size(path), ("corrupt", f"{path}: {type(exc).__name__}: {str(exc)[:200]}"))


def _inspect(path: str, max_bytes: int) -> ScannedFile:
    tensors, meta = tensor_entries(read_pt(path, max_bytes))
    info = {k: (t.shape, t.dtype, values_finite(t.array, t.dtype)) for k, t in tensors.items()}
    meta = {k: v for k, v in meta.items() if k in DATASET_FIELDS or k in INDEX_FIELDS}
    return ScannedFile(path, file_size(path), None, info, meta)


@dataclass
class Listing:
    """Source files found under a folder (whatever their type: reading them says what is wrong)."""

    paths: list[str] = field(default_factory=list)
    others: int = 0
    """Entries that are not source files (ignored)."""
    outside: list[tuple[str, str]] = field(default_factory=list)
    """``(path, target)`` of symbolic links leading outside the source folder."""
    unlisted: list[str] = field(default_factory=list)
    """Folders that could not be listed."""


def require_folder(folder: str | os.PathLike[str], what: str) -> str:
    """The real path of ``folder``.

    Raises:
        IngestUsageError: it is not a folder (``what`` says which folder to give).
    """
    if not os.path.isdir(folder):
        kind = "no such folder" if not os.path.exists(folder) else "not a folder"
        raise IngestUsageError(f"{folder}: {kind}; give {what}")
    return os.path.realpath(folder)


# --------------------------------------------------------------- legacy VL cache


def list_pt_files(folder: str | os.PathLike[str]) -> Listing:
    """Every entry named ``*.pt`` directly in ``folder`` (sorted), and the number of other entries.

    Entries are listed by name, not by type: a dangling link, a FIFO or a
    folder named ``x.pt`` is listed too and reported when read.

    Raises:
        IngestUsageError: ``folder`` is not a folder.
    """
    real = require_folder(folder, "the folder that holds the .pt files")
    listing = Listing()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".pt"):
                    listing.paths.append(entry.path)
                    if entry.is_symlink() and (target := outside_root(entry.path, real)) is not None:
                        listing.outside.append((entry.path, target))
                else:
                    listing.others += 1
    except OSError as exc:
        raise IngestError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    listing.paths.sort()
    listing.outside.sort()
    return listing


def _open_index_file(path: str | os.PathLike[str], option: str) -> io.TextIOWrapper:
    try:
        return io.TextIOWrapper(open_source(path, MAX_INDEX_FILE_BYTES), encoding="utf-8", newline="")
    except SourceError as exc:
        raise IngestUsageError(f"{option} {path}: {exc}; give a regular file") from None


def _header(names: list[str], path: str | os.PathLike[str]) -> list[str]:
    seen: set[str] = set()
    for name in (n.strip().lower() for n in names):
        if name in seen:
            raise IngestError(f"{path}: the header names column {name!r} twice; keep one column of each name")
        seen.add(name)
    return [n.strip().lower() for n in names]


def read_mapping(path: str | os.PathLike[str]) -> dict[str, tuple[str, int]]:
    """A mapping CSV ``file,dataset,vlm_idx`` (header required) -> ``{file name: (dataset, index)}``.

    Raises:
        IngestUsageError: not a regular file (a FIFO is never waited on).
        IngestError: missing or repeated columns, a row that does not parse (with its line number).
    """
    with _open_index_file(path, "--mapping") as f:
        try:
            reader = csv.reader(f)
            header = _header(next(reader, []), path)
            col_file = next((header.index(c) for c in ("file", "path", "filename") if c in header), None)
            col_ds = next((header.index(c) for c in DATASET_FIELDS if c in header), None)
            col_idx = next((header.index(c) for c in INDEX_FIELDS if c in header), None)
            if col_file is None or col_ds is None or col_idx is None:
                raise IngestError(
                    f"{path}: a mapping CSV needs a header with columns file,dataset,vlm_idx; found {header[:10]}"
                )
            out: dict[str, tuple[str, int]] = {}
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    index = row[col_idx].strip()
                    if not index.isdigit() or len(index) > 18:
                        raise ValueError(index)
                    out[os.path.basename(row[col_file].strip())] = (row[col_ds].strip(), int(index))
                except (ValueError, IndexError):
                    raise IngestError(
                        f"{path} line {line}: cannot read {row[:4]!r}; vlm_idx must be an integer from 0 to 10^18"
                    ) from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise IngestError(f"{path}: not a UTF-8 CSV file ({str(exc)[:120]})") from None
    return out


def _meta_key(meta: dict[str, Any]) -> tuple[str, int] | None:
    dataset = next((meta[f] for f in DATASET_FIELDS if isinstance(meta.get(f), str)), None)
    index = next(
        (meta[f] for f in INDEX_FIELDS if isinstance(meta.get(f), int) and not isinstance(meta[f], bool)), None
    )
    if dataset is None or index is None or not 0 <= index <= MAX_INDEX:
        return None
    return dataset, int(index)


def place_pt_cache(
    files: list[ScannedFile], pattern: str = NAME_PATTERN, mapping: dict[str, tuple[str, int]] | None = None
) -> tuple[list[Item], list[Problem]]:
    """Give every file its ``(dataset, vlm_idx)``: from its name, else the mapping, else its metadata.

    Raises:
        IngestUsageError: ``pattern`` is not a regex with the groups ``dataset`` and ``index``.
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise IngestUsageError(f"--pattern {pattern!r} is not a regular expression ({exc})") from None
    if not {"dataset", "index"} <= set(regex.groupindex):
        raise IngestUsageError(f"--pattern {pattern!r} needs the named groups (?P<dataset>...) and (?P<index>...)")
    items: list[Item] = []
    problems: list[Problem] = []
    for i, sf in enumerate(files):
        name = os.path.basename(sf.path)
        match = regex.match(name)
        if match:
            index = match["index"] or ""
            if index.isdigit() and len(index) <= 18:
                items.append(Item(i, match["dataset"] or "", int(index), priority=0))
            else:
                problems.append(
                    Problem(
                        sf.path,
                        "index-out-of-range",
                        f"{sf.path}: index {index[:24]!r} from the "
                        "file name is not a whole number below 10^18; rename the file",
                    )
                )
        elif mapping is not None and name in mapping:
            items.append(Item(i, mapping[name][0], mapping[name][1], priority=1))
        elif sf.problem is None and (key := _meta_key(sf.meta)) is not None:
            items.append(Item(i, key[0], key[1], priority=2))
        elif sf.problem is not None:
            problems.append(Problem(sf.path, *sf.problem))
        elif mapping is not None:
            problems.append(
                Problem(
                    sf.path,
                    "no-mapping-row",
                    f"{sf.path}: not in the mapping file, its name does not "
                    "match the pattern and it holds no dataset/vlm_idx metadata",
                )
            )
        else:
            problems.append(
                Problem(
                    sf.path,
                    "unmatched-name",
                    f"{sf.path}: name does not match {pattern!r} (i.e. "
                    "{dataset}_vlm{idx}.pt) and the file holds no dataset/vlm_idx metadata; give "
                    "--mapping CSV (file,dataset,vlm_idx) or --pattern",
                )
            )
    return items, problems


# --------------------------------------------------------------- VGGT caches


def list_vggt_files(root: str | os.PathLike[str]) -> Listing:
    """Every entry named ``*.vggt_cache.pt`` under ``root`` (sorted), whatever its type.

    Linked folders are not followed (as ``os.walk``); a folder named like a
    cache is listed as a file, and reported when read.

    Raises:
        IngestUsageError: ``root`` is not a folder.
    """
    real = require_folder(root, "the data root that holds one folder per episode")
    listing = Listing()
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            listing.unlisted.append(folder)
            continue
        for entry in entries:
            if entry.name.endswith(VGGT_SUFFIX):
                listing.paths.append(entry.path)
                if entry.is_symlink() and (target := outside_root(entry.path, real)) is not None:
                    listing.outside.append((entry.path, target))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    listing.paths.sort()
    listing.outside.sort()
    return listing


def find_manifest(root: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """``(path, note)``: the manifest at the root, if any; a note when one is there but not a regular file."""
    for name in MANIFEST_NAMES:
        path = os.path.join(root, name)
        if os.path.lexists(path):
            if os.path.isfile(path):
                return path, None
            return None, f"{path} is not a regular file: ignored (images ordered by name)"
    return None, None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Episode -> image paths (relative to the data root) in row order.

    Accepted: JSON ``{episode: [image, ...]}`` (optionally under ``"episodes"``),
    a JSON list / JSONL of ``{"episode": ..., "image": ...}`` records or of image
    paths, or a CSV with columns ``episode`` (optional) and ``image``/``path``.
    An image path without a folder is taken relative to its episode's folder.

    Raises:
        IngestUsageError: not a regular file. IngestError: it does not parse.
    """
    path = Path(path)
    with _open_index_file(path, "--manifest") as f:
        try:
            records = _manifest_csv(f, path) if path.suffix == ".csv" else _manifest_json(f.read(), path)
        except (OSError, ValueError, TypeError, AttributeError, RecursionError, csv.Error) as exc:
            raise IngestError(
                f"{path}: cannot read the manifest ({str(exc)[:200]}); fix it or pass --no-manifest"
            ) from None
    out: dict[str, list[str]] = defaultdict(list)
    for episode, image in records:
        image = image.replace("\\", "/")
        image = image[2:] if image.startswith("./") else image
        if episode and "/" not in image:
            image = f"{episode}/{image}"
        out[str(episode) if episode else image.split("/", 1)[0]].append(image)
    return dict(out)


def _manifest_csv(f: io.TextIOWrapper, path: Path) -> list[tuple[str | None, str]]:
    """``(episode or None, image)`` rows of a CSV manifest (columns ``image``/``path``, optional ``episode``)."""
    reader = csv.reader(f)
    header = _header(next(reader, []), path)
    col_image = next((header.index(c) for c in ("image", "path", "image_path") if c in header), None)
    col_episode = next((header.index(c) for c in ("episode", "dataset") if c in header), None)
    if col_image is None:
        raise ValueError(f"no image column in {header[:10]}")
    records: list[tuple[str | None, str]] = []
    for row in reader:
        image = row[col_image] if col_image < len(row) else ""
        episode = row[col_episode] if col_episode is not None and col_episode < len(row) else None
        if image:
            records.append((episode or None, image))
    return records


def _manifest_json(text: str, path: Path) -> list[tuple[str | None, str]]:
    """``(episode or None, image)`` records of a JSON or JSONL manifest (a mapping, records or image paths)."""
    data: Any = (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".jsonl"
        else json.loads(text)
    )
    if isinstance(data, dict):
        data = data.get("episodes", data)
    if isinstance(data, dict):
        return [(str(ep), str(img)) for ep, imgs in data.items() for img in imgs]
    records: list[tuple[str | None, str]] = []
    for rec in data:
        if isinstance(rec, str):
            records.append((None, rec))
        elif isinstance(rec, dict):
            image = rec.get("image") or rec.get("path") or rec.get("image_path")
            episode = rec.get("episode") or rec.get("dataset")
            if image:
                records.append((str(episode) if episode else None, str(image)))
    return records


def place_vggt(
    files: list[ScannedFile], root: str, manifest: dict[str, list[str]] | None
) -> tuple[list[Item], dict[tuple[str, int], str], list[Problem]]:
    """Place VGGT caches: episode = first folder under ``root``, index = image order, key = image path.

    Returns the items, the key of every planned row (rows without a cache
    included, when a manifest lists them) and the problems.
    """
    items: list[Item] = []
    problems: list[Problem] = []
    images: list[tuple[int, str]] = []
    for i, sf in enumerate(files):
        rel = os.path.relpath(sf.path, root).replace(os.sep, "/")
        images.append((i, rel[: -len(VGGT_SUFFIX)]))
    row_keys: dict[tuple[str, int], str] = {}
    if manifest is not None:
        position = {}
        for episode, paths in manifest.items():
            for index, image in enumerate(paths):
                position[image] = (episode, index)
                row_keys[(episode, index)] = image
        for i, image in images:
            if image in position:
                episode, index = position[image]
                items.append(Item(i, episode, index, key=image))
            else:
                problems.append(
                    Problem(
                        files[i].path,
                        "no-mapping-row",
                        f"{files[i].path}: image {image!r} is not in "
                        "the manifest; add it, or pass --no-manifest to order images by name",
                    )
                )
        return items, row_keys, problems
    per_episode: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, image in images:
        if "/" not in image:
            problems.append(
                Problem(
                    files[i].path,
                    "unmatched-name",
                    f"{files[i].path}: not inside an episode folder "
                    "of the data root (expected <root>/<episode>/.../<image>.vggt_cache.pt)",
                )
            )
            continue
        per_episode[image.split("/", 1)[0]].append((i, image))
    for episode, members in per_episode.items():
        for index, (i, image) in enumerate(members):
            items.append(Item(i, episode, index, key=image))
            row_keys[(episode, index)] = image
    return items, row_keys, problems
