"""The safe .pt reader: bit-exact against torch.load, and it never runs pickled code."""

from __future__ import annotations

import io
import os
import socket
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ingest_helpers import DTYPES, RunsCode, bits, pt_records, raw_zip

from vlastore.ingest import ptfile
from vlastore.ingest.ptfile import PtFileError, RawTensor, read_pt, template_tensor, tensor_entries
from vlastore.ingest.ptformat import Reader
from vlastore.ingest.source import SourceError


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(2048,), (1, 64), (1, 5, 8), (3, 4, 2)])
def test_tensor_round_trip_matches_torch(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    t = torch.randn(shape).to(DTYPES[dtype])
    path = tmp_path / "x.pt"
    torch.save(t, path)
    for _ in range(2):  # second read goes through the cached layout
        got = read_pt(path)
        assert isinstance(got, RawTensor) and got.dtype == dtype and got.shape == shape
        assert np.array_equal(got.array, bits(t))


def test_dict_payload_views_and_metadata(tmp_path: Path) -> None:
    base = torch.randn(6, 8)
    obj = {
        "pooled": base[:, 2:5],
        "tokens": torch.randn(1, 3, 4).half(),
        "dataset": "ep_1",
        "vlm_idx": 7,
        "n": torch.tensor(3),
    }
    torch.save(obj, tmp_path / "d.pt")
    tensors, meta = tensor_entries(read_pt(tmp_path / "d.pt"))
    assert sorted(tensors) == ["pooled", "tokens"]
    assert np.array_equal(tensors["pooled"].array, base[:, 2:5].numpy())
    assert np.array_equal(tensors["tokens"].array, obj["tokens"].numpy())
    assert meta == {"dataset": "ep_1", "vlm_idx": 7, "n": 3}


def test_same_size_file_with_other_content_is_not_confused_by_layout_cache(tmp_path: Path) -> None:
    a, b = torch.randn(1, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    torch.save(a, tmp_path / "a_vlm1.pt")
    torch.save(b, tmp_path / "b_vlm2.pt")
    assert np.array_equal(read_pt(tmp_path / "a_vlm1.pt").array, bits(a))
    assert np.array_equal(read_pt(tmp_path / "b_vlm2.pt").array, bits(b))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil_vlm0.pt"
    torch.save({"features": torch.zeros(4), "x": RunsCode(str(marker))}, path)
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "unsafe-pickle"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("truncate", "truncated"), ("garbage", "not-zip"), ("flip", "corrupt"), ("empty", "not-zip")],
)
def test_damaged_files_have_a_reason(tmp_path: Path, damage: str, reason: str) -> None:
    path = tmp_path / "x.pt"
    torch.save(torch.randn(1, 256).bfloat16(), path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"this is not a torch file" * 10)
    elif damage == "flip":
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
        data[info.header_offset + 200] ^= 0xFF  # inside the tensor bytes: CRC-32 catches it
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == reason


def test_legacy_format_goes_through_torch_weights_only(tmp_path: Path) -> None:
    t = torch.randn(2, 3)
    path = tmp_path / "old.pt"
    torch.save(t, path, _use_new_zipfile_serialization=False)
    got = read_pt(path)
    assert np.array_equal(got.array, t.numpy())


def test_expanded_view_is_refused_rather_than_copied_without_bound(tmp_path: Path) -> None:
    path = tmp_path / "expanded.pt"
    torch.save(torch.randn(1, 4).expand(100_000, 4), path)  # 4 stored values claiming 400,000
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "corrupt" and "expanded" in str(err.value)


# ----------------------------------------------------------------- sizes written in the file are never trusted


def test_file_missing_its_last_six_bytes_is_truncated_not_a_struct_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(torch.randn(1, 64).bfloat16(), path)
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "truncated"


@pytest.mark.parametrize("zip64", [False, True])
def test_zip64_archives_are_parsed_without_zipfile_or_torch(tmp_path: Path, zip64: bool) -> None:
    t = torch.randn(2, 32).half()
    path = tmp_path / "x.pt"
    path.write_bytes(raw_zip(pt_records(t), zip64=zip64))
    assert np.array_equal(read_pt(path).array, bits(t))


@pytest.mark.parametrize("zip64", [False, True])
def test_compressed_record_is_refused_without_inflating_it(tmp_path: Path, zip64: bool) -> None:
    t = torch.randn(1, 16)
    records = [(n, zlib.compress(d)[2:-4] if n.endswith("data/0") else d) for n, d in pt_records(t)]
    name = next(n for n, _ in records if n.endswith("data/0"))
    path = tmp_path / "bomb.pt"
    path.write_bytes(raw_zip(records, zip64=zip64, method=8, declared={name: (4 << 30) if zip64 else 1 << 30}))
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "corrupt" and "compressed" in str(err.value)


def test_sparse_file_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pt"
    torch.save(torch.randn(1, 16), path)
    os.truncate(path, 6 << 30)  # 6 GiB, no block allocated
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "too-large" and "--max-file-size" in str(err.value)


def test_big_file_gives_shapes_before_reading_bytes(tmp_path: Path) -> None:
    t = torch.randn(700, 1024).bfloat16()  # 1.4 MB: read record by record
    path = tmp_path / "big.pt"
    torch.save({"features": t, "vlm_idx": 3}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data[info.header_offset + 100_000] ^= 0xFF
    path.write_bytes(bytes(data))
    tensors, meta = tensor_entries(read_pt(path))  # the damage is in bytes not read yet
    assert tensors["features"].shape == (700, 1024) and meta == {"vlm_idx": 3}
    with pytest.raises(PtFileError) as err:
        _ = tensors["features"].array
    assert err.value.reason == "corrupt" and "CRC" in str(err.value)
    torch.save({"features": t}, path)
    assert np.array_equal(tensor_entries(read_pt(path))[0]["features"].array, bits(t))


def _with_pickle(t: torch.Tensor, edit) -> bytes:  # noqa: ANN001
    records = [(n, edit(d) if n.endswith("data.pkl") else d) for n, d in pt_records(t)]
    return raw_zip(records)


def test_storage_declaring_more_elements_than_its_record_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"

    def edit(pkl: bytes) -> bytes:  # the persistent id's element count: 16 -> 65,535
        assert b"K\x10t" in pkl
        return pkl.replace(b"K\x10t", b"M\xff\xfft", 1)

    path.write_bytes(_with_pickle(torch.randn(16), edit))
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "corrupt" and "declares" in str(err.value)


def test_pickle_memo_index_is_checked_before_the_unpickler_sizes_its_table(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(_with_pickle(torch.randn(16), lambda d: b"\x80\x02K\x01r\xff\xff\xff\x3f."))
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "corrupt" and "memo index" in str(err.value)


def test_unknown_globals_are_refused_before_torch_sees_them(tmp_path: Path) -> None:
    bomb = b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R."  # bytearray(2**30), which weights_only allows
    path = tmp_path / "x.pt"
    path.write_bytes(_with_pickle(torch.randn(16), lambda d: bomb))
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "unsafe-pickle" and "bytearray" in str(err.value)


def test_legacy_file_declaring_a_huge_storage_is_refused_unallocated(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(torch.randn(2, 3), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"K\x06N" in data
    path.write_bytes(data.replace(b"K\x06N", b"J\x00\x00\x00\x40N", 1))  # numel 6 -> 2**30 in the pickle
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason in ("corrupt", "truncated")


def test_legacy_file_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "old.pt"
    torch.save({"x": torch.zeros(2), "y": RunsCode(str(marker))}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(PtFileError) as err:
        read_pt(path)
    assert err.value.reason == "unsafe-pickle" and not marker.exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling", "loop", "socket"])
def test_only_regular_files_are_opened(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.pt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(tmp_path / "missing.pt")
    elif kind == "loop":
        path.symlink_to(tmp_path / "y.pt")
        (tmp_path / "y.pt").symlink_to(path)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    with pytest.raises(SourceError) as err:
        read_pt(path)  # a FIFO would block here forever if it were opened for reading
    expected = {"dangling": "dangling-symlink", "loop": "symlink-loop"}.get(kind, "not-a-regular-file")
    assert err.value.reason == expected


def test_deeply_nested_pickle_is_a_bad_file_not_a_crash(tmp_path: Path) -> None:
    nested = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # lists in lists, 200,000 deep
    path = tmp_path / "x.pt"
    path.write_bytes(_with_pickle(torch.randn(16), lambda d: nested))
    tensors, _ = tensor_entries(read_pt(path))
    assert tensors == {}


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_LAYOUTS = {
    "bare": _saved(torch.randn(1, 64).bfloat16()),
    "dict": _saved({"features": torch.randn(1, 64).bfloat16(), "dataset": "ep_1", "vlm_idx": 7}),
}


def _full_parse(buf: bytes) -> RawTensor | None:
    """The feature tensor as the full parse (no layout template) finds it; None when it refuses the file."""
    try:
        tensors, _ = tensor_entries(ptfile._parse(Reader("x.pt", len(buf), buf=buf), eager=True))
    except (PtFileError, SourceError):
        return None
    return next(iter(tensors.values())) if len(tensors) == 1 else None


@settings(max_examples=400, deadline=None)
@given(
    layout=st.sampled_from(sorted(_LAYOUTS)),
    changes=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_the_layout_check_passes_a_file_only_where_a_full_parse_reads_the_same_tensor(
    layout: str, changes: list[tuple[float, int]]
) -> None:
    original = _LAYOUTS[layout]
    ptfile._TEMPLATES.clear()
    assert ptfile.parse_pt(original) is not None and template_tensor(original) is not None  # the layout is learnt
    changed = bytearray(original)
    for where, delta in changes:  # any bytes, headers and directory included
        at = int(where * len(changed))
        changed[at] = (changed[at] + delta) % 256
    fast = template_tensor(bytes(changed))
    if fast is not None:
        full = _full_parse(bytes(changed))
        assert full is not None, "the layout check passed a file the full parse refuses"
        assert (fast[1], fast[2]) == (full.shape, full.dtype)
        assert bytes(fast[0]) == full.array.tobytes()
