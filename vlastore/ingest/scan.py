"""Scanning feature files: read each safely, record its tensors, and place it at (episode, index).

Two layouts of ``.pt`` feature caches are understood:

* a legacy VL cache: one folder of ``{dataset}_vlm{vlm_idx}.pt`` files, or
  hash-named files whose key is in a mapping CSV or inside the file;
* VGGT caches next to images: ``<root>/<episode>/.../<image>.vggt_cache.pt``,
  optionally listed by a manifest at the root.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .plan import Item, ScannedFile
from .ptfile import PtFileError, read_pt, tensor_entries
from .report import IngestError, Problem

__all__ = [
    "NAME_PATTERN",
    "DATASET_FIELDS",
    "INDEX_FIELDS",
    "VGGT_SUFFIX",
    "MANIFEST_NAMES",
    "inspect_pt",
    "list_pt_files",
    "read_mapping",
    "place_pt_cache",
    "list_vggt_files",
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


def values_finite(array: np.ndarray, dtype: str) -> bool:
    """True when no element is NaN/Inf (bfloat16 given as its uint16 bits)."""
    if dtype == "bfloat16":
        return not bool(((array & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(array).all())


def inspect_pt(path: str) -> ScannedFile:
    """Read one ``.pt`` file safely and record its tensors; never raises for a bad file."""
    try:
        nbytes = os.stat(path).st_size
        obj = read_pt(path)
    except PtFileError as exc:
        return ScannedFile(path, _size(path), (exc.reason, str(exc)))
    except OSError as exc:
        return ScannedFile(path, 0, ("unreadable", f"{path}: {exc.strerror or exc}"))
    tensors, meta = tensor_entries(obj)
    info = {k: (t.shape, t.dtype, values_finite(t.array, t.dtype)) for k, t in tensors.items()}
    meta = {k: v for k, v in meta.items() if k in DATASET_FIELDS or k in INDEX_FIELDS}
    return ScannedFile(path, nbytes, None, info, meta)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# --------------------------------------------------------------- legacy VL cache


def list_pt_files(folder: str | os.PathLike[str]) -> tuple[list[str], int]:
    """Sorted ``.pt`` files directly in ``folder`` and the number of other entries (ignored)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder; give the folder that holds the .pt files")
    paths, others = [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".pt") and entry.is_file():
                paths.append(entry.path)
            else:
                others += 1
    paths.sort()
    return paths, others


def read_mapping(path: str | os.PathLike[str]) -> dict[str, tuple[str, int]]:
    """A mapping CSV ``file,dataset,vlm_idx`` (header required) -> ``{file name: (dataset, index)}``.

    Raises:
        IngestError: missing columns or a row that does not parse (with its line number).
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        col_file = next((fields[c] for c in ("file", "path", "filename") if c in fields), None)
        col_ds = next((fields[c] for c in DATASET_FIELDS if c in fields), None)
        col_idx = next((fields[c] for c in INDEX_FIELDS if c in fields), None)
        if not (col_file and col_ds and col_idx):
            raise IngestError(f"{path}: a mapping CSV needs a header with columns file,dataset,vlm_idx; "
                              f"found {reader.fieldnames}")
        out: dict[str, tuple[str, int]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                out[os.path.basename(row[col_file].strip())] = (row[col_ds].strip(), int(row[col_idx]))
            except (ValueError, TypeError, AttributeError):
                raise IngestError(f"{path} line {line}: cannot read {row!r}; vlm_idx must be an integer") from None
    return out


def _meta_key(meta: dict[str, Any]) -> tuple[str, int] | None:
    dataset = next((meta[f] for f in DATASET_FIELDS if isinstance(meta.get(f), str)), None)
    index = next((meta[f] for f in INDEX_FIELDS if isinstance(meta.get(f), int) and not isinstance(meta[f], bool)),
                 None)
    return (dataset, int(index)) if dataset is not None and index is not None else None


def place_pt_cache(
    files: list[ScannedFile], pattern: str = NAME_PATTERN, mapping: dict[str, tuple[str, int]] | None = None
) -> tuple[list[Item], list[Problem]]:
    """Give every file its ``(dataset, vlm_idx)``: from its name, else the mapping, else its metadata."""
    regex = re.compile(pattern)
    if not {"dataset", "index"} <= set(regex.groupindex):
        raise IngestError(f"--pattern {pattern!r} needs the named groups (?P<dataset>...) and (?P<index>...)")
    items: list[Item] = []
    problems: list[Problem] = []
    for i, sf in enumerate(files):
        name = os.path.basename(sf.path)
        match = regex.match(name)
        if match:
            items.append(Item(i, match["dataset"], int(match["index"]), priority=0))
        elif mapping is not None and name in mapping:
            items.append(Item(i, mapping[name][0], mapping[name][1], priority=1))
        elif sf.problem is None and (key := _meta_key(sf.meta)) is not None:
            items.append(Item(i, key[0], key[1], priority=2))
        elif sf.problem is not None:
            problems.append(Problem(sf.path, *sf.problem))
        elif mapping is not None:
            problems.append(Problem(sf.path, "no-mapping-row", f"{sf.path}: not in the mapping file, its name does not "
                                    "match the pattern and it holds no dataset/vlm_idx metadata"))
        else:
            problems.append(Problem(sf.path, "unmatched-name", f"{sf.path}: name does not match {pattern!r} and the "
                                    "file holds no dataset/vlm_idx metadata; give --mapping CSV "
                                    "(file,dataset,vlm_idx)"))
    return items, problems


# --------------------------------------------------------------- VGGT caches


def list_vggt_files(root: str | os.PathLike[str]) -> list[str]:
    """Every ``*.vggt_cache.pt`` under ``root``, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder; give the data root that holds one folder per episode")
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(os.path.join(dirpath, n) for n in filenames if n.endswith(VGGT_SUFFIX))
    out.sort()
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Episode -> image paths (relative to the data root) in row order.

    Accepted: JSON ``{episode: [image, ...]}`` (optionally under ``"episodes"``),
    a JSON list / JSONL of ``{"episode": ..., "image": ...}`` records or of image
    paths, or a CSV with columns ``episode`` (optional) and ``image``/``path``.
    An image path without a folder is taken relative to its episode's folder.
    """
    path = Path(path)
    records: list[tuple[str | None, str]] = []
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    image = row.get("image") or row.get("path") or row.get("image_path")
                    if image:
                        records.append((row.get("episode") or row.get("dataset"), image))
        else:
            text = path.read_text()
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()] \
                if path.suffix == ".jsonl" else json.loads(text)
            if isinstance(data, dict):
                data = data.get("episodes", data)
            if isinstance(data, dict):
                records = [(str(ep), str(img)) for ep, imgs in data.items() for img in imgs]
            else:
                for rec in data:
                    if isinstance(rec, str):
                        records.append((None, rec))
                    elif isinstance(rec, dict):
                        image = rec.get("image") or rec.get("path") or rec.get("image_path")
                        if image:
                            records.append((rec.get("episode") or rec.get("dataset"), str(image)))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise IngestError(f"{path}: cannot read the manifest ({exc}); fix it or pass --no-manifest") from None
    out: dict[str, list[str]] = defaultdict(list)
    for episode, image in records:
        image = image.replace("\\", "/")
        image = image[2:] if image.startswith("./") else image
        if episode and "/" not in image:
            image = f"{episode}/{image}"
        out[episode or image.split("/", 1)[0]].append(image)
    return dict(out)


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
                problems.append(Problem(files[i].path, "no-mapping-row", f"{files[i].path}: image {image!r} is not in "
                                        "the manifest; add it, or pass --no-manifest to order images by name"))
        return items, row_keys, problems
    per_episode: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, image in images:
        if "/" not in image:
            problems.append(Problem(files[i].path, "unmatched-name", f"{files[i].path}: not inside an episode folder "
                                    "of the data root (expected <root>/<episode>/.../<image>.vggt_cache.pt)"))
            continue
        per_episode[image.split("/", 1)[0]].append((i, image))
    for episode, members in per_episode.items():
        for index, (i, image) in enumerate(members):
            items.append(Item(i, episode, index, key=image))
            row_keys[(episode, index)] = image
    return items, row_keys, problems
