"""The safe .pt reader: bit-exact against torch.load, and it never runs pickled code."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_helpers import DTYPES, RunsCode, bits

from vlastore.ingest.ptfile import PtFileError, RawTensor, read_pt, tensor_entries


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
    obj = {"pooled": base[:, 2:5], "tokens": torch.randn(1, 3, 4).half(), "dataset": "ep_1", "vlm_idx": 7,
           "n": torch.tensor(3)}
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
