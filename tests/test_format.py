"""The format layer: names, dtypes, specs and the manifest schema."""

from __future__ import annotations

import numpy as np
import pytest

from vlastore.format import (
    FORMAT_VERSION,
    FamilyEntry,
    FamilySpec,
    FormatError,
    GenerationInfo,
    Manifest,
    Producer,
    SeriesInfo,
    default_rows_per_shard,
    generation_path,
    shard_key,
    storage_dtype,
    validate_name,
)


@pytest.mark.parametrize("name", ["episode_20251030_025119", "recv_all_20251027_170308", "a", "x.y-z+1=2@3,4:5~"])
def test_good_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("ep\x00", "control character"),
        ("ep\n1", "control character"),
        ("ep\x7f", "control character"),
        ("has space", "no spaces"),
        (3, "must be a string"),
    ],
)
def test_bad_names_say_what_is_wrong(name: object, says: str) -> None:
    with pytest.raises(FormatError, match="episode name") as err:
        validate_name(name, "episode name")
    assert says in str(err.value)


def test_bfloat16_is_stored_as_uint16_bits() -> None:
    assert storage_dtype("bfloat16") == np.uint16
    assert storage_dtype("float16") == np.float16
    with pytest.raises(FormatError, match="unsupported feature dtype 'int8'"):
        storage_dtype("int8")


def test_default_rows_per_shard() -> None:
    assert default_rows_per_shard((2048,), "bfloat16", ragged=False) == 4096
    assert default_rows_per_shard((2048,), "bfloat16", ragged=True) == 16384
    big = default_rows_per_shard((1024, 1024), "float32", ragged=False)  # 4 MiB rows
    assert big == 16


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"row_shape": (0,), "dtype": "float32"}, "dimension < 1"),
        ({"row_shape": (), "dtype": "float32", "ragged": True}, "needs a row_shape"),
        ({"row_shape": (4,), "dtype": "float32", "compression": "gzip"}, "compression"),
        ({"row_shape": (4,), "dtype": "float32", "vlm_reuse_count": 0}, "vlm_reuse_count"),
        ({"row_shape": (4,), "dtype": "float32", "rows_per_shard": -1}, "rows_per_shard"),
        ({"row_shape": (4,), "dtype": "float32", "index_name": "a/b"}, "index_name"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        FamilySpec(**kwargs)


def test_generation_info_round_trips_through_json_types() -> None:
    spec = FamilySpec((16,), "bfloat16", ragged=True, vlm_reuse_count=3, compression="zstd", has_keys=True)
    info = GenerationInfo(2, spec, Producer("m", "r", "f", {"layer": -1}), rows=10, capacity=40, created="now")
    import json

    again = GenerationInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info
    assert again.spec.rows_per_shard == 16384


def test_manifest_round_trip_and_newer_version_refused() -> None:
    manifest = Manifest(
        FORMAT_VERSION,
        "0.1.0",
        "now",
        2,
        10,
        {"state": SeriesInfo(("a", "b"), "float32")},
        {"f": FamilyEntry(2, (1, 2))},
    )
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    newer = {**manifest.to_dict(), "format_version": FORMAT_VERSION + 1, "vlastore_version": "9.0"}
    with pytest.raises(FormatError, match=r"format version 2 \(by vlastore 9.0\).*pip install -U vlastore"):
        Manifest.from_dict(newer, where="/data/x.vla")
    with pytest.raises(FormatError, match="not a vlastore store"):
        Manifest.from_dict({"episodes": 1})


def test_paths() -> None:
    assert generation_path("qwen_vl", 3) == "features/qwen_vl/gen-0003"
    assert shard_key("features/f/gen-0001/values", 7, 2) == "features/f/gen-0001/values/c/7/0"
    assert shard_key("a/values", 7, 1) == "a/values/c/7"


# ------------------------------------------------------------------ issue 9: checksums, validation, limits


def test_seal_and_check() -> None:
    from vlastore.format import check_seal, seal

    sealed = seal({"b": 1, "a": [1, 2], "c": {"é": None}})
    assert sealed["checksum"].startswith("crc32c:") and len(sealed["checksum"]) == 15
    assert check_seal(sealed, "x") and not check_seal({"b": 1}, "x")
    with pytest.raises(FormatError, match="x: metadata checksum mismatch"):
        check_seal({**sealed, "b": 2}, "x")


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"row_shape": (10**9,), "dtype": "float32"}, "bytes per row, more than"),
        ({"row_shape": (2,) * 9, "dtype": "float32"}, "more than 8 dimensions"),
        ({"row_shape": (4,), "dtype": "float32", "rows_per_shard": 1 << 21}, "rows_per_shard must be in"),
        ({"row_shape": (1 << 20,), "dtype": "float32", "rows_per_shard": 1 << 13}, "shards of more than"),
    ],
)
def test_sizes_beyond_the_limits_are_refused(kwargs: dict, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        FamilySpec(**kwargs)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d["spec"].update(row_shape=["8"]), "row_shape"),
        (lambda d: d["spec"].update(ragged="yes"), "ragged"),
        (lambda d: d.update(rows=True), "rows"),
        (lambda d: d.update(rows=10, capacity=9), "capacity 9 != rows 10"),
        (lambda d: d.update(generation=0), "generation"),
        (lambda d: d["spec"].update(index_name="../x"), "index_name"),
    ],
)
def test_generation_attributes_are_validated_field_by_field(change, says: str) -> None:
    data = GenerationInfo(1, FamilySpec((8,), "float32"), Producer(), rows=10, capacity=10, created="now").to_dict()
    data.pop("checksum")
    change(data)
    with pytest.raises(FormatError, match=says):
        GenerationInfo.from_dict(data, where="gen-0001/zarr.json")
