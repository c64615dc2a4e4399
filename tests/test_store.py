"""VLAStore on every store kind (a contract, like zarr-python's StoreTests), and bad input.

Every bad input must raise an error that says what and where, and leave the store
readable and byte-for-byte unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import (
    build_full_store,
    episodes,
    flip_byte,
    random_rows,
    snapshot,
    spec_for,
    store_snapshot,
    to_bits,
)

from vlastore.format import FamilySpec, FormatError, Producer
from vlastore.reader import MissingRowError
from vlastore.report import verify_store
from vlastore.shardcodec import ChecksumError
from vlastore.storage import StoreNotFoundError
from vlastore.store import EpisodeData, VLAStore
from vlastore.writer import OwnershipError


class StoreContract:
    """Behaviour every store kind must show. Subclasses give ``location``."""

    @pytest.fixture
    def location(self, tmp_path: Path) -> object:
        raise NotImplementedError

    @pytest.fixture
    def built(self, location: object) -> tuple[VLAStore, dict[str, object]]:
        return build_full_store(location)

    def test_round_trip_of_every_family(self, built, location) -> None:
        store, values = built
        again = VLAStore.open(location)
        assert again.datasets == ("episode_000", "episode_001", "episode_002", "episode_003")
        assert set(again.families) == {"fixed", "tokens", "packed"}
        for family in again.families:
            layout = again.layout(family)
            assert again.coverage(family).all()
            for row in range(layout.rows):
                e, vlm_idx = layout.address(row)
                tensor = again.feature(family, again.datasets[e], vlm_idx)
                np.testing.assert_array_equal(to_bits(tensor), values[family][row])
        assert again.feature("fixed", "episode_000", 0).dtype == torch.bfloat16
        assert again.feature("tokens", "episode_000", 0).dtype == torch.float16
        assert again.feature("packed", "episode_000", 0).dtype == torch.float32

    def test_series_round_trip(self, built, location) -> None:
        again = VLAStore.open(location)
        source = episodes()
        for e in source:
            np.testing.assert_array_equal(again.series("state", e.name), e.series["state"])
            np.testing.assert_array_equal(again.series("action", e.name, 1, 3), e.series["action"][1:3])
        assert again.columns("state") == ("x", "y", "z")
        assert again.columns("action") == ("action_0", "action_1")
        assert again.series_all("state").shape == (24, 3)
        with pytest.raises(IndexError, match="steps 2:9 out of range for episode 'episode_001' with 5 steps"):
            again.series("state", "episode_001", 2, 9)
        with pytest.raises(KeyError, match="unknown series 'joints'"):
            again.series("joints", "episode_001")

    def test_plain_zarr_reads_what_was_written(self, built, location) -> None:
        store, values = built
        group = zarr.open_group(store=store.storage.zarr_store(), mode="r", zarr_format=3)
        assert group.attrs["vlastore"]["format_version"] == 1
        assert list(group["episodes/name"][...]) == list(store.datasets)
        np.testing.assert_array_equal(group["episodes/steps"][...], [7, 5, 9, 3])
        state = np.concatenate([e.series["state"] for e in episodes()])
        np.testing.assert_array_equal(group["series/state"][...], state)
        fixed = group["features/fixed/gen-0001/values"]
        assert fixed.dtype == np.uint16 and fixed.attrs["true_dtype"] == "bfloat16"
        np.testing.assert_array_equal(fixed[...], values["fixed"])
        np.testing.assert_array_equal(group["features/packed/gen-0001/values"][...], values["packed"])
        gen = group["features/tokens/gen-0001"]
        starts, lengths = gen["starts"][...], gen["lengths"][...]
        tokens = gen["values"][...]
        for row, expected in enumerate(values["tokens"]):
            np.testing.assert_array_equal(tokens[starts[row] : starts[row] + lengths[row]], expected)
        assert gen.attrs["vlastore_generation"]["spec"]["ragged"] is True

    def test_partial_writes_show_in_coverage(self, location) -> None:
        store = VLAStore.create(location, episodes())
        store.add_family("f", spec_for("float32"))  # 9 rows, shards of 4: [0-3] [4-7] [8]
        values = random_rows((9, 8), "float32", seed=7)
        with store.writer("f") as writer:
            writer.write_rows([0, 2], values[[0, 2]])
            writer.write("episode_003", 0, values[8])  # row 8
        assert store.coverage("f").tolist() == [True, False, True, False, False, False, False, False, True]
        assert store.written_shards("f").tolist() == [0, 2]
        with pytest.raises(MissingRowError, match=r"row \('episode_000', vlm_idx=1\) was not written"):
            store.feature("f", "episode_000", 1)
        with pytest.raises(MissingRowError, match=r"shard 1 is not written.*run the writer"):
            store.feature("f", "episode_001", 1)
        # a rerun writes what is missing: the unwritten shard and the holes of shard 0 (replacing it whole)
        with store.writer("f") as writer:
            assert writer.pending_rows().tolist() == [1, 3, 4, 5, 6, 7]
            writer.write_rows(np.arange(9), values)  # rows on disk already are skipped
            assert (writer.rows_written, writer.rows_skipped) == (6, 3)
        again = VLAStore.open(store.storage.zarr_store())
        assert again.coverage("f").all()
        np.testing.assert_array_equal(again.reader("f").gather(np.arange(9)), values)
        assert store.writer("f").pending_rows().size == 0

    @pytest.mark.parametrize("write_behind", [False, True])
    def test_two_writers_on_one_shard(self, location, write_behind: bool) -> None:
        store = VLAStore.create(location, episodes())
        store.add_family("f", spec_for("float32"))
        first = random_rows((4, 8), "float32", seed=1)
        a = store.writer("f", rank=0, world_size=1, write_behind=write_behind)
        b = store.writer("f", rank=0, world_size=1, write_behind=write_behind)  # wrongly given the same rank
        a.write_rows([0, 1, 2, 3], first)
        a.close()
        says = "two writers own the same shard.*Nothing was overwritten"
        if write_behind:  # the complete shard is written in the background: the error comes at the next call
            b.write_rows([0, 1, 2, 3], random_rows((4, 8), "float32", seed=2))
            with pytest.raises(OwnershipError, match=says):
                b.wait()
            with pytest.raises(OwnershipError, match=says):  # and again at every later call
                b.write_rows([8], random_rows((1, 8), "float32"))
            with pytest.raises(OwnershipError, match=says):
                b.close()
        else:
            with pytest.raises(OwnershipError, match=says):
                b.write_rows([0, 1, 2, 3], random_rows((4, 8), "float32", seed=2))
        np.testing.assert_array_equal(store.reader("f").rows([0, 1, 2, 3]), first)

    def test_writing_a_row_of_another_rank(self, location) -> None:
        store = VLAStore.create(location, episodes())
        store.add_family("f", spec_for("float32"))
        before = store_snapshot(store.storage.zarr_store())
        writer = store.writer("f", rank=1, world_size=2)
        assert writer.owned_rows().tolist() == [4, 5, 6, 7]
        with pytest.raises(OwnershipError, match=r"rank 1 of 2 does not own shard 0.*belongs to rank 0"):
            writer.write_rows([4, 0], random_rows((2, 8), "float32"))
        writer.close()
        assert store_snapshot(store.storage.zarr_store()) == before  # row 4 was not buffered either

    def test_flipped_byte_is_found_by_verify_and_by_reads(self, built) -> None:
        store, _ = built
        key = store.shard_key("fixed", 1)  # rows 4..7
        stride = 8 * 2 + 4
        flip_byte(store.storage.zarr_store(), key, 2 * stride + 5)  # inside row 6's payload
        report = verify_store(store)
        assert not report.ok
        assert [(c.family, c.dataset, c.index) for c in report.corrupt] == [("fixed", "episode_002", 1)]
        with pytest.raises(ChecksumError, match=r"row \('episode_002', vlm_idx=1\) is corrupt"):
            VLAStore.open(store.storage.zarr_store()).feature("fixed", "episode_002", 1)
        VLAStore.open(store.storage.zarr_store()).feature("fixed", "episode_002", 0)  # its neighbours still read

    def test_flipped_byte_in_a_compressed_ragged_shard(self, built) -> None:
        store, _ = built
        flip_byte(store.storage.zarr_store(), store.shard_key("packed", 0), 3)
        flip_byte(store.storage.zarr_store(), store.shard_key("tokens", 0), 1)
        found = {(c.family, c.dataset, c.index) for c in verify_store(store).corrupt}
        assert found == {("packed", "episode_000", 0), ("tokens", "episode_000", 0)}
        fresh = VLAStore.open(store.storage.zarr_store())
        for family in ("packed", "tokens"):
            with pytest.raises(ChecksumError):
                fresh.feature(family, "episode_000", 0)

    def test_new_generation_and_switch(self, built) -> None:
        store, values = built
        info = store.new_generation("fixed", Producer("model-b", "r2", "abcd"))
        assert info.generation == 2
        assert store.generation("fixed").generation == 1  # readers still see generation 1
        new_values = random_rows(values["fixed"].shape, "bfloat16", seed=99)
        with store.writer("fixed", generation=2) as writer:
            writer.write_rows(writer.pending_rows(), new_values)
        np.testing.assert_array_equal(
            to_bits(VLAStore.open(store.storage.zarr_store()).feature("fixed", 0, 0)), values["fixed"][0]
        )
        store.switch_generation("fixed", 2, keep_previous=0)
        again = VLAStore.open(store.storage.zarr_store())
        assert again.manifest.families["fixed"].generations == (2,)
        assert again.generation("fixed").producer.fingerprint == "abcd"
        np.testing.assert_array_equal(to_bits(again.feature("fixed", 0, 0)), new_values[0])
        assert not again.nodes.exists("features/fixed/gen-0001")

    def test_add_family_again_with_the_same_plan_is_a_no_op(self, built) -> None:
        store, _ = built
        before = store_snapshot(store.storage.zarr_store())
        assert store.add_family("fixed", spec_for("bfloat16")).generation == 1
        assert store_snapshot(store.storage.zarr_store()) == before

    @pytest.mark.parametrize(
        ("action", "error", "says"),
        [
            (
                lambda s: s.writer("fixed").write_rows([0], np.zeros((1, 7), np.uint16)),
                FormatError,
                r"values of shape \(1, 7\) for 1 rows; expected \(1, 8\)",
            ),
            (
                lambda s: s.writer("fixed").write_rows([0], np.zeros((1, 8), np.float32)),
                FormatError,
                "float32 array for a bfloat16 family",
            ),
            (
                lambda s: s.writer("fixed").write(0, 0, torch.zeros(8, dtype=torch.float16)),
                FormatError,
                r"torch.float16 tensor for a bfloat16 family.*\.to\(torch.bfloat16\)",
            ),
            (
                lambda s: s.writer("fixed").write(0, 1, torch.full((8,), float("nan"), dtype=torch.bfloat16)),
                FormatError,
                r"row \('episode_000', vlm_idx=1\) holds NaN or Inf.*allow_nonfinite=True",
            ),
            (
                lambda s: s.writer("packed").write_rows(
                    [0, 1], [np.zeros(8, np.float32), np.full(8, np.inf, np.float32)]
                ),
                FormatError,
                r"row \('episode_000', vlm_idx=1\) holds NaN or Inf",
            ),
            (
                lambda s: s.writer("tokens").write_rows([0], [np.zeros((3, 4), np.float16)]),
                FormatError,
                r"row \('episode_000', vlm_idx=0\) has shape \(3, 4\); the family's planned length",
            ),
            (
                lambda s: s.writer("fixed").write("episode_999", 0, np.zeros(8, np.uint16)),
                KeyError,
                "unknown dataset 'episode_999'",
            ),
            (
                lambda s: s.writer("fixed").write("episode_001", 2, np.zeros(8, np.uint16)),
                IndexError,
                r"family 'fixed', dataset 'episode_001': vlm_idx=2 out of range.*\(vlm_idx 0..1\)",
            ),
            (lambda s: s.feature("fixed", "episode_001", 5), IndexError, "vlm_idx=5 out of range"),
            (lambda s: s.feature("nope", "episode_001", 0), KeyError, "unknown feature family 'nope'"),
            (
                lambda s: s.writer("fixed").write_rows([99], np.zeros((1, 8), np.uint16)),
                IndexError,
                "row 99 out of range",
            ),
            (lambda s: s.add_family("a/b", spec_for("float32")), FormatError, "path separator"),
            (
                lambda s: s.add_family("fixed", spec_for("float16")),
                FormatError,
                "already exists .* with a different plan",
            ),
            (
                lambda s: s.add_family("t", spec_for("float16", ragged=True), lengths=[1] * 8),
                FormatError,
                "got 8 lengths for 9 rows",
            ),
            (
                lambda s: s.add_family("t", spec_for("float16", ragged=True), lengths=[9] * 9),
                FormatError,
                "rows_per_shard >= 9",
            ),
            (lambda s: s.add_family("t", FamilySpec((8,), "float16")), FormatError, "give items_per_episode"),
            (
                lambda s: VLAStore.open(s.storage.zarr_store()).add_family("t", spec_for("float16")),
                PermissionError,
                "read-only.*writable=True",
            ),
        ],
    )
    def test_bad_input_is_refused_and_changes_nothing(self, built, action, error, says) -> None:
        store, values = built
        before = store_snapshot(store.storage.zarr_store())
        with pytest.raises(error, match=says):
            writer_or_none = action(store)
            assert writer_or_none is None
        # also close every writer the action opened: nothing of a refused batch may reach the store
        assert store_snapshot(store.storage.zarr_store()) == before
        np.testing.assert_array_equal(
            to_bits(VLAStore.open(store.storage.zarr_store()).feature("fixed", 0, 0)), values["fixed"][0]
        )

    def test_refused_batch_is_not_half_buffered(self, built) -> None:
        store, _ = built
        store.add_family("g", spec_for("float32"))
        before = store_snapshot(store.storage.zarr_store())
        writer = store.writer("g")
        good = random_rows((4, 8), "float32")
        with pytest.raises(FormatError):
            writer.write_rows([0, 1, 2, 3], [good[0], good[1], good[2], np.zeros(3, np.float32)])
        writer.close()
        assert store_snapshot(store.storage.zarr_store()) == before
        with store.writer("g") as writer:  # the same rows can be given again: nothing was kept
            writer.write_rows([0, 1, 2, 3], list(good))
        np.testing.assert_array_equal(store.reader("g").rows([0, 1, 2, 3]), good)


class TestLocalStore(StoreContract):
    @pytest.fixture
    def location(self, tmp_path: Path) -> Path:
        return tmp_path / "store.vla"


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def location(self) -> zarr.storage.MemoryStore:
        return zarr.storage.MemoryStore()


def test_a_store_in_object_storage_round_trips_and_verifies(s3_url: str, s3_options: dict[str, str]) -> None:
    """The whole store API over S3-compatible object storage (moto on loopback): an s3:// URL with
    storage_options, or the Storage itself."""
    pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")
    from vlastore.report import verify_store
    from vlastore.storage import ObjectStorage

    store, values = build_full_store(ObjectStorage(s3_url, s3_options))
    again = VLAStore.open(s3_url, storage_options=s3_options)
    for family in ("fixed", "tokens", "packed"):
        assert again.coverage(family).all()
        for row in (0, again.layout(family).rows - 1):
            e, vlm_idx = again.layout(family).address(row)
            np.testing.assert_array_equal(to_bits(again.feature(family, e, vlm_idx)), values[family][row])
    assert verify_store(again).ok
    with pytest.raises(FileExistsError):
        VLAStore.create(s3_url, [EpisodeData("e", steps=1)], storage_options=s3_options)


# ------------------------------------------------------------ local-only behaviour


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (["a", "b", "a"], "duplicate episode name 'a'"),
        (["ok", ""], "empty"),
        (["ok", "x/y"], "path separator"),
        (["ok", "x\\y"], "path separator"),
        (["ok", ".."], "'..'"),
        (["ok", "ep\x01"], "control character"),
    ],
)
def test_create_with_bad_names_writes_nothing(tmp_path: Path, names: list[str], says: str) -> None:
    path = tmp_path / "new.vla"
    with pytest.raises(FormatError, match=says):
        VLAStore.create(path, [EpisodeData(n, steps=2) for n in names])
    assert not path.exists()


def test_create_refuses_nan_series_and_mismatched_series(tmp_path: Path) -> None:
    path = tmp_path / "new.vla"
    state = np.zeros((4, 3), np.float32)
    state[2, 1] = np.nan
    with pytest.raises(FormatError, match=r"episode 'e0' series 'state': row 2 column 'y' is nan"):
        VLAStore.create(path, [EpisodeData("e0", {"state": state})], columns={"state": ["x", "y", "z"]})
    with pytest.raises(FormatError, match="series have different lengths"):
        VLAStore.create(path, [EpisodeData("e0", {"state": state, "action": np.zeros(3)})])
    with pytest.raises(FormatError, match="episode 'e1' has no series 'state'"):
        VLAStore.create(
            path,
            [
                EpisodeData(
                    "e0",
                    {"state": state},
                ),
                EpisodeData("e1", steps=3),
            ],
            allow_nonfinite=True,
        )
    assert not path.exists()
    VLAStore.create(path, [EpisodeData("e0", {"state": state})], allow_nonfinite=True)
    assert np.isnan(VLAStore.open(path).series("state", "e0")[2, 1])


def test_create_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("user file")
    before = snapshot(tmp_path / "data")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        VLAStore.create(tmp_path / "data", episodes())
    assert snapshot(tmp_path / "data") == before


def test_opening_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such store"):
        VLAStore.open(tmp_path / "missing.vla")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreNotFoundError, match="is not a vlastore store"):
        VLAStore.open(folder)
    assert snapshot(folder) == {"a.jpg": b"\xff\xd8"}
    zarr.create_group(store=str(tmp_path / "plain.zarr"), zarr_format=3)
    with pytest.raises(StoreNotFoundError, match="a zarr group but not a vlastore store"):
        VLAStore.open(tmp_path / "plain.zarr", writable=True)


def test_a_newer_format_version_is_refused_untouched(full_store) -> None:
    store, _ = full_store
    meta_path = Path(store.location) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["vlastore"]["format_version"] = 3
    meta_path.write_text(json.dumps(meta))
    before = snapshot(store.location)
    for writable in (False, True):
        with pytest.raises(FormatError, match="format version 3.*reads versions up to 2.*pip install -U vlastore"):
            VLAStore.open(store.location, writable=writable)
    assert snapshot(store.location) == before


# ------------------------------------------------------------------ metadata integrity (issue 9)


def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_a_flipped_series_shape_is_refused_naming_the_file(full_store) -> None:
    """series/action/zarr.json with shape [N, 2] -> [N, 6] passed verify and gave batches extra zero columns."""
    store, _ = full_store
    meta = Path(store.location) / "series/action/zarr.json"
    _edit_json(meta, lambda m: m["shape"].__setitem__(1, 6))
    with pytest.raises(FormatError, match=r"series/action/zarr.json: shape is \[24, 6\], expected \[24, 2\]"):
        VLAStore.open(store.location)
    report = verify_store(store.location)
    assert [c.where for c in report.corrupt] == ["series/action"]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("steps", 25, "checksum mismatch"),
        ("episodes", 5, "checksum mismatch"),
        ("checksum", "crc32c:00000000", "checksum mismatch"),
    ],
)
def test_a_changed_manifest_fails_its_checksum(full_store, field: str, value: object, says: str) -> None:
    store, _ = full_store
    _edit_json(Path(store.location) / "zarr.json", lambda m: m["attributes"]["vlastore"].__setitem__(field, value))
    with pytest.raises(FormatError, match=says):
        VLAStore.open(store.location)


def test_generation_attributes_are_checksummed_and_checked_against_the_arrays(full_store) -> None:
    store, _ = full_store
    gen = Path(store.location) / "features/fixed/gen-0001/zarr.json"
    _edit_json(gen, lambda m: m["attributes"]["vlastore_generation"]["spec"].__setitem__("row_shape", [10**9]))
    with pytest.raises(FormatError, match="checksum mismatch"):
        VLAStore.open(store.location).reader("fixed")
    report = verify_store(store.location)
    assert any(c.family == "fixed" and "checksum mismatch" in c.reason for c in report.corrupt)


def test_negative_episode_rows_are_refused_naming_the_file(full_store) -> None:
    store, _ = full_store
    writable = VLAStore.open(store.location, writable=True)
    writable.nodes.write_small_array("features/fixed/gen-0001/episode_rows", np.asarray([0, 3, -2, 8, 9]))
    with pytest.raises(FormatError, match=r"gen-0001: episode_rows must start at 0 and never decrease"):
        VLAStore.open(store.location).layout("fixed")


def test_a_deleted_shard_is_missing_not_ok(full_store) -> None:
    """A deleted shard file passed verify with exit 0 (only coverage dropped)."""
    store, _ = full_store
    (Path(store.location) / store.shard_key("fixed", 1)).unlink()
    report = verify_store(store.location)
    assert not report.ok and not report.corrupt
    missing = report.missing["fixed"]
    assert missing.rows == 4 and missing.examples[0] == ("episode_001", 1)


def test_stores_without_checksums_still_read(full_store) -> None:
    store, values = full_store
    for path, key in [("zarr.json", "vlastore"), ("features/fixed/gen-0001/zarr.json", "vlastore_generation")]:
        _edit_json(Path(store.location) / path, lambda m, key=key: m["attributes"][key].pop("checksum"))
    again = VLAStore.open(store.location)
    np.testing.assert_array_equal(again.reader("fixed").gather(np.arange(9)), values["fixed"])
    assert verify_store(store.location).ok and len(verify_store(store.location).notes) == 2


def test_switch_generation_keeps_the_previous_one_by_default(full_store) -> None:
    store, values = full_store
    store.new_generation("fixed", Producer("b"))
    with store.writer("fixed", generation=2) as writer:
        writer.write_rows(np.arange(9), values["fixed"])
    store.switch_generation("fixed", 2)
    assert store.manifest.families["fixed"].generations == (1, 2)
    assert store.nodes.exists("features/fixed/gen-0001")


def test_delete_never_leaves_the_store(full_store, tmp_path: Path) -> None:
    store, _ = full_store
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    link = Path(store.location) / "features" / "fixed" / "gen-0009"
    link.symlink_to(outside, target_is_directory=True)
    writable = VLAStore.open(store.location, writable=True)
    with pytest.raises(FormatError, match="symbolic link|leads outside"):
        writable.nodes.delete("features/fixed/gen-0009")
    with pytest.raises(FormatError, match="leads outside"):
        writable.nodes.delete("features/fixed/gen-0009/sub")
    assert (outside / "keep.txt").read_text() == "precious"


def test_a_new_plan_never_inherits_shards_of_a_generation_whose_deletion_was_killed(full_store) -> None:
    """A killed rmtree can leave shard files without the generation's zarr.json: they must not become rows."""
    from vlastore.format import FamilyEntry
    from vlastore.store import _replace_families

    store, values = full_store
    store.new_generation("fixed", Producer("b"))
    with store.writer("fixed", generation=2) as writer:
        writer.write_rows(np.arange(9), values["fixed"])
    # what a deletion killed midway leaves: the manifest no longer lists it, its zarr.json is gone, shards remain
    store._save_manifest(_replace_families(store.manifest, {**store.manifest.families, "fixed": FamilyEntry(1, (1,))}))
    (Path(store.location) / "features/fixed/gen-0002/zarr.json").unlink()
    assert any(Path(store.location, "features/fixed/gen-0002/values/c").rglob("*"))
    report = verify_store(store.location)
    assert report.ok and any("gen-0002: not in the manifest" in note for note in report.notes)
    again = VLAStore.open(store.location, writable=True)
    assert again.new_generation("fixed", Producer("c")).generation == 2
    with again.writer("fixed", generation=2) as writer:
        assert writer.pending_rows().tolist() == list(range(9))
    with pytest.raises(MissingRowError):
        again.reader("fixed", generation=2).row(0)
