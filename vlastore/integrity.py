"""Cross-checks of what a store's files say against its manifest: pure functions, no I/O.

The root manifest and every generation's attributes carry a checksum
(:func:`vlastore.format.check_seal`). Everything else a reader trusts is checked
against them before use: every array's ``zarr.json`` (shape, data type, chunk
grid, shard shape, codecs including crc32c, chunk key encoding) and the catalog's
contents. So one flipped bit anywhere in the metadata is a :class:`FormatError`
naming the file, never a batch of wrong values. The content of the row tables
(``episode_rows``, ``starts``/``lengths``) is checked by
:class:`vlastore.layout.FamilyLayout` itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .format import FamilySpec, FormatError, Manifest

__all__ = [
    "ALL_CHUNKS_KEY",
    "small_array_meta",
    "sharded_array_meta",
    "check_array_meta",
    "check_group_meta",
    "check_catalog",
    "small_chunk_rows",
    "SMALL_CHUNK_ELEMENTS",
]

ALL_CHUNKS_KEY = "vlastore_chunks"
"""Attribute of small arrays written with a file for every chunk (``"all"``); zarr omits all-fill-value chunks
otherwise, so only then is a missing chunk file certainly damage. Arrays of older stores lack it."""

SMALL_CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk of a small array (catalog, row tables, series); see Storage.write_small_array."""

_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
_CRC = {"name": "crc32c"}
_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_KNOWN_FIELDS = {
    "shape",
    "data_type",
    "chunk_grid",
    "chunk_key_encoding",
    "fill_value",
    "codecs",
    "attributes",
    "zarr_format",
    "node_type",
    "storage_transformers",
    "dimension_names",
}


def small_chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per chunk of a small array of ``shape`` (the rule Storage.write_small_array follows)."""
    rows = max(1, shape[0]) if shape else 1
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, min(rows, SMALL_CHUNK_ELEMENTS // max(1, per_row)))


_ZSTD = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}


def _zstd_ok(codec: Any) -> bool:
    # exactly what vlastore writes: a flipped level or checksum flag is damage too, even where it reads the same
    return bool(codec == _ZSTD and type(codec["configuration"]["checksum"]) is bool)


def _codecs_ok(actual: Any, expected: list[Any]) -> bool:
    """Equal codec lists, where ``"zstd"`` in ``expected`` stands for any zstd level."""
    if not isinstance(actual, list) or len(actual) != len(expected):
        return False
    for got, want in zip(actual, expected, strict=True):
        if want == "zstd":
            if not _zstd_ok(got):
                return False
        elif got != want:
            return False
    return True


def small_array_meta(shape: tuple[int, ...], data_type: str, compression: str | None = "zstd") -> dict[str, Any]:
    """The ``zarr.json`` fields vlastore writes for a small array (catalog, row tables, series)."""
    first = {"name": "vlen-utf8", "configuration": {}} if data_type == "string" else _BYTES
    return {
        "shape": list(shape),
        "data_type": data_type,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [small_chunk_rows(shape), *shape[1:]] if shape else []},
        },
        "chunk_key_encoding": _KEY_ENCODING,
        "fill_value": "" if data_type == "string" else 0,
        "codecs": [first, *(["zstd"] if compression == "zstd" else []), _CRC],
        "zarr_format": 3,
        "node_type": "array",
    }


def sharded_array_meta(spec: FamilySpec, capacity: int) -> dict[str, Any]:
    """The ``zarr.json`` fields vlastore writes for a family's ``values`` array."""
    inner = [_BYTES, *(["zstd"] if spec.compression == "zstd" else []), _CRC]
    return {
        "shape": [capacity, *spec.row_shape],
        "data_type": spec.storage_dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [spec.rows_per_shard, *spec.row_shape]}},
        "chunk_key_encoding": _KEY_ENCODING,
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, *spec.row_shape],
                    "codecs": inner,
                    "index_codecs": [_BYTES, _CRC],
                    "index_location": "end",
                },
            }
        ],
        "zarr_format": 3,
        "node_type": "array",
        "attributes": {"true_dtype": spec.dtype},
    }


def _sharding_ok(actual: Any, expected: dict[str, Any]) -> bool:
    if not isinstance(actual, list) or len(actual) != 1 or not isinstance(actual[0], dict):
        return False
    got, want = actual[0], expected["codecs"][0]
    if got.get("name") != "sharding_indexed" or set(got) - {"name", "configuration"}:
        return False
    config, want_config = got.get("configuration"), want["configuration"]
    return (
        isinstance(config, dict)
        and set(config) == set(want_config)
        and config["chunk_shape"] == want_config["chunk_shape"]
        and _codecs_ok(config["codecs"], want_config["codecs"])
        and config["index_codecs"] == want_config["index_codecs"]
        and config["index_location"] == want_config["index_location"]
    )


def check_array_meta(actual: dict[str, Any] | None, expected: dict[str, Any], where: str) -> None:
    """Compare a parsed ``zarr.json`` with what vlastore writes for it.

    Raises:
        FormatError: naming ``where`` and the first field that differs.
    """
    if actual is None:
        raise FormatError(f"{where}: missing; the store is damaged (run `vlastore verify`)")
    unknown = set(actual) - _KNOWN_FIELDS
    if unknown:
        raise FormatError(f"{where}: unexpected field(s) {sorted(unknown)}; the file is damaged")
    for key, want in expected.items():
        got = actual.get(key)
        if key == "codecs":
            ok = (
                _sharding_ok(got, expected)
                if want and isinstance(want[0], dict) and want[0].get("name") == "sharding_indexed"
                else _codecs_ok(got, want)
            )
        elif key == "attributes":
            ok = isinstance(got, dict) and all(got.get(k) == v for k, v in want.items()) and set(got) == set(want)
        elif key == "fill_value":
            ok = type(got) in (int, float, str) and got == want and (isinstance(got, str) == isinstance(want, str))
        else:
            ok = got == want
        if not ok:
            raise FormatError(
                f"{where}: {key} is {got!r}, expected {want!r} from the manifest; the file is "
                "damaged (run `vlastore verify`)"
            )
    if "attributes" not in expected and actual.get("attributes", {}) not in ({}, {ALL_CHUNKS_KEY: "all"}):
        raise FormatError(
            f"{where}: attributes {actual.get('attributes')!r} are not what vlastore writes for this "
            "array; the file is damaged"
        )
    if actual.get("storage_transformers", []) != [] or actual.get("dimension_names") is not None:
        raise FormatError(
            f"{where}: storage_transformers/dimension_names are not what vlastore writes; the file is damaged"
        )


def check_group_meta(actual: dict[str, Any] | None, attribute_keys: set[str], where: str) -> None:
    """A group's ``zarr.json`` holds exactly what vlastore writes (``attribute_keys``: its attributes' names).

    Raises:
        FormatError: naming ``where`` and what differs.
    """
    if actual is None:
        raise FormatError(f"{where}: missing; the store is damaged")
    if (
        set(actual) != {"attributes", "zarr_format", "node_type"}
        or actual.get("zarr_format") != 3
        or actual.get("node_type") != "group"
    ):
        raise FormatError(
            f"{where}: not the group metadata vlastore writes (fields {sorted(actual)}); the file is damaged"
        )
    attrs = actual.get("attributes")
    if not isinstance(attrs, dict) or set(attrs) != attribute_keys:
        raise FormatError(
            f"{where}: attributes {sorted(attrs) if isinstance(attrs, dict) else attrs!r}, expected "
            f"{sorted(attribute_keys)}; the file is damaged"
        )


def check_catalog(
    manifest: Manifest, names: list[str], steps: np.ndarray, step_offsets: np.ndarray, where: str
) -> None:
    """The catalog's arrays agree with each other and with the manifest.

    Raises:
        FormatError: naming what disagrees.
    """
    if len(names) != manifest.episodes or steps.shape != (manifest.episodes,):
        raise FormatError(
            f"{where}: {len(names)} names and {steps.size} step counts for the manifest's "
            f"{manifest.episodes} episodes; the catalog is damaged"
        )
    if steps.size and steps.min() < 0:
        raise FormatError(f"{where}: a negative step count; the catalog is damaged")
    expected = np.concatenate([[0], np.cumsum(steps, dtype=np.int64)])
    if int(expected[-1]) != manifest.steps:
        raise FormatError(
            f"{where}: steps add up to {int(expected[-1])}, the manifest says {manifest.steps}; the catalog is damaged"
        )
    if step_offsets.shape != expected.shape or not np.array_equal(step_offsets, expected):
        raise FormatError(
            f"{where}: episodes/step_offsets is not the running sum of episodes/steps; the catalog is damaged"
        )
