"""FamilyWriter: round trips, ownership, parallel writers in real processes, crash and resume."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    as_value,
    episodes,
    expected_values,
    plan_writer_store,
    ragged_rows,
    random_rows,
    snapshot,
    spec_for,
    to_bits,
)
from writer_worker import crash_main, dist_main

from vlastore.format import FamilySpec, FormatError
from vlastore.report import verify_store
from vlastore.shardcodec import ChecksumError
from vlastore.storage.local import host_tag
from vlastore.store import EpisodeData, VLAStore
from vlastore.writer import OwnershipError

FORK = multiprocessing.get_context("fork")  # children inherit the imported torch: seconds saved per rank


def _assert_store_holds(store: VLAStore, values: dict[str, object]) -> None:
    for family, expected in values.items():
        assert store.coverage(family).all(), family
        reader = store.reader(family)
        for row in range(store.layout(family).rows):
            np.testing.assert_array_equal(reader.row(row), expected[row])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_round_trip_is_bit_exact(store_path: Path, dtype: str, ragged: bool, compression: str | None) -> None:
    store = VLAStore.create(store_path, episodes())
    shape = (3, 5)
    spec = FamilySpec(shape, dtype, ragged=ragged, compression=compression, rows_per_shard=7, vlm_reuse_count=2)
    rows = int(np.sum((store.catalog.steps + 1) // 2))
    lengths = np.random.default_rng(0).integers(1, 7, size=rows) if ragged else None
    store.add_family("f", spec, lengths=lengths)
    values = ragged_rows(lengths, shape, dtype, seed=1) if ragged else random_rows((rows, *shape), dtype, seed=1)
    # three plain writers (rank/world_size given), each with its own store handle, as separate processes would
    for rank in (2, 0, 1):
        with VLAStore.open(store_path, writable=True).writer("f", rank=rank, world_size=3) as writer:
            mine = writer.pending_rows()
            if ragged:
                writer.write_rows(mine, [as_value(values[r], dtype) for r in mine.tolist()])
            else:
                writer.write_rows(mine, as_value(values[mine], dtype))
    again = VLAStore.open(store_path)
    _assert_store_holds(again, {"f": values})
    layout = again.layout("f")
    for row in range(rows):
        e, vlm_idx = layout.address(row)
        tensor = again.feature("f", again.datasets[e], vlm_idx)
        assert tensor.dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        np.testing.assert_array_equal(to_bits(tensor), values[row])


def test_bfloat16_from_torch_numpy_bits_and_lists(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("bfloat16"))
    source = torch.randn(9, 8).to(torch.bfloat16)
    with store.writer("f") as writer:
        writer.write_rows([0, 1], source[:2])  # torch bfloat16 batch
        writer.write_rows([2, 3], source[2:4].view(torch.int16).numpy().view(np.uint16))  # raw bits
        writer.write_rows([4, 5], [source[4], source[5]])  # a list of tensors
        for row in (6, 7, 8):
            e, vlm_idx = store.layout("f").address(row)
            writer.write(store.datasets[e], vlm_idx, source[row])
    got = torch.stack([store.feature("f", *map(int, store.layout("f").address(r))) for r in range(9)])
    assert torch.equal(got.view(torch.int16), source.view(torch.int16))


def test_a_shard_is_written_once_complete(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))  # shards of 4 rows
    values = random_rows((9, 8), "float32")
    writer = store.writer("f")
    writer.write_rows([0, 1, 2], values[:3])
    writer.wait()
    assert store.written_shards("f").size == 0  # still buffered: no half shard on disk
    writer.write_rows([3], values[3:4])
    assert writer.pending_shards().tolist() == [1, 2]  # complete: on its way to disk, in one piece
    writer.wait()
    assert store.written_shards("f").tolist() == [0] and writer.shards_written == 1
    with pytest.raises(FormatError, match=r"row \('episode_002', vlm_idx=0\) was given twice"):
        writer.write_rows([5, 5], values[5:7])
    writer.write_rows([4], values[4:5])
    with pytest.raises(FormatError, match=r"row \('episode_001', vlm_idx=1\) was given twice"):
        writer.write_rows([4], values[4:5])
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_rows([8], values[8:9])


def test_an_error_inside_the_with_block_writes_no_half_shard(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))
    before = snapshot(store_path)
    with pytest.raises(ZeroDivisionError), store.writer("f") as writer:
        writer.write_rows([0, 1], random_rows((2, 8), "float32"))
        raise ZeroDivisionError("the feature extractor failed")
    assert snapshot(store_path) == before


def test_writer_arguments_are_checked(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        store.writer("f", rank=2, world_size=2)
    with pytest.raises(PermissionError, match="read-only"):
        VLAStore.open(store_path).writer("f")


def test_nonfinite_rows_are_stored_when_allowed(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", FamilySpec((2,), "bfloat16", rows_per_shard=4, vlm_reuse_count=3, allow_nonfinite=True))
    special = torch.tensor([float("nan"), float("-inf")], dtype=torch.bfloat16)
    with store.writer("f") as writer:
        writer.write("episode_000", 0, special)
    got = store.feature("f", "episode_000", 0)
    assert torch.equal(got.view(torch.int16), special.view(torch.int16))


def _run_ranks(store_path: Path, tmp_path: Path, world_size: int) -> None:
    init_file = tmp_path / f"init-{world_size}"
    procs = [
        FORK.Process(target=dist_main, args=(str(store_path), str(init_file), rank, world_size))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_of_a_gloo_process_group_fill_the_store(tmp_path: Path, world_size: int) -> None:
    store_path = tmp_path / "dist.vla"
    store = plan_writer_store(store_path)
    _run_ranks(store_path, tmp_path, world_size)
    again = VLAStore.open(store_path)
    _assert_store_holds(again, expected_values(store))
    assert not list(store_path.rglob("*.partial"))
    # each shard was written by its owner only (another rank's write would have raised): all are there once
    assert again.written_shards("fixed").tolist() == list(range(again.layout("fixed").n_shards))


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    reference_path = tmp_path / "reference.vla"
    reference = plan_writer_store(reference_path)
    values = expected_values(reference)
    for family in ("fixed", "tokens"):
        with reference.writer(family) as writer:
            rows = writer.pending_rows()
            writer.write_rows(
                rows,
                [as_value(values[family][r], "bfloat16" if family == "fixed" else "float16") for r in rows.tolist()],
            )

    crashed_path = tmp_path / "crashed.vla"
    plan_writer_store(crashed_path)
    ready, child_end = FORK.Pipe()
    proc = FORK.Process(target=crash_main, args=(str(crashed_path), child_end))
    proc.start()
    try:
        assert ready.poll(60) and ready.recv() == ("READY", 3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    crashed = VLAStore.open(crashed_path, writable=True)
    assert crashed.written_shards("fixed").tolist() == [0, 1, 2]  # the half-filled 4th shard is not on disk
    assert crashed.coverage("fixed").sum() == 12
    assert crashed.written_shards("tokens").tolist() == [0, 1]
    # a kill inside write_once leaves its temporary file (named with host and pid): the resumed writer cleans it
    stale = (crashed.storage.root / crashed.shard_key("fixed", 5)).parent / (
        f".0.{host_tag()}.{proc.pid}.deadbeef.partial"
    )
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")

    for family in ("fixed", "tokens"):
        with crashed.writer(family) as writer:  # the resumed run: only what is missing
            rows = writer.pending_rows()
            assert rows.size and not crashed.coverage(family)[rows].any()
            writer.write_rows(
                rows,
                [as_value(values[family][r], "bfloat16" if family == "fixed" else "float16") for r in rows.tolist()],
            )
            assert writer.rows_skipped == 0

    def shard_files(root: Path) -> dict[str, bytes]:
        return {k: v for k, v in snapshot(root).items() if "/values/c/" in k}

    assert shard_files(crashed_path) == shard_files(reference_path)
    assert len(shard_files(crashed_path)) == 8 + 10
    assert not list(crashed_path.rglob("*.partial"))


def test_rows_of_finished_shards_are_skipped_on_a_rerun(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))
    values = random_rows((9, 8), "float32")
    with store.writer("f") as writer:
        writer.write_rows(np.arange(4), values[:4])
    changed = values + 1
    with store.writer("f") as writer:  # a naive rerun that gives every row again
        writer.write_rows(np.arange(9), changed)
        assert (writer.rows_skipped, writer.rows_written) == (4, 5)
    np.testing.assert_array_equal(np.stack(store.reader("f").rows(range(9))), np.concatenate([values[:4], changed[4:]]))


def test_ownership_error_names_the_owner(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))
    writer = store.writer("f", rank=0, world_size=2)
    assert writer.owned.tolist() == [0, 2]
    with pytest.raises(OwnershipError, match="shard 1 .* belongs to rank 1.*pending_rows"):
        writer.write("episode_002", 0, np.zeros(8, np.float32))  # row 5: shard 1


def test_bfloat16_nan_inf_check_is_exact_over_all_bit_patterns(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", FamilySpec((256,), "bfloat16", rows_per_shard=256), items_per_episode=[255, 1, 0, 0])
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    nonfinite = (patterns & 0x7F80) == 0x7F80
    finite = patterns[~nonfinite].reshape(255, 256)  # every finite pattern: subnormals, -0, +-max
    writer = store.writer("f")
    writer.write_rows(np.arange(255), finite)
    for bad in patterns[nonfinite].tolist():  # +-Inf and every NaN payload, each alone among zeros
        row = np.zeros((1, 256), np.uint16)
        row[0, bad % 256] = bad
        with pytest.raises(FormatError, match="holds NaN or Inf"):
            writer.write_rows([255], row)
    writer.close()
    np.testing.assert_array_equal(np.stack(store.reader("f").rows(range(255))), finite)
    assert store.coverage("f").tolist() == [True] * 255 + [False]


def test_write_behind_writes_the_same_bytes(tmp_path: Path) -> None:
    def shard_files(root: Path) -> dict[str, bytes]:
        return {k: v for k, v in snapshot(root).items() if "/values/c/" in k}

    results = []
    # fsync=True writes several shards at once, from as many threads (writer._FSYNC_IN_FLIGHT)
    for write_behind, fsync in ((False, False), (True, False), (True, True), (False, True)):
        store = plan_writer_store(tmp_path / f"wb-{write_behind}-{fsync}.vla")
        values = expected_values(store)
        for family, dtype in (("fixed", "bfloat16"), ("tokens", "float16")):
            with store.writer(family, write_behind=write_behind, fsync=fsync) as writer:
                for lo in range(0, store.layout(family).rows, 5):  # several shards in flight
                    rows = np.arange(lo, min(lo + 5, store.layout(family).rows))
                    writer.write_rows(rows, [as_value(values[family][r], dtype) for r in rows.tolist()])
            assert writer.shards_written == store.layout(family).n_shards
        results.append(shard_files(Path(store.location)))
    assert all(result == results[0] for result in results) and len(results[0]) == 18


def test_write_behind_abort_keeps_complete_shards_only(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))
    values = random_rows((9, 8), "float32")
    with pytest.raises(ZeroDivisionError), store.writer("f", write_behind=True) as writer:
        writer.write_rows(np.arange(6), values[:6])  # shard 0 complete (in flight), shard 1 half full
        raise ZeroDivisionError("the feature extractor failed")
    assert store.written_shards("f").tolist() == [0]
    assert store.coverage("f").tolist() == [True] * 4 + [False] * 5
    with store.writer("f", write_behind=True) as writer:
        assert writer.pending_rows().tolist() == [4, 5, 6, 7, 8]


# ------------------------------------------------------------------ issue 9 regressions


@pytest.mark.parametrize("rows_per_shard", [8, 3])
def test_rows_out_of_order_in_one_call_land_where_they_belong(store_path: Path, rows_per_shard: int) -> None:
    """write_rows([0,1,2,4,3,5,6,7]) once read row 3 back as row 4 (the block copy only checked the span)."""
    store = VLAStore.create(store_path, episodes((30,)))
    store.add_family("f", spec_for("float32", rows_per_shard=rows_per_shard))
    values = random_rows((10, 8), "float32", seed=3)
    order = [0, 1, 2, 4, 3, 5, 6, 7, 9, 8]
    with store.writer("f") as writer:
        writer.write_rows(order, values[order])
    np.testing.assert_array_equal(VLAStore.open(store_path).reader("f").gather(np.arange(10)), values)


@pytest.mark.parametrize(("dtype", "given"), [("float32", ">f4"), ("float16", ">f2"), ("bfloat16", ">u2")])
def test_non_native_byte_order_is_stored_as_the_same_values(store_path: Path, dtype: str, given: str) -> None:
    """A big-endian '>f4' array was stored byte-swapped (4.6e-41 read back for 1.0)."""
    store = VLAStore.create(store_path, episodes((30,)))
    store.add_family("f", spec_for(dtype))
    values = random_rows((10, 8), dtype, seed=4)
    swapped = values.astype(given)
    assert swapped.dtype.byteorder == ">" and swapped.tobytes() != values.tobytes()
    with store.writer("f") as writer:
        writer.write_rows(np.arange(5), swapped[:5])
        writer.write_rows(np.arange(5, 10), [row for row in swapped[5:]])
    got = VLAStore.open(store_path).reader("f").gather(np.arange(10))
    assert got.dtype.isnative and got.dtype == np.dtype(values.dtype)
    np.testing.assert_array_equal(got, values)


def test_non_native_series_are_stored_as_the_same_values(store_path: Path) -> None:
    state = np.arange(12, dtype=np.float32).reshape(6, 2)
    store = VLAStore.create(store_path, [EpisodeData("ep", {"state": state.astype(">f4")})])
    got = VLAStore.open(store_path).series_all("state")
    assert got.dtype.isnative and store.manifest.series["state"].dtype == "float32"
    np.testing.assert_array_equal(got, state)


def test_negative_and_fractional_row_numbers_are_refused(store_path: Path) -> None:
    store = VLAStore.create(store_path, episodes())
    store.add_family("f", spec_for("float32"))
    with store.writer("f") as writer:
        with pytest.raises(IndexError, match="row -1 out of range"):
            writer.write_rows([-1], random_rows((1, 8), "float32"))
        with pytest.raises(TypeError, match="must be integers"):
            writer.write_rows(np.asarray([1.5]), random_rows((1, 8), "float32"))
        assert writer.rows_written == 0


def _holes(store_path: Path, dtype: str, ragged: bool, compression: str | None) -> tuple[VLAStore, object, np.ndarray]:
    store = VLAStore.create(store_path, episodes())
    shape = (4,) if ragged else (8,)
    lengths = np.random.default_rng(1).integers(1, 4, size=9) if ragged else None
    store.add_family(
        "f",
        spec_for(dtype, ragged=ragged, compression=compression, rows_per_shard=6 if ragged else 4, row_shape=shape),
        lengths=lengths,
    )
    values = ragged_rows(lengths, shape, dtype, seed=5) if ragged else random_rows((9, *shape), dtype, seed=5)
    kept = np.asarray([0, 2, 3, 5, 8])
    with store.writer("f") as writer:
        writer.write_rows(kept, [as_value(values[r], dtype) for r in kept.tolist()])
    return store, values, kept


@pytest.mark.parametrize(
    ("dtype", "ragged", "compression"),
    [("bfloat16", False, None), ("float32", False, "zstd"), ("float16", True, None), ("float16", True, "zstd")],
)
def test_a_rerun_fills_holes_by_replacing_the_shard_with_a_superset(
    store_path: Path, dtype: str, ragged: bool, compression: str | None
) -> None:
    """Holes were permanent: a shard written at close() with missing rows counted as done."""
    store, values, kept = _holes(store_path, dtype, ragged, compression)
    reference = VLAStore.create(store_path.with_name("reference.vla"), episodes())
    reference.add_family("f", store.spec("f"), lengths=store.layout("f").lengths if ragged else None)
    with reference.writer("f") as writer:
        writer.write_rows(np.arange(9), [as_value(values[r], dtype) for r in range(9)])
    again = VLAStore.open(store_path, writable=True)
    with again.writer("f") as writer:
        missing = [r for r in range(9) if r not in kept.tolist()]
        assert writer.pending_rows().tolist() == missing
        writer.write_rows(np.arange(9), [as_value(values[r], dtype) for r in range(9)])  # on-disk rows skipped
        assert (writer.rows_written, writer.rows_skipped) == (len(missing), len(kept))
    assert snapshot(store_path).keys() == snapshot(reference.location).keys()
    shards = {k: v for k, v in snapshot(store_path).items() if "/values/c/" in k}
    assert shards == {k: v for k, v in snapshot(reference.location).items() if "/values/c/" in k}


def test_repair_rewrites_corrupt_rows_and_unreadable_shards(store_path: Path) -> None:
    store, values, _ = _holes(store_path, "float32", False, None)
    with store.writer("f") as writer:
        writer.write_rows([1, 4, 6, 7], values[[1, 4, 6, 7]])
    root = Path(store.location)
    shard0 = root / store.shard_key("f", 0)
    data = bytearray(shard0.read_bytes())
    data[(8 * 4 + 4) * 2 + 1] ^= 0x08  # row 2
    shard0.write_bytes(bytes(data))
    shard1 = root / store.shard_key("f", 1)
    data = bytearray(shard1.read_bytes())
    data[-1] ^= 0x01  # shard 1's index: rows 4-7 unreadable
    shard1.write_bytes(bytes(data))
    plain = VLAStore.open(store_path, writable=True).writer("f")
    assert plain.pending_rows().tolist() == [] and plain.shards_unreadable[0][0] == 1  # left alone without repair
    plain.close()
    with VLAStore.open(store_path, writable=True).writer("f", repair=True) as writer:
        assert writer.pending_rows().tolist() == [2, 4, 5, 6, 7]
        writer.write_rows(np.arange(9), values)
    assert verify_store(store_path).ok
    np.testing.assert_array_equal(VLAStore.open(store_path).reader("f").gather(np.arange(9)), values)


def test_filling_a_hole_next_to_a_corrupt_row_asks_for_repair(store_path: Path) -> None:
    store, values, _ = _holes(store_path, "float32", False, None)
    shard0 = Path(store.location) / store.shard_key("f", 0)
    data = bytearray(shard0.read_bytes())
    data[5] ^= 0x08  # row 0, kept from the old file when the holes of shard 0 are filled
    shard0.write_bytes(bytes(data))
    writer = VLAStore.open(store_path, writable=True).writer("f", write_behind=False)
    before = shard0.read_bytes()
    with pytest.raises(ChecksumError, match="repair=True"):
        writer.write_rows([1], values[[1]])
        writer.finish_shard(0)
    assert shard0.read_bytes() == before  # nothing rewritten over the corrupt row


def test_giving_only_rows_already_on_disk_rewrites_nothing(store_path: Path) -> None:
    store, values, kept = _holes(store_path, "float32", False, None)
    before = snapshot(store_path)
    with VLAStore.open(store_path, writable=True).writer("f") as writer:
        writer.write_rows(kept, values[kept])
        assert (writer.rows_written, writer.rows_skipped, writer.shards_written) == (0, len(kept), 0)
    assert snapshot(store_path) == before


@pytest.mark.parametrize("write_behind", [False, True])
def test_a_shard_filled_in_its_file_with_rows_missing_is_written_compacted(tmp_path: Path, write_behind: bool) -> None:
    """Raw shards on local files are filled in place; one closed with holes is rebuilt like the in-memory path."""
    from unittest.mock import patch

    from vlastore import writer as writer_module

    files = []
    for direct in (True, False):
        store = VLAStore.create(tmp_path / f"holes-{direct}.vla", episodes())
        store.add_family("f", spec_for("float32"))  # shards of 4 rows
        values = random_rows((9, 8), "float32", seed=7)
        limit = patch.object(writer_module, "_MAX_DIRECT", 64 if direct else 0)
        with limit, store.writer("f", write_behind=write_behind) as writer:
            writer.write_rows([0, 2, 3, 5, 8], values[[0, 2, 3, 5, 8]])
            assert (next(iter(writer._pending.values())).direct is not None) == direct
        assert store.coverage("f").tolist() == [True, False, True, True, False, True, False, False, True]
        reader = VLAStore.open(store.location).reader("f")
        np.testing.assert_array_equal(reader.gather([0, 2, 3, 5, 8]), values[[0, 2, 3, 5, 8]])
        assert not list(Path(store.location).rglob("*.partial"))
        files.append({k: v for k, v in snapshot(store.location).items() if "/values/c/" in k})
    assert files[0] == files[1] and len(files[0]) == 3
