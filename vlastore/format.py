"""The on-disk contract: layout paths, the format version and the manifest schema.

Pure Python and numpy: no zarr, no torch. docs/FORMAT.md describes the same
things in prose; a change here is a format change and needs a version bump and
a new golden store under ``tests/data/``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from crc32c import crc32c as _crc32c

__all__ = [
    "FORMAT_VERSION",
    "TIMESTAMP_SERIES",
    "MANIFEST_KEY",
    "GENERATION_KEY",
    "TRUE_DTYPES",
    "FamilySpec",
    "Producer",
    "GenerationInfo",
    "FamilyEntry",
    "Manifest",
    "FormatError",
    "NewerFormatError",
    "validate_name",
    "storage_dtype",
    "row_nbytes",
    "episodes_path",
    "series_path",
    "family_path",
    "generation_path",
    "generation_array_path",
    "values_path",
    "shard_key",
    "shard_of_key",
    "chunk_array_parts",
    "generation_node_of",
    "meta_key",
    "META_NAME",
    "TOP_GROUPS",
    "EPISODES_GROUP",
    "SERIES_GROUP",
    "FEATURES_GROUP",
    "default_rows_per_shard",
    "FIXED_SHARD_ROWS",
    "RAGGED_SHARD_ROWS",
    "SeriesInfo",
    "SHARD_TARGET_BYTES",
    "CHECKSUM_FIELD",
    "seal",
    "check_seal",
    "canonical_json",
    "MAX_ROWS",
    "MAX_EPISODES",
    "MAX_STEPS",
    "MAX_ROWS_PER_SHARD",
    "MAX_ROW_NBYTES",
    "MAX_SHARD_NBYTES",
    "MAX_ROW_DIMS",
    "MAX_SERIES_COLUMNS",
    "MAX_GENERATION",
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

TIMESTAMP_SERIES = "timestamp"
"""Series key of per-step times in seconds (LeRobot's name): ingest keeps a ``timestamp`` column there."""

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

SERIES_DTYPES = ("float16", "float32", "float64")

# ---------------------------------------------------------------- limits
# Sizes read from a store decide how much memory a reader or writer allocates. A store
# declaring more than these is refused with a FormatError before anything is allocated
# (docs/FORMAT.md, "Limits"). Each is far above any real store (the largest known feature
# cache has 1.1e6 rows) and low enough that what it lets a process allocate stays sane.

MAX_ROWS = 1 << 32
"""Rows (and token rows: ``capacity``) of one family generation."""

MAX_EPISODES = 1 << 28
"""Episodes of a store (the catalog is read whole at open)."""

MAX_STEPS = 1 << 36
"""Steps of a store, all episodes together."""

MAX_ROWS_PER_SHARD = 1 << 20
"""Inner chunks per shard file: the shard index is 16 bytes per chunk (16 MiB at most)."""

MAX_ROW_NBYTES = 1 << 31
"""Payload bytes of one stored row (one token row for ragged families)."""

MAX_SHARD_NBYTES = 1 << 34
"""Payload bytes of one shard file (``rows_per_shard * row_nbytes``): a writer holds one in memory."""

MAX_ROW_DIMS = 8
"""Dimensions of ``row_shape``."""

MAX_SERIES_COLUMNS = 1 << 16
"""Columns of one robot series."""

MAX_GENERATION = 1_000_000
"""Largest generation number."""

CHECKSUM_FIELD = "checksum"
"""Field of the manifest and of every generation's attributes holding ``crc32c:<8 hex digits>``."""

_NAME_OK = re.compile(r"^[A-Za-z0-9._\-+=@,:~]+\Z")


class FormatError(ValueError):
    """The store, or a value given for it, breaks the format contract."""


class NewerFormatError(FormatError):
    """The store was written in a newer format version than this vlastore reads: upgrade vlastore."""


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is usable as an episode, family or series name.

    Names become zarr node names and appear in error messages, so they may not be
    empty, contain path separators, ``..``, whitespace or control characters.

    Raises:
        FormatError: naming the offending value and what is allowed.
    """
    if not isinstance(name, str):
        raise FormatError(f"{what} must be a string, got {type(name).__name__} {name!r}")
    if _NAME_OK.match(name) and ".." not in name and name != ".":  # the usual case, one regex (catalogs of 1e5)
        return name
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
            f"{what} {name!r} has characters outside letters, digits and ._-+=@,:~ (no spaces); rename it"
        )
    return name


def canonical_json(data: dict[str, Any]) -> bytes:
    """The bytes a metadata checksum covers: JSON with sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _checksum(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    return f"crc32c:{_crc32c(canonical_json(body)):08x}"


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its ``checksum`` field set (any previous one replaced)."""
    return {**{k: v for k, v in data.items() if k != CHECKSUM_FIELD}, CHECKSUM_FIELD: _checksum(data)}


def check_seal(data: dict[str, Any], where: str) -> bool:
    """Verify the ``checksum`` field of a metadata dict.

    Returns:
        True when the dict carries a checksum (and it matches), False when it has
        none (stores written before metadata checksums existed have none; they are still read).

    Raises:
        FormatError: the checksum does not match (a flipped bit, or an edit by hand).
    """
    stored = data.get(CHECKSUM_FIELD)
    if stored is None:
        return False
    try:
        expected = _checksum(data)
    except (TypeError, ValueError) as exc:  # not JSON-serialisable: certainly not what vlastore wrote
        raise FormatError(f"{where}: metadata cannot be checksummed ({exc}); the file is damaged") from None
    if stored != expected:
        raise FormatError(
            f"{where}: metadata checksum mismatch (stored {stored!r}, computed {expected!r}): the file was "
            "damaged or edited by hand. Restore it from a copy; `vlastore verify` lists what else is damaged"
        )
    return True


def _int(data: dict[str, Any], key: str, where: str, lo: int, hi: int, default: Any = ...) -> int:
    """``data[key]`` as an int in ``[lo, hi]`` (bools and floats refused), else FormatError."""
    value = data.get(key, default)
    if value is ...:
        raise FormatError(f"{where}: field {key!r} is missing; the metadata is damaged")
    if value is None and default is None:
        return None  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FormatError(f"{where}: field {key!r} is {value!r}, not an integer; the metadata is damaged")
    if not lo <= int(value) <= hi:
        raise FormatError(
            f"{where}: field {key!r} is {value}, outside {lo}..{hi}; the metadata is damaged "
            "or declares more than vlastore supports"
        )
    return int(value)


def _dict(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: {what} is a {type(value).__name__}, not a JSON object; the metadata is damaged")
    return value


def _str(data: dict[str, Any], key: str, where: str, default: str = "") -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise FormatError(f"{where}: field {key!r} is {value!r}, not a string; the metadata is damaged")
    return value


def _bool(data: dict[str, Any], key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise FormatError(f"{where}: field {key!r} is {value!r}, not true/false; the metadata is damaged")
    return value


def storage_dtype(true_dtype: str) -> np.dtype:
    """The numpy dtype whose bits a feature of ``true_dtype`` is stored as."""
    try:
        return np.dtype(TRUE_DTYPES[true_dtype])
    except KeyError:
        raise FormatError(f"unsupported feature dtype {true_dtype!r}; use one of {sorted(TRUE_DTYPES)}") from None


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
# Every path of the v1 layout is spelled here and only here.

TOP_GROUPS = (EPISODES_GROUP, SERIES_GROUP, FEATURES_GROUP)
"""The groups under the root."""

_GENERATION_NAME = re.compile(r"^gen-(\d{4,7})$")
_CHUNK_PART = re.compile(r"^\d{1,18}$")


META_NAME = "zarr.json"
"""The file of every zarr v3 node's metadata (the root's holds the manifest)."""


def meta_key(node_path: str) -> str:
    """Key of a node's zarr metadata (``''``: the root's)."""
    return f"{node_path}/{META_NAME}" if node_path else META_NAME


def episodes_path(column: str) -> str:
    """Catalog array: ``name``, ``steps`` or ``step_offsets``."""
    return f"{EPISODES_GROUP}/{column}"


def series_path(key: str) -> str:
    return f"{SERIES_GROUP}/{key}"


def family_path(family: str) -> str:
    return f"{FEATURES_GROUP}/{family}"


def generation_path(family: str, generation: int) -> str:
    return f"{FEATURES_GROUP}/{family}/gen-{generation:04d}"


def generation_array_path(family: str, generation: int, name: str) -> str:
    """A row table of a generation: ``episode_rows``, ``starts``, ``lengths`` or ``keys``."""
    return f"{generation_path(family, generation)}/{name}"


def values_path(family: str, generation: int) -> str:
    """The sharded ``values`` array of a generation (v1: one segment per generation)."""
    return generation_array_path(family, generation, "values")


def shard_key(array_path: str, shard: int, ndim: int) -> str:
    """Store key of shard ``shard`` (along axis 0) of an array sharded only on axis 0."""
    return "/".join([array_path, "c", str(shard)] + ["0"] * (ndim - 1))


def shard_of_key(array_path: str, key: str, ndim: int) -> int | None:
    """The shard number of a key :func:`shard_key` makes (canonical decimal, other axes 0), else None."""
    head = f"{array_path}/c/"
    if not key.startswith(head):
        return None
    parts = key[len(head) :].split("/")
    if parts[1:] != ["0"] * (ndim - 1) or not _CHUNK_PART.match(parts[0]) or str(int(parts[0])) != parts[0]:
        return None
    return int(parts[0])


def chunk_array_parts(parts: list[str]) -> list[str] | None:
    """For a key split at '/', the array path's parts if it names a chunk (``<array>/c/<i>/<j>...``), else None."""
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "c":
            chunk = parts[i + 1 :]
            return parts[:i] if chunk and all(_CHUNK_PART.match(p) for p in chunk) else None
    return None


def generation_node_of(key: str) -> tuple[str, int] | None:
    """``(path of the generation group, generation)`` for a key at or under a generation, else None."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != FEATURES_GROUP:
        return None
    match = _GENERATION_NAME.match(parts[2])
    return None if match is None else ("/".join(parts[:3]), int(match.group(1)))


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
    def from_dict(cls, data: dict[str, Any], where: str = "producer") -> Producer:
        data = _dict(data, "the producer", where)
        return cls(
            model=_str(data, "model", where),
            revision=_str(data, "revision", where),
            fingerprint=_str(data, "fingerprint", where),
            params=dict(_dict(data.get("params", {}), "producer params", where)),
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
        if len(self.row_shape) > MAX_ROW_DIMS:
            raise FormatError(f"row_shape {self.row_shape} has more than {MAX_ROW_DIMS} dimensions")
        if self.row_nbytes > MAX_ROW_NBYTES:
            raise FormatError(
                f"row_shape {self.row_shape} of {self.dtype} is {self.row_nbytes:,} bytes per row, more than "
                f"vlastore supports ({MAX_ROW_NBYTES:,}); split the feature into smaller rows"
            )
        if self.ragged and not self.row_shape:
            raise FormatError("a ragged family needs a row_shape for one token, e.g. (2048,)")
        if self.compression not in COMPRESSIONS:
            raise FormatError(f"compression {self.compression!r} is not one of {COMPRESSIONS}")
        if self.vlm_reuse_count is not None and self.vlm_reuse_count < 1:
            raise FormatError(f"vlm_reuse_count must be >= 1, got {self.vlm_reuse_count}")
        validate_name(self.index_name, "index_name")
        if self.rows_per_shard == 0:
            object.__setattr__(self, "rows_per_shard", default_rows_per_shard(self.row_shape, self.dtype, self.ragged))
        if not 1 <= self.rows_per_shard <= MAX_ROWS_PER_SHARD:
            raise FormatError(f"rows_per_shard must be in 1..{MAX_ROWS_PER_SHARD:,}, got {self.rows_per_shard}")
        if self.rows_per_shard * self.row_nbytes > MAX_SHARD_NBYTES:
            raise FormatError(
                f"rows_per_shard {self.rows_per_shard} x {self.row_nbytes:,} bytes per row makes shards of more "
                f"than {MAX_SHARD_NBYTES:,} bytes; use a smaller rows_per_shard"
            )

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
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> FamilySpec:
        """Parse and validate a spec read from a store.

        Raises:
            FormatError: a field of the wrong type, out of range, or a bad name.
        """
        data = _dict(data, "the family spec", where)
        shape = data.get("row_shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_ROW_DIMS
            or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_ROW_NBYTES for d in shape)
        ):
            raise FormatError(
                f"{where}: row_shape {shape!r} is not a list of up to {MAX_ROW_DIMS} positive "
                "integers; the metadata is damaged"
            )
        compression = data.get("compression")
        if compression not in COMPRESSIONS:
            raise FormatError(f"{where}: compression {compression!r} is not one of {COMPRESSIONS}")
        try:
            return cls(
                row_shape=tuple(shape),
                dtype=_str(data, "dtype", where),
                ragged=_bool(data, "ragged", where),
                index_name=_str(data, "index_name", where, "vlm_idx"),
                vlm_reuse_count=_int(data, "vlm_reuse_count", where, 1, MAX_ROWS, None),
                allow_nonfinite=_bool(data, "allow_nonfinite", where),
                compression=compression,
                rows_per_shard=_int(data, "rows_per_shard", where, 1, MAX_ROWS_PER_SHARD),
                has_keys=_bool(data, "has_keys", where),
            )
        except FormatError as exc:
            message = str(exc)
            raise FormatError(message if message.startswith(where) else f"{where}: {message}") from None


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
        """The generation attributes as written, with their ``checksum``."""
        return seal(
            {
                "generation": self.generation,
                "spec": self.spec.to_dict(),
                "producer": self.producer.to_dict(),
                "rows": self.rows,
                "capacity": self.capacity,
                "created": self.created,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "generation attributes") -> GenerationInfo:
        """Parse, checksum-verify (when a checksum is present) and validate generation attributes.

        Raises:
            FormatError: naming ``where`` and the damaged field.
        """
        data = _dict(data, "the generation attributes", where)
        check_seal(data, where)
        spec_raw: Any = data.get("spec")
        spec = FamilySpec.from_dict(spec_raw, where)
        rows = _int(data, "rows", where, 0, MAX_ROWS)
        capacity = _int(data, "capacity", where, 0, MAX_ROWS)
        if not spec.ragged and capacity != rows:
            raise FormatError(
                f"{where}: capacity {capacity} != rows {rows} in a fixed-shape family; the metadata is damaged"
            )
        if spec.ragged and capacity < rows:
            raise FormatError(
                f"{where}: capacity {capacity} < rows {rows} in a ragged family (every row has "
                "at least one token row); the metadata is damaged"
            )
        return cls(
            generation=_int(data, "generation", where, 1, MAX_GENERATION),
            spec=spec,
            producer=Producer.from_dict(data.get("producer", {}), where),
            rows=rows,
            capacity=capacity,
            created=_str(data, "created", where),
        )


@dataclass(frozen=True)
class FamilyEntry:
    """A family in the root manifest: which generations exist, which one readers use."""

    current_generation: int
    generations: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"current_generation": self.current_generation, "generations": list(self.generations)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "family entry") -> FamilyEntry:
        data = _dict(data, "the family entry", where)
        current = _int(data, "current_generation", where, 1, MAX_GENERATION)
        generations = data.get("generations")
        if (
            not isinstance(generations, list)
            or not generations
            or any(isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= MAX_GENERATION for g in generations)
        ):
            raise FormatError(
                f"{where}: generations {generations!r} is not a non-empty list of generation "
                f"numbers 1..{MAX_GENERATION}; the manifest is damaged"
            )
        if len(set(generations)) != len(generations) or current not in generations:
            raise FormatError(
                f"{where}: generations {generations} repeat a number or lack the current one "
                f"({current}); the manifest is damaged"
            )
        return cls(current, tuple(generations))


@dataclass(frozen=True)
class SeriesInfo:
    columns: tuple[str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "series") -> SeriesInfo:
        data = _dict(data, "the series entry", where)
        columns = data.get("columns")
        if (
            not isinstance(columns, list)
            or not 1 <= len(columns) <= MAX_SERIES_COLUMNS
            or not all(isinstance(c, str) for c in columns)
        ):
            raise FormatError(
                f"{where}: columns must be a list of 1..{MAX_SERIES_COLUMNS} strings; the manifest is damaged"
            )
        dtype = data.get("dtype")
        if dtype not in SERIES_DTYPES:
            raise FormatError(f"{where}: dtype {dtype!r} is not one of {SERIES_DTYPES}; the manifest is damaged")
        return cls(tuple(columns), dtype)


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
        """The manifest as written, with its ``checksum``."""
        return seal(
            {
                "format_version": self.format_version,
                "vlastore_version": self.vlastore_version,
                "created": self.created,
                "episodes": self.episodes,
                "steps": self.steps,
                "series": {k: v.to_dict() for k, v in self.series.items()},
                "families": {k: v.to_dict() for k, v in self.families.items()},
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "store") -> Manifest:
        """Parse, checksum-verify (when a checksum is present) and validate a root manifest.

        Every name that becomes a path (series keys, family names) is validated here,
        before anything uses it.

        Raises:
            FormatError: naming ``where`` and what is wrong.
        """
        if not isinstance(data, dict):
            raise FormatError(
                f"{where}: the manifest is a {type(data).__name__}, not a JSON object; not a "
                "vlastore store, or a damaged one"
            )
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise FormatError(f"{where}: manifest has no integer format_version; not a vlastore store")
        if version > FORMAT_VERSION:
            raise NewerFormatError(
                f"{where} was written in vlastore format version {version} "
                f"(by vlastore {data.get('vlastore_version', '?')}); this vlastore reads "
                f"versions up to {FORMAT_VERSION}. Upgrade: pip install -U vlastore"
            )
        if version < 1:
            raise FormatError(f"{where}: manifest format_version {version} is not a version vlastore wrote")
        where_manifest = f"{where}: root manifest (zarr.json attributes['{MANIFEST_KEY}'])"
        check_seal(data, where_manifest)
        series_raw = _dict(data.get("series", {}), "series", where_manifest)
        families_raw = _dict(data.get("families", {}), "families", where_manifest)
        series = {}
        for key, value in series_raw.items():
            validate_name(key, f"{where_manifest}: series key")
            series[key] = SeriesInfo.from_dict(value, f"{where_manifest}: series {key!r}")
        families = {}
        for name, value in families_raw.items():
            validate_name(name, f"{where_manifest}: family name")
            families[name] = FamilyEntry.from_dict(value, f"{where_manifest}: family {name!r}")
        return cls(
            format_version=version,
            vlastore_version=_str(data, "vlastore_version", where_manifest),
            created=_str(data, "created", where_manifest),
            episodes=_int(data, "episodes", where_manifest, 0, MAX_EPISODES),
            steps=_int(data, "steps", where_manifest, 0, MAX_STEPS),
            series=series,
            families=families,
        )
