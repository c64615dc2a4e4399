"""The fast read path of vlastore/reader.py: mapped shards, batched gathers, checksums, fallbacks."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import re

import numpy as np
import pytest
from reader_stores import DTYPES, flip_byte, make_store, shard_file
from zarr.storage import MemoryStore

from vlastore.read import arena
from vlastore.read.sources import IndexedShard
from vlastore.reader import FeatureReader, MissingRowError
from vlastore.shardcodec import ChecksumError

MODES = ("always", "once", "never")


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("fast") / "s.vla")


@pytest.fixture(params=["arena", "per-shard"])
def mapping(request, monkeypatch):
    """Run a test with all shards in one address range, and with one map per shard."""
    if request.param == "arena" and not arena.available():
        pytest.skip("no shared mapping range on this platform")
    monkeypatch.setenv("VLASTORE_NO_ARENA", "1" if request.param == "per-shard" else "0")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("verify", MODES)
def test_gather_and_row_return_the_written_values(known, mapping, dtype, verify) -> None:
    rng = np.random.default_rng(1)
    fixed = FeatureReader(known.store, f"fixed_{dtype}", verify=verify)
    assert fixed.use_arena == (mapping == "arena")
    expected = known.values[f"fixed_{dtype}"]
    for _ in range(5):  # random batches spanning several shards, duplicates included
        rows = rng.integers(0, len(expected), size=11)
        got = fixed.gather(rows)
        assert got.dtype == expected.dtype and got.shape == (11, 2, 3)
        np.testing.assert_array_equal(got, expected[rows])
    for row in range(len(expected)):
        np.testing.assert_array_equal(fixed.row(row), expected[row])

    ragged = FeatureReader(known.store, f"ragged_{dtype}", verify=verify)
    values = known.values[f"ragged_{dtype}"]
    rows = rng.integers(0, len(values), size=9)
    padded, lengths = ragged.gather_padded(rows)
    for i, row in enumerate(rows.tolist()):
        assert lengths[i] == len(values[row])
        np.testing.assert_array_equal(padded[i, : lengths[i]], values[row])
        assert not padded[i, lengths[i] :].any()
    for row, value in enumerate(values):
        np.testing.assert_array_equal(ragged.row(row), value)
    for got, row in zip(ragged.rows(rows), rows.tolist(), strict=True):
        np.testing.assert_array_equal(got, values[row])


def test_rows_are_views_of_the_mapped_shard_not_copies(known, mapping) -> None:
    reader = FeatureReader(known.store, "fixed_bfloat16")
    first, again = reader.row(3), reader.row(3)
    assert not first.flags.owndata and np.shares_memory(first, again)
    token_rows = FeatureReader(known.store, "ragged_float32").row(2)
    assert not token_rows.flags.owndata
    tensor = reader.tensor(3)  # torch.from_numpy: the same memory, as bfloat16
    assert str(tensor.dtype) == "torch.bfloat16" and tensor.data_ptr() == first.__array_interface__["data"][0]


def test_gather_checks_its_rows(known) -> None:
    reader = FeatureReader(known.store, "fixed_float32")
    with pytest.raises(IndexError, match="out of range"):
        reader.gather([0, reader.layout.rows])
    with pytest.raises(ValueError, match="gather_padded"):
        FeatureReader(known.store, "ragged_float32").gather([0])
    assert reader.gather([]).shape == (0, 2, 3)


@pytest.mark.parametrize("verify", ["always", "once"])
@pytest.mark.parametrize("family", ["fixed_bfloat16", "ragged_float16"])
def test_a_corrupt_row_raises_checksum_error_and_its_neighbours_still_read(tmp_path, mapping, verify, family) -> None:
    known = make_store(tmp_path / "s.vla")
    reader = FeatureReader(known.store, family)
    bad = 6  # second shard for both families
    start = int(reader.layout.starts[bad])
    shard = start // reader.layout.rows_per_shard
    index = known.store.shard_index(family, shard)
    chunk = start - shard * reader.layout.rows_per_shard
    flip_byte(shard_file(known.store, family, shard), int(index.offsets[chunk]) + 1)

    reader = FeatureReader(known.store, family, verify=verify)
    neighbours = [r for r in known.store.layout(family).shard_rows(shard).tolist() if r != bad]
    with pytest.raises(ChecksumError, match=r"episode_\d+.*vlm_idx=\d+.*corrupt"):
        reader.row(bad)
    if family.startswith("fixed"):
        with pytest.raises(ChecksumError, match="crc32c mismatch"):
            reader.gather([0, bad, 1])
        np.testing.assert_array_equal(reader.gather(neighbours), known.values[family][neighbours])
    else:
        with pytest.raises(ChecksumError):
            reader.gather_padded([bad])
    for row in neighbours:
        np.testing.assert_array_equal(reader.row(row), known.values[family][row])
    # verify="never" trusts the bytes: it reads what is there
    assert (
        FeatureReader(known.store, family, verify="never").row(bad).shape
        == reader.row(neighbours[0]).shape[:0] + np.asarray(known.values[family][bad]).shape
    )


def test_a_corrupt_shard_index_is_reported_with_its_file(tmp_path, mapping) -> None:
    known = make_store(tmp_path / "s.vla", families=("fixed",))
    path = shard_file(known.store, "fixed_float32", 1)
    flip_byte(path, path.stat().st_size - 10)
    with pytest.raises(ChecksumError, match=str(path.name)):
        FeatureReader(known.store, "fixed_float32").gather([5])


def test_missing_rows_and_shards_raise_missing_row_error(tmp_path, mapping) -> None:
    known = make_store(tmp_path / "s.vla", families=())
    from vlastore.format import FamilySpec

    store = known.store
    store.add_family("part", FamilySpec((3,), "float32", vlm_reuse_count=1, rows_per_shard=4))
    values = np.arange(store.layout("part").rows * 3, dtype=np.float32).reshape(-1, 3)
    with store.writer("part") as writer:
        writer.write_rows([0, 2, 3, 9], values[[0, 2, 3, 9]])  # shard 0 with a hole, shard 2 partial
    reader = FeatureReader(store, "part")
    np.testing.assert_array_equal(reader.gather([3, 0, 9, 2]), values[[3, 0, 9, 2]])
    with pytest.raises(MissingRowError, match=r"'episode_000', vlm_idx=1\).*not written"):
        reader.gather([0, 1])
    with pytest.raises(MissingRowError, match="shard 1 is not written"):
        reader.row(5)
    with pytest.raises(MissingRowError):
        reader.gather([4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_store_that_is_not_local_files_reads_through_ranged_reads(dtype) -> None:
    known = make_store(MemoryStore())
    for family in (f"fixed_{dtype}", f"ragged_{dtype}"):
        reader = FeatureReader(known.store, family)
        assert not reader.local and not reader.use_arena
        expected = known.values[family]
        for row in range(len(expected)):
            np.testing.assert_array_equal(reader.row(row), expected[row])
        if family.startswith("fixed"):
            np.testing.assert_array_equal(reader.gather([7, 0, 3, 7]), expected[[7, 0, 3, 7]])
        # ranged reads: nothing of a shard is held but its index
        assert reader._shards and all(isinstance(s, IndexedShard) for s in reader._shards.values())


def test_a_corrupt_row_in_a_non_local_store_raises_checksum_error() -> None:
    known = make_store(MemoryStore(), families=("fixed",))
    store = known.store
    key = store.shard_key("fixed_float32", 0)
    from zarr.core.buffer import cpu, default_buffer_prototype
    from zarr.core.sync import sync

    data = bytearray(sync(store.storage.zarr_store().get(key, prototype=default_buffer_prototype())).to_bytes())
    data[1] ^= 0xFF
    sync(store.storage.zarr_store().set(key, cpu.Buffer.from_bytes(bytes(data))))
    with pytest.raises(ChecksumError):
        FeatureReader(store, "fixed_float32", verify="always").row(0)


def test_compressed_families_read_through_the_general_path(tmp_path, mapping) -> None:
    known = make_store(tmp_path / "z.vla", compression="zstd")
    for dtype in DTYPES:
        reader = FeatureReader(known.store, f"fixed_{dtype}")
        assert not reader.use_arena
        np.testing.assert_array_equal(reader.gather([4, 1, 8]), known.values[f"fixed_{dtype}"][[4, 1, 8]])
        ragged = FeatureReader(known.store, f"ragged_{dtype}")
        np.testing.assert_array_equal(ragged.row(3), known.values[f"ragged_{dtype}"][3])


def test_a_pickled_reader_reopens_its_shards_lazily(known, mapping) -> None:
    reader = FeatureReader(known.store, "fixed_float16")
    before = reader.gather([1, 7])
    copy = pickle.loads(pickle.dumps(reader))
    assert not copy._shards and copy._arena is None
    np.testing.assert_array_equal(copy.gather([1, 7]), before)


def _read_in_child(reader: FeatureReader, rows: list[int], queue) -> None:
    parent_maps = dict(reader._shards)
    values = reader.gather(rows)
    fresh = all(reader._shards[s] is not parent_maps.get(s) for s in reader._shards)
    queue.put((values, fresh))


def test_a_forked_child_maps_its_own_shards(known, mapping) -> None:
    reader = FeatureReader(known.store, "fixed_bfloat16")
    rows = [0, 9, 4, 13]
    expected = reader.gather(rows)  # maps shards in the parent first
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, rows, queue))
    child.start()
    values, fresh = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and fresh
    np.testing.assert_array_equal(values, expected)


def test_the_shard_range_refuses_strides_that_would_waste_address_space() -> None:
    if not arena.available():
        pytest.skip("no shared mapping range on this platform")
    fine = arena.ShardArena(10, 4096 * 4100 + 65540, 4100)  # 2048 bf16 + crc, 4096 rows per shard
    assert fine.slot_nbytes % 4100 == 0 and fine.slot_nbytes % 4096 == 0
    assert fine.slot_nbytes < 2 * (4096 * 4100 + 65540)
    stride = 5 * 2**20 + 4  # 5 MB rows: aligned slots would be 5 GiB each; the reader maps per shard instead
    with pytest.raises(OSError, match="address space"):
        arena.ShardArena(10, 12 * stride + 200, stride)


@pytest.mark.parametrize("location", ["local", "memory"])
def test_negative_row_numbers_raise_on_every_path(known, mapping, location) -> None:
    """gather([-1]) returned the last row while row(-1) raised: row numbers are identifiers everywhere."""
    store = known.store if location == "local" else make_store(MemoryStore()).store
    fixed = FeatureReader(store, "fixed_float32")
    ragged = FeatureReader(store, "ragged_float16")
    rows = store.layout("fixed_float32").rows
    fixed.gather(np.arange(rows))  # every shard mapped: the hot path would serve a wrapped index
    calls = [
        lambda: fixed.gather([-1]),
        lambda: fixed.gather(np.asarray([0, -1])),
        lambda: fixed.row(-1),
        lambda: fixed.rows([-1]),
        lambda: fixed.tensor(-1),
        lambda: ragged.gather_padded([-1]),
        lambda: ragged.row(-1),
        lambda: fixed.gather([rows]),
        lambda: fixed.gather(np.asarray([-rows])),
    ]
    for call in calls:
        with pytest.raises(IndexError, match="out of range"):
            call()
    with pytest.raises(TypeError, match="integers"):
        fixed.gather(np.asarray([0.5]))
    with pytest.raises(IndexError, match="out of range"):
        store.feature("fixed_float32", 0, -1)
    with pytest.raises(IndexError, match="episode #-1 out of range"):
        store.layout("fixed_float32").row(-1, 0)


@pytest.mark.parametrize("verify", ["always", "once"])
@pytest.mark.parametrize("where", ["payload", "crc"])
def test_a_batch_checked_at_once_names_its_corrupt_row_whatever_the_batch(tmp_path, mapping, verify, where) -> None:
    # a batch is checked with one crc32c over the rows as gathered (shardcodec.RowCrcs); a mismatch must still
    # name the corrupt row, for a damaged payload or a damaged stored crc, alone, among others, in groups of
    # more than 64 rows, repeated, and (verify="once") when it is the only row of the batch not checked yet
    known = make_store(tmp_path / "s.vla")
    family = "fixed_bfloat16"
    reader = FeatureReader(known.store, family)
    rps, nbytes = reader.layout.rows_per_shard, reader.row_nbytes
    bad = 6
    shard, chunk = divmod(bad, rps)
    offset = int(known.store.shard_index(family, shard).offsets[chunk]) + (1 if where == "payload" else nbytes + 1)
    flip_byte(shard_file(known.store, family, shard), offset)
    reader = FeatureReader(known.store, family, verify=verify)
    good = [r for r in range(reader.layout.rows) if r != bad]
    if verify == "once":
        np.testing.assert_array_equal(reader.gather(good), known.values[family][good])  # every other row checked
    name = re.escape(reader.describe(bad))
    many = (good * (1 + 70 // len(good)))[:70]
    for batch in ([bad], [*good[:3], bad], [*many, bad, *many], [bad, bad], [*good[:1] * 20, bad]):
        with pytest.raises(ChecksumError, match=name):
            reader.gather(batch)
    np.testing.assert_array_equal(reader.gather(many), known.values[family][many])
    with pytest.raises(ChecksumError, match=name):  # a fresh reader: nothing checked yet
        FeatureReader(known.store, family, verify=verify).gather([*good, bad])


@pytest.mark.parametrize("mode", ["auto", "willneed", "populate", "off"])
def test_every_prefault_mode_reads_the_written_values(known, monkeypatch, mode) -> None:
    # madvise is advice: whatever the mode (VLASTORE_PREFAULT), and whether the kernel knows it or not, the rows
    # read are the rows written
    if not arena.available():
        pytest.skip("no shared mapping range on this platform")
    monkeypatch.setattr(arena, "_PREFAULT", mode)
    reader = FeatureReader(known.store, "fixed_bfloat16", verify="always")
    rows = np.arange(reader.layout.rows)[::-1]
    np.testing.assert_array_equal(reader.gather(rows), known.values["fixed_bfloat16"][rows])
    assert reader._arena is not None and reader._arena.arena.mapped  # read through the shared range
