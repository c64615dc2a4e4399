"""Shard files: our encoder and zarr-python's sharding codec read each other's bytes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync

from vlastore.shardcodec import (
    CHUNK_RESIDUE,
    CRC_BYTES,
    ChecksumError,
    RawShardBuilder,
    RowCrcs,
    crc32c,
    decode_index,
    encode_shard,
    index_nbytes,
    row_crcs,
    run_intact,
)

CHUNKS = 6


def _zarr_array(dtype: str, compression: str | None, rows: int = 10) -> zarr.Array:
    compressors = [ZstdCodec(level=3), Crc32cCodec()] if compression else [Crc32cCodec()]
    return zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(rows, 5),
        chunks=(1, 5),
        shards=(CHUNKS, 5),
        dtype=dtype,
        compressors=compressors,
        fill_value=0,
        zarr_format=3,
    )


def _put(arr: zarr.Array, key: str, data: np.ndarray) -> None:
    sync(arr.store_path.store.set(key, cpu.Buffer.from_bytes(data.tobytes())))


def _get(arr: zarr.Array, key: str) -> bytes:
    return sync(arr.store_path.store.get(key, prototype=default_buffer_prototype())).to_bytes()


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("present", [[0, 1, 2, 3, 4, 5], [1, 4], [0], []])
def test_zarr_reads_our_shards(compression: str | None, present: list[int]) -> None:
    arr = _zarr_array("float32", compression)
    rows = np.random.default_rng(0).normal(size=(len(present), 5)).astype(np.float32)
    _put(arr, "c/0/0", encode_shard(rows, np.asarray(present, dtype=np.int64), CHUNKS, compression))
    expected = np.zeros((CHUNKS, 5), np.float32)
    expected[present] = rows
    np.testing.assert_array_equal(arr[:CHUNKS], expected)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_we_read_zarr_shards(compression: str | None) -> None:
    arr = _zarr_array("uint16", compression)
    data = np.arange(CHUNKS * 5, dtype=np.uint16).reshape(CHUNKS, 5)
    arr[:CHUNKS] = data
    raw = np.frombuffer(_get(arr, "c/0/0"), dtype=np.uint8)
    index = decode_index(raw, CHUNKS)
    assert index.present.all()
    for c in range(CHUNKS):
        np.testing.assert_array_equal(index.chunk_bytes(raw, c, compression).view(np.uint16), data[c])


def test_raw_layout_is_back_to_back_rows_with_crc_then_index() -> None:
    rows = np.arange(12, dtype=np.uint16).reshape(3, 4)
    out = encode_shard(rows, np.array([0, 1, 2]), 4, None)
    stride = 8 + 4
    assert out.size == 3 * stride + index_nbytes(4) == 3 * 12 + 4 * 16 + 4
    assert out[:8].view(np.uint16).tolist() == [0, 1, 2, 3]
    index = decode_index(out, 4)
    assert index.stride == stride
    assert index.offsets[:3].tolist() == [0, 12, 24] and index.nbytes[:3].tolist() == [12, 12, 12]
    assert not index.present[3]


def test_builder_with_holes_compacts_present_chunks() -> None:
    builder = RawShardBuilder(chunks_per_shard=5, n_chunks=4, chunk_nbytes=2)
    builder.payload[:] = np.arange(8, dtype=np.uint8).reshape(4, 2)
    out = builder.finish(np.array([True, False, True, False]))
    index = decode_index(out, 5)
    assert index.present.tolist() == [True, False, True, False, False]
    assert index.chunk_bytes(out, 2, None).tolist() == [4, 5]


def test_flipped_bytes_are_caught() -> None:
    out = encode_shard(np.ones((2, 4), np.float32), np.array([0, 1]), 2, None)
    bad = out.copy()
    bad[3] ^= 0x01
    index = decode_index(bad, 2)
    with pytest.raises(ChecksumError, match="chunk 0"):
        index.chunk_bytes(bad, 0, None)
    assert index.chunk_bytes(bad, 1, None).view(np.float32).tolist() == [1.0] * 4
    bad_index = out.copy()
    bad_index[-10] ^= 0x01
    with pytest.raises(ChecksumError, match="shard index"):
        decode_index(bad_index, 2)
    with pytest.raises(ChecksumError, match="too short"):
        decode_index(out[:10], 2)
    missing = decode_index(out, 2)
    with pytest.raises(KeyError):
        decode_index(encode_shard(np.ones((1, 4), np.float32), np.array([1]), 2), 2).chunk_bytes(out, 0, None)
    assert missing.present.all()


# ------------------------------------------------------------------ issue 9: bounded by what is there


def test_an_index_pointing_outside_the_shard_is_corrupt() -> None:
    from vlastore.shardcodec import crc32c

    data = encode_shard(np.zeros((2, 4), np.float32), np.asarray([0, 1]), 4)
    tail = bytes(data[-index_nbytes(4) :])
    decode_index(tail, 4, data.size - index_nbytes(4))  # the honest index passes
    pairs = np.frombuffer(tail[:-4], dtype="<u8").copy().reshape(4, 2)
    pairs[1] = (16, 1 << 40)  # a chunk of 1 TiB, with a valid crc over the index
    forged = pairs.tobytes() + crc32c(pairs.tobytes()).to_bytes(4, "little")
    with pytest.raises(ChecksumError, match="outside"):
        decode_index(forged, 4, data.size - index_nbytes(4))


def test_zstd_chunks_are_decoded_into_exactly_one_row() -> None:
    from numcodecs import Zstd

    from vlastore.shardcodec import zstd_content_size, zstd_decode_exact

    frame = Zstd(level=3).encode(np.arange(64, dtype=np.uint8).tobytes())
    assert zstd_content_size(frame) == 64
    np.testing.assert_array_equal(zstd_decode_exact(frame, 64), np.arange(64, dtype=np.uint8))
    with pytest.raises(ChecksumError, match="declares 64 bytes, a row has 32"):
        zstd_decode_exact(frame, 32)
    assert zstd_content_size(b"not zstd") is None


@settings(max_examples=60, deadline=None)
@given(nbytes=st.integers(1, 300), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_rows_checked_together_match_exactly_when_each_matches_its_own_crc(nbytes, n, seed, data) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    crcs = np.array([crc32c(r) for r in rows], dtype="<u4")
    checker = RowCrcs(nbytes)
    assert checker.all_match(rows, crcs)
    assert checker is row_crcs(nbytes) or row_crcs(nbytes).all_match(rows, crcs)
    if n == 0:
        return
    # any one damaged byte, in a row or in a stored crc, is caught (the combination is invertible)
    i = data.draw(st.integers(0, n - 1))
    bad_rows = rows.copy()
    bad_rows[i, data.draw(st.integers(0, nbytes - 1))] ^= data.draw(st.integers(1, 255))
    assert not checker.all_match(bad_rows, crcs)
    bad_crcs = crcs.copy()
    bad_crcs[i] ^= np.uint32(data.draw(st.integers(1, 2**32 - 1)))
    assert not checker.all_match(rows, bad_crcs)
    assert (
        not checker.all_match(rows[::-1].copy(), crcs)
        or n == 1
        or (rows == rows[::-1]).all()
        or (crcs == crcs[::-1]).all()
    )  # rows in another order than their crcs


@settings(max_examples=40, deadline=None)
@given(payload=st.integers(0, 64), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_a_run_of_adjacent_chunks_is_intact_exactly_when_each_chunk_is(payload, k, seed, data) -> None:
    rng = np.random.default_rng(seed)
    stride = payload + CRC_BYTES
    body = rng.integers(0, 256, size=(k, payload), dtype=np.uint8)
    chunks = np.concatenate(
        [body, np.array([crc32c(r) for r in body], dtype="<u4").view(np.uint8).reshape(k, 4)], axis=1
    )
    assert all(crc32c(c) == CHUNK_RESIDUE for c in chunks)
    assert run_intact(chunks, stride)
    flat = chunks.reshape(-1).copy()
    flat[data.draw(st.integers(0, flat.size - 1))] ^= data.draw(st.integers(1, 255))
    assert not run_intact(flat, stride)
