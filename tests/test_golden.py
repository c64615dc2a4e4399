"""The committed golden store (format version 1) must read back exactly, in every run.

If this fails after a code change, the change broke stores users already have:
keep reading version 1 (and bump FORMAT_VERSION for the new layout).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import snapshot, to_bits

from vlastore.reader import MissingRowError
from vlastore.report import verify_store
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden-v1.vla"


def _maker():
    spec = importlib.util.spec_from_file_location("make_golden_store", ROOT / "tools" / "make_golden_store.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


MAKER = _maker()
EXPECTED = MAKER.expected()


@pytest.fixture(scope="module")
def golden() -> VLAStore:
    return VLAStore.open(GOLDEN)


def test_manifest_and_catalog(golden: VLAStore) -> None:
    assert golden.manifest.format_version == 1
    assert golden.datasets == MAKER.NAMES
    assert golden.catalog.steps.tolist() == list(MAKER.STEPS)
    assert golden.families == ("vlm", "tokens", "geom")
    assert golden.manifest.families["vlm"].generations == (1, 2)
    assert golden.generation("vlm").producer.fingerprint == "fp-0002"
    assert golden.generation("vlm", 1).producer.revision == "rev1"
    assert golden.spec("geom").index_name == "image" and golden.spec("geom").has_keys


def test_series(golden: VLAStore) -> None:
    for e, name in enumerate(MAKER.NAMES):
        np.testing.assert_array_equal(golden.series("state", name), EXPECTED["state"][e])
        np.testing.assert_array_equal(golden.series("action", name, 1, 3), EXPECTED["action"][e][1:3])
    assert golden.columns("state") == ("x", "y", "gripper")


def test_features(golden: VLAStore) -> None:
    layout = golden.layout("vlm")
    for row in range(layout.rows):
        e, vlm_idx = layout.address(row)
        tensor = golden.feature("vlm", MAKER.NAMES[e], vlm_idx)
        assert tensor.dtype == torch.bfloat16
        np.testing.assert_array_equal(to_bits(tensor), EXPECTED["vlm@2"][row])
        np.testing.assert_array_equal(golden.reader("vlm", 1).row(row), EXPECTED["vlm@1"][row])
    for row, tokens in enumerate(EXPECTED["tokens"]):
        e, vlm_idx = golden.layout("tokens").address(row)
        assert torch.equal(golden.feature("tokens", MAKER.NAMES[e], vlm_idx), torch.from_numpy(tokens))
    geom = golden.reader("geom")
    for row in range(4):
        if row == MAKER.UNWRITTEN_IMAGE_ROW:
            with pytest.raises(MissingRowError):
                geom.row(row)
        else:
            np.testing.assert_array_equal(geom.row(row), EXPECTED["geom"][row])
    assert golden.coverage("geom").tolist() == [True, True, True, False]
    assert golden.coverage("vlm").all() and golden.coverage("tokens").all()


def test_plain_zarr_reads_the_golden_store() -> None:
    group = zarr.open_group(str(GOLDEN), mode="r", zarr_format=3)
    np.testing.assert_array_equal(group["features/vlm/gen-0002/values"][...], EXPECTED["vlm@2"])
    gen = group["features/tokens/gen-0001"]
    starts, lengths, values = gen["starts"][...], gen["lengths"][...], gen["values"][...]
    for row, tokens in enumerate(EXPECTED["tokens"]):
        np.testing.assert_array_equal(values[starts[row] : starts[row] + lengths[row]], tokens)
    assert list(group["features/geom/gen-0001/keys"][...]) == EXPECTED["geom_keys"]
    assert (group["features/geom/gen-0001/values"][3] == 0).all()  # unwritten row: the fill value


def test_golden_verifies_and_reading_changes_nothing() -> None:
    before = snapshot(GOLDEN)
    report = verify_store(VLAStore.open(GOLDEN))
    # nothing is corrupt; geom's one unwritten row is reported missing (verify exits 1 on it)
    assert not report.corrupt and report.coverage["geom"] == (3, 4)
    assert list(report.missing) == ["geom"] and report.missing["geom"].rows == 1
    assert report.missing["geom"].examples == [("episode_20251031_101500", 0)]
    # written before metadata checksums: still read, and verify says it was cross-checked instead
    assert any("no checksum" in note for note in report.notes)
    assert snapshot(GOLDEN) == before


def test_todays_writer_writes_the_same_raw_shards(tmp_path: Path) -> None:
    """Raw shards are byte-for-byte deterministic: the encoder must not drift from version 1."""
    MAKER.make_golden_store(tmp_path / "again.vla")
    golden_shards = {k: v for k, v in snapshot(GOLDEN).items() if k.startswith("features/vlm/") and "/values/c/" in k}
    assert len(golden_shards) == 4
    again = snapshot(tmp_path / "again.vla")
    for key, data in golden_shards.items():
        assert again[key] == data, key


# ------------------------------------------------------------------ format 2

GOLDEN_V2 = ROOT / "tests" / "data" / "golden-v2.vla"


@pytest.fixture(scope="module")
def golden_v2() -> VLAStore:
    return VLAStore.open(GOLDEN_V2)


def test_v2_catalog_log_and_metadata(golden_v2: VLAStore) -> None:
    assert golden_v2.format_version == 2 and golden_v2.snapshot_id == 8
    assert golden_v2.datasets == MAKER.NAMES and golden_v2.catalog.steps.tolist() == list(MAKER.STEPS)
    ops = [c["changes"][0].split()[0] for c in golden_v2.log()]
    assert ops == [
        "create",
        "add_family",
        "add_family",
        "add_family",
        "append",
        "remove",
        "new_generation",
        "switch_generation",
    ]
    assert golden_v2.manifest.families["vlm"].generations == (1, 2)
    assert golden_v2.generation("vlm").producer.fingerprint == "fp-0002"
    for e, name in enumerate(MAKER.NAMES):
        info = golden_v2.episode_info(name)
        assert (info["task"], info["fps"], info["attrs"]) == (MAKER.TASKS[e], MAKER.FPS[e], {"operator": f"op{e}"})
    assert golden_v2.tasks == ("pick the red cube", "open the drawer")
    old = VLAStore.open(GOLDEN_V2, snapshot=5)  # before the remove: the dropped episode is there
    assert MAKER.DROPPED in old.datasets and old.generation("vlm").generation == 1


def test_v2_series_and_features(golden_v2: VLAStore) -> None:
    for e, name in enumerate(MAKER.NAMES):
        np.testing.assert_array_equal(golden_v2.series("state", name), EXPECTED["state"][e])
        np.testing.assert_array_equal(golden_v2.series("action", name), EXPECTED["action"][e])
    layout = golden_v2.layout("vlm")
    for row in range(layout.rows):
        e, vlm_idx = layout.address(row)
        np.testing.assert_array_equal(
            to_bits(golden_v2.feature("vlm", MAKER.NAMES[e], vlm_idx)), EXPECTED["vlm@2"][row]
        )
        np.testing.assert_array_equal(golden_v2.reader("vlm", 1).row(row), EXPECTED["vlm@1"][row])
    for row, tokens in enumerate(EXPECTED["tokens"]):
        e, vlm_idx = golden_v2.layout("tokens").address(row)
        assert torch.equal(golden_v2.feature("tokens", MAKER.NAMES[e], vlm_idx), torch.from_numpy(tokens))
    assert list(golden_v2.keys("geom")) == EXPECTED["geom_keys"]
    assert golden_v2.coverage("geom").tolist() == [True, True, True, False]
    assert golden_v2.coverage("vlm").all() and golden_v2.coverage("tokens").all()


def test_v2_catalog_is_portable_and_verifies() -> None:
    group = zarr.open_group(str(GOLDEN_V2), mode="r", zarr_format=3)
    store = VLAStore.open(GOLDEN_V2)
    assert store.snapshot is not None
    cat = group[store.snapshot.catalog.path]
    names, offsets = cat["name_utf8"], cat["name_offsets"][...]
    assert names.dtype == np.uint8 and offsets.dtype == np.int64  # no zarr string dtype anywhere
    raw = names[...].tobytes()
    assert [raw[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == list(MAKER.NAMES)
    before = snapshot(GOLDEN_V2)
    report = verify_store(VLAStore.open(GOLDEN_V2))
    assert not report.corrupt and report.coverage["geom"] == (3, 4) and list(report.missing) == ["geom"]
    assert snapshot(GOLDEN_V2) == before
