"""The on-disk contract: layout paths, the format version and the manifest schema.

Pure Python and numpy: no zarr, no torch. docs/FORMAT.md describes the same
things in prose; a change here is a format change and needs a version bump and
a new golden store under ``tests/data/``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "GENERATION_KEY",
    "TRUE_DTYPES",
    "FamilySpec",
    "Producer",
    "GenerationInfo",
    "FamilyEntry",
    "Manifest",
    "FormatError",
    "validate_name",
    "storage_dtype",
    "row_nbytes",
    "episodes_path",
    "series_path",
    "family_path",
    "generation_path",
    "shard_key",
    "default_rows_per_shard",
    "FIXED_SHARD_ROWS",
    "RAGGED_SHARD_ROWS",
    "SeriesInfo",
    "SHARD_TARGET_BYTES",
]

FORMAT_VERSION = 1
"""Bumped on any change a reader of the previous version could misread."""

MANIFEST_KEY = "vlastore"
"""Root group attribute holding the :class:`Manifest`."""

GENERATION_KEY = "vlastore_generation"
"""Generation group attribute holding the :class:`GenerationInfo`."""

EPISODES_GROUP = "episodes"
SERIES_GROUP = "series"
FEATURES_GROUP = "features"

FIXED_SHARD_ROWS = 4096
"""Default rows per shard for small fixed-shape rows (one file per 4,096 rows)."""

RAGGED_SHARD_ROWS = 16384
"""Default token rows per shard of a ragged family; the shard index costs 16 bytes
per token row whether used or not, so it is kept to 256 KiB."""

SHARD_TARGET_BYTES = 64 * 1024 * 1024
"""Shards of big rows (or ragged families) hold about this many payload bytes."""

TRUE_DTYPES: dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
"""Feature dtype -> the zarr dtype its bits are stored as (zarr 3.1 has no bfloat16)."""

COMPRESSIONS = (None, "zstd")

_NAME_OK = re.compile(r"^[A-Za-z0-9._\-+=@,:~]+$")


class FormatError(ValueError):
    """The store, or a value given for it, breaks the format contract."""


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is usable as an episode, family or series name.

    Names become zarr node names and appear in error messages, so they may not be
    empty, contain path separators, ``..``, whitespace or control characters.

    Raises:
        FormatError: naming the offending value and what is allowed.
    """
    if not isinstance(name, str):
        raise FormatError(f"{what} must be a string, got {type(name).__name__} {name!r}")
    if not name:
        raise FormatError(f"{what} is empty; give every {what} a non-empty name")
    if name in (".", "..") or ".." in name:
        raise FormatError(f"{what} {name!r} is '.' or contains '..'; names may not walk the store's folders")
    if "/" in name or "\\" in name:
        raise FormatError(f"{what} {name!r} contains a path separator ('/' or '\\'); use '_' instead")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise FormatError(f"{what} {name!r} contains a control character; remove it")
    if not _NAME_OK.match(name):
        raise FormatError(
            f"{what} {name!r} has characters outside letters, digits and ._-+=@,:~ "
            "(no spaces); rename it"
        )
    return name


def storage_dtype(true_dtype: str) -> np.dtype:
    """The numpy dtype whose bits a feature of ``true_dtype`` is stored as."""
    try:
        return np.dtype(TRUE_DTYPES[true_dtype])
    except KeyError:
        raise FormatError(
            f"unsupported feature dtype {true_dtype!r}; use one of {sorted(TRUE_DTYPES)}"
        ) from None


def row_nbytes(row_shape: tuple[int, ...], true_dtype: str) -> int:
    """Payload bytes of one stored row (one token row for ragged families)."""
    return int(math.prod(row_shape)) * storage_dtype(true_dtype).itemsize


def default_rows_per_shard(row_shape: tuple[int, ...], true_dtype: str, ragged: bool) -> int:
    """Rows (token rows for ragged families) per shard file.

    Small fixed rows: 4,096 per shard, so a million rows make ~250 files; ragged
    families: 16,384 token rows. Big rows: about :data:`SHARD_TARGET_BYTES` per shard.
    """
    per_row = row_nbytes(row_shape, true_dtype)
    by_bytes = max(1, SHARD_TARGET_BYTES // per_row)
    return min(RAGGED_SHARD_ROWS if ragged else FIXED_SHARD_ROWS, by_bytes)


# ---------------------------------------------------------------- layout paths


def episodes_path(column: str) -> str:
    """Catalog array: ``name``, ``steps`` or ``step_offsets``."""
    return f"{EPISODES_GROUP}/{column}"


def series_path(key: str) -> str:
    return f"{SERIES_GROUP}/{key}"


def family_path(family: str) -> str:
    return f"{FEATURES_GROUP}/{family}"


def generation_path(family: str, generation: int) -> str:
    return f"{FEATURES_GROUP}/{family}/gen-{generation:04d}"


def shard_key(array_path: str, shard: int, ndim: int) -> str:
    """Store key of shard ``shard`` (along axis 0) of an array sharded only on axis 0."""
    return "/".join([array_path, "c", str(shard)] + ["0"] * (ndim - 1))


# ---------------------------------------------------------------- manifest schema


@dataclass(frozen=True)
class Producer:
    """What produced a generation of features."""

    model: str = ""
    """Model id or path, e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``."""
    revision: str = ""
    """Model revision (commit hash or tag); empty when unknown."""
    fingerprint: str = ""
    """Hash of the weights (and adapter) that produced the rows; empty when unknown."""
    params: dict[str, Any] = field(default_factory=dict)
    """Producer parameters: pooling, layer, image size, ..."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Producer:
        return cls(
            model=str(data.get("model", "")),
            revision=str(data.get("revision", "")),
            fingerprint=str(data.get("fingerprint", "")),
            params=dict(data.get("params", {})),
        )


@dataclass(frozen=True)
class FamilySpec:
    """Shape of the rows of one feature family (fixed for all its generations).

    A *row* is one item, addressed by ``(dataset, index)``; ``index`` is
    ``vlm_idx`` for VLM features, an image number for per-image features.
    Fixed families store rows of ``row_shape``; ragged families store rows of
    ``[L_i, *row_shape]`` with a length ``L_i >= 1`` per row.
    """

    row_shape: tuple[int, ...]
    dtype: str
    ragged: bool = False
    index_name: str = "vlm_idx"
    vlm_reuse_count: int | None = None
    """Steps served by one row: row ``step // vlm_reuse_count`` belongs to ``step``."""
    allow_nonfinite: bool = False
    compression: str | None = None
    """``None`` (raw, memory-mappable) or ``"zstd"``."""
    rows_per_shard: int = 0
    """Rows (token rows when ragged) per shard file; 0 picks :func:`default_rows_per_shard`."""
    has_keys: bool = False
    """Each row also carries a string key (e.g. an image path relative to the data root)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_shape", tuple(int(d) for d in self.row_shape))
        storage_dtype(self.dtype)
        if any(d < 1 for d in self.row_shape):
            raise FormatError(f"row_shape {self.row_shape} has a dimension < 1")
        if self.ragged and not self.row_shape:
            raise FormatError("a ragged family needs a row_shape for one token, e.g. (2048,)")
        if self.compression not in COMPRESSIONS:
            raise FormatError(f"compression {self.compression!r} is not one of {COMPRESSIONS}")
        if self.vlm_reuse_count is not None and self.vlm_reuse_count < 1:
            raise FormatError(f"vlm_reuse_count must be >= 1, got {self.vlm_reuse_count}")
        validate_name(self.index_name, "index_name")
        if self.rows_per_shard == 0:
            object.__setattr__(
                self, "rows_per_shard", default_rows_per_shard(self.row_shape, self.dtype, self.ragged)
            )
        if self.rows_per_shard < 1:
            raise FormatError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    @property
    def storage_dtype(self) -> np.dtype:
        return storage_dtype(self.dtype)

    @property
    def row_nbytes(self) -> int:
        return row_nbytes(self.row_shape, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["row_shape"] = list(self.row_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilySpec:
        return cls(
            row_shape=tuple(data["row_shape"]),
            dtype=data["dtype"],
            ragged=bool(data.get("ragged", False)),
            index_name=data.get("index_name", "vlm_idx"),
            vlm_reuse_count=data.get("vlm_reuse_count"),
            allow_nonfinite=bool(data.get("allow_nonfinite", False)),
            compression=data.get("compression"),
            rows_per_shard=int(data["rows_per_shard"]),
            has_keys=bool(data.get("has_keys", False)),
        )


@dataclass(frozen=True)
class GenerationInfo:
    """One generation of a family: its rows and who produced them. Written once."""

    generation: int
    spec: FamilySpec
    producer: Producer
    rows: int
    capacity: int
    """Length of ``values`` along axis 0 (token rows for ragged families)."""
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "spec": self.spec.to_dict(),
            "producer": self.producer.to_dict(),
            "rows": self.rows,
            "capacity": self.capacity,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationInfo:
        return cls(
            generation=int(data["generation"]),
            spec=FamilySpec.from_dict(data["spec"]),
            producer=Producer.from_dict(data.get("producer", {})),
            rows=int(data["rows"]),
            capacity=int(data["capacity"]),
            created=str(data.get("created", "")),
        )


@dataclass(frozen=True)
class FamilyEntry:
    """A family in the root manifest: which generations exist, which one readers use."""

    current_generation: int
    generations: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"current_generation": self.current_generation, "generations": list(self.generations)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilyEntry:
        return cls(int(data["current_generation"]), tuple(int(g) for g in data["generations"]))


@dataclass(frozen=True)
class SeriesInfo:
    columns: tuple[str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesInfo:
        return cls(tuple(data["columns"]), str(data["dtype"]))


@dataclass(frozen=True)
class Manifest:
    """The root attribute ``vlastore``: the single source of what the store holds."""

    format_version: int
    vlastore_version: str
    created: str
    episodes: int
    steps: int
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    families: dict[str, FamilyEntry] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "vlastore_version": self.vlastore_version,
            "created": self.created,
            "episodes": self.episodes,
            "steps": self.steps,
            "series": {k: v.to_dict() for k, v in self.series.items()},
            "families": {k: v.to_dict() for k, v in self.families.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "store") -> Manifest:
        version = data.get("format_version")
        if not isinstance(version, int):
            raise FormatError(f"{where}: manifest has no integer format_version; not a vlastore store")
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{where} was written in vlastore format version {version} "
                f"(by vlastore {data.get('vlastore_version', '?')}); this vlastore reads "
                f"versions up to {FORMAT_VERSION}. Upgrade: pip install -U vlastore"
            )
        return cls(
            format_version=version,
            vlastore_version=str(data.get("vlastore_version", "")),
            created=str(data.get("created", "")),
            episodes=int(data["episodes"]),
            steps=int(data["steps"]),
            series={k: SeriesInfo.from_dict(v) for k, v in data.get("series", {}).items()},
            families={k: FamilyEntry.from_dict(v) for k, v in data.get("families", {}).items()},
        )
