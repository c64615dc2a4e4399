"""Encode and decode one shard file of the zarr v3 ``sharding_indexed`` codec.

The arrays vlastore writes are sharded along axis 0 only, with one stored row
per inner chunk, inner codecs ``bytes`` (+ ``zstd``) + ``crc32c`` and the index
(``bytes`` + ``crc32c``) at the end. A shard file is therefore::

    chunk_0 crc_0 chunk_1 crc_1 ...   index[(offset, nbytes) uint64 LE] * R   index_crc

with ``(2**64-1, 2**64-1)`` for a chunk that is absent. zarr-python reads these
files as written here (tests/test_shardcodec.py holds us to that), and writing
them directly is what makes the writer as fast as ``np.save``.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from crc32c import crc32c as _crc32c

__all__ = [
    "ShardIndex",
    "RawShardBuilder",
    "encode_shard",
    "decode_index",
    "index_nbytes",
    "ChecksumError",
    "crc32c",
    "zstd_decode_exact",
    "zstd_content_size",
    "CRC_BYTES",
    "crc_ok",
    "crc_mismatch",
    "RowCrcs",
    "row_crcs",
    "run_intact",
    "CHUNK_RESIDUE",
    "raw_chunks",
    "raw_index",
]

MISSING = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
CRC_BYTES = 4
"""Every chunk (and the index) ends with the crc32c of what precedes it, little-endian."""
_CRC_BYTES = CRC_BYTES


class ChecksumError(ValueError):
    """Stored bytes do not match their crc32c."""


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """crc32c of a bytes-like object or of a C-contiguous array's bytes (no copy)."""
    return _crc32c(data)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol


def crc_ok(stored: np.ndarray) -> bool:
    """Whether stored bytes (uint8: a payload followed by its crc32c) are intact."""
    body = stored[:-CRC_BYTES]
    return crc32c(np.ascontiguousarray(body)) == int.from_bytes(stored[-CRC_BYTES:].tobytes(), "little")


def crc_mismatch(payload: np.ndarray, crcs: np.ndarray, positions: np.ndarray) -> int | None:
    """For payload rows (a ``(n, row_nbytes)`` uint8 matrix) and their stored crcs, the index into ``positions``
    of the first row whose crc32c differs, or None when every one matches."""
    for i, p in enumerate(positions.tolist()):
        if _crc32c(payload[p]) != int(crcs[p]):
            return i
    return None


CHUNK_RESIDUE = 0x48674BC7
"""crc32c of any payload followed by its own crc32c (little-endian): the same for every intact chunk."""

_GROUP = 64
_U4 = np.dtype("<u4")
"""Rows checked by one crc32c call in :class:`RowCrcs` (its table holds 4 KiB per row of a group)."""


def _apply(columns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A GF(2)-linear map of 32-bit values, given by the images of its 32 unit vectors, applied to ``values``."""
    bits = (values[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    return np.bitwise_xor.reduce(bits * columns, axis=1)  # type: ignore[no-any-return]


class RowCrcs:
    """Checks many rows of ``nbytes`` bytes against their stored crc32c with one crc32c call per 64 rows.

    crc32c is linear: for rows ``P_0 .. P_{n-1}`` of one size, ``crc(P_0 || .. || P_{n-1})`` is
    ``XOR_i Z^(n-1-i)(crc(P_i))``, where ``Z`` (appending ``nbytes`` zero bytes) is a fixed 32x32 bit
    matrix. So the crc of the rows as gathered (one C call over contiguous bytes, hot in the CPU's cache
    right after the gather) is compared with the same combination of the stored crcs (table lookups, a
    few numpy calls per batch whatever its size) instead of one Python call per row.

    One corrupt row (payload or stored crc) is always caught, exactly as by its own crc: ``Z`` is
    invertible. Several corrupt rows in one group could cancel out with probability about ``2**-32``,
    that of a corrupt row matching its crc by chance. A mismatch is then located row by row
    (:func:`crc_mismatch`).
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        zeros = np.zeros(nbytes, dtype=np.uint8)
        base = _crc32c(zeros)  # type: ignore[arg-type]
        # crc(A || B) = Z(crc(A)) ^ crc(B) for |B| = nbytes, and crc32c(B, value=v) continues a crc v over B
        shift = np.array([_crc32c(zeros, 1 << j) ^ base for j in range(32)], dtype=np.uint32)  # type: ignore[arg-type]
        powers = np.empty((_GROUP, 32), dtype=np.uint32)
        powers[0] = np.uint32(1) << np.arange(32, dtype=np.uint32)
        for k in range(1, _GROUP):
            powers[k] = _apply(shift, powers[k - 1])
        # table[k, b, v]: Z^k of byte b of a crc holding value v (so Z^k(c) is the XOR of 4 lookups)
        vbits = (np.arange(256, dtype=np.uint32)[:, None] >> np.arange(8, dtype=np.uint32)) & np.uint32(1)
        cols = powers.reshape(_GROUP, 4, 1, 8)
        self._table = np.bitwise_xor.reduce(vbits[None, None] * cols, axis=-1).reshape(-1)
        self._table2d = self._table.reshape(_GROUP * 4, 256)
        self._byte_offsets = np.arange(4, dtype=np.int64) * 256
        self._down = np.arange(_GROUP - 1, -1, -1, dtype=np.int64) * 1024
        self._bases: dict[int, np.ndarray] = {}  # per batch size up to 64: the table offsets of each crc byte
        self._table_rows: dict[int, np.ndarray] = {}

    def expected(self, crcs: np.ndarray) -> np.ndarray:
        """The crc32c each group of 64 rows (the last one shorter) should have, from the rows' stored crcs."""
        n = len(crcs)
        cb = np.ascontiguousarray(crcs, dtype="<u4").view(np.uint8)
        if n <= _GROUP:
            return np.bitwise_xor.reduce(self._table.take(self._base(n) + cb), keepdims=True)
        i = np.arange(n, dtype=np.int64)
        k = (np.minimum(_GROUP, n - (i // _GROUP) * _GROUP) - 1 - i % _GROUP) * 1024
        per_row = np.bitwise_xor.reduce(self._table.take(k[:, None] + self._byte_offsets + cb.reshape(n, 4)), axis=1)
        return np.bitwise_xor.reduceat(per_row, np.arange(0, n, _GROUP))

    def _base(self, n: int) -> np.ndarray:
        """Table offsets of the 4 bytes of each of ``n <= 64`` crcs (flat, in the crcs' byte order)."""
        base = self._bases.get(n)
        if base is None:
            base = self._bases[n] = (self._down[_GROUP - n :, None] + self._byte_offsets).reshape(-1)
        return base

    def _rows(self, n: int) -> np.ndarray:
        """Rows of the ``(64 * 4, 256)`` table for the 4 bytes of each of ``n <= 64`` crcs."""
        found = self._table_rows.get(n)
        if found is None:
            found = self._table_rows[n] = self._base(n) // 256
        return found

    def all_match(self, rows: np.ndarray, crcs: np.ndarray) -> bool:
        """Whether C-contiguous ``rows`` (``n`` rows of ``nbytes``, any dtype) all match ``crcs`` (``n`` values)."""
        n = len(crcs)
        if n == 0:
            return True
        assert rows.flags.c_contiguous and rows.nbytes == n * self.nbytes, "one stored crc per contiguous row"
        if n <= _GROUP:  # the hot path (a training batch): a handful of numpy calls
            if crcs.dtype != _U4 or not crcs.flags.c_contiguous:
                crcs = np.ascontiguousarray(crcs, dtype=_U4)
            want = np.bitwise_xor.reduce(self._table2d[self._rows(n), crcs.view(np.uint8)])
            return bool(_crc32c(rows) == want)  # type: ignore[arg-type]
        flat = rows.reshape(-1).view(np.uint8)
        want = self.expected(crcs)
        span = _GROUP * self.nbytes
        got = np.fromiter(
            (_crc32c(flat[lo : lo + span]) for lo in range(0, flat.size, span)),  # type: ignore[arg-type]
            dtype=np.uint32,
            count=len(want),
        )
        return bool(np.array_equal(got, want))


_ROW_CRCS: dict[int, RowCrcs] = {}
_ROW_CRCS_LOCK = threading.Lock()


def row_crcs(nbytes: int) -> RowCrcs:
    """The :class:`RowCrcs` for rows of ``nbytes`` (made once per size and process: about 1 ms)."""
    found = _ROW_CRCS.get(nbytes)
    if found is None:
        with _ROW_CRCS_LOCK:
            found = _ROW_CRCS.get(nbytes) or RowCrcs(nbytes)
            _ROW_CRCS[nbytes] = found
    return found


@functools.lru_cache(maxsize=64)
def _zero_chunk(stride: int) -> bytes:
    body = bytes(stride - _CRC_BYTES)
    return body + _crc32c(body).to_bytes(_CRC_BYTES, "little")


_RUNS: dict[int, list[int]] = {}


def _run_crc(stride: int, chunks: int) -> int:
    """crc32c of ``chunks`` intact chunks of ``stride`` bytes back to back (the same whatever their payloads)."""
    known = _RUNS.setdefault(stride, [0])
    if len(known) <= chunks:
        chunk, value, more = _zero_chunk(stride), known[-1], []
        for _ in range(len(known), chunks + 1):
            value = _crc32c(chunk, value)
            more.append(value)
        known.extend(more)  # one list extension: a racing thread at worst computes the same values again
    return known[chunks]


def run_intact(stored: np.ndarray, stride: int) -> bool:
    """Whether adjacent chunks (``payload crc32c`` each, ``stride`` bytes, back to back, C-contiguous) are all
    intact, with one crc32c call over them all.

    The crc32c of an intact chunk, crc included, is :data:`CHUNK_RESIDUE` whatever its payload, so the crc
    of ``k`` intact chunks in a row is a constant of ``k`` and ``stride``. One corrupt chunk always shows;
    several could cancel out with probability about ``2**-32``.
    """
    flat = stored.reshape(-1).view(np.uint8)
    chunks = flat.size // stride
    assert chunks * stride == flat.size, "whole chunks"
    return bool(_crc32c(flat) == _run_crc(stride, chunks))  # type: ignore[arg-type]


def raw_chunks(rows: np.ndarray) -> list[memoryview | bytes]:
    """The bytes of raw chunks holding ``rows`` (a C-contiguous ``(n, row_nbytes)`` uint8 matrix), as buffers to
    write one after the other: ``[row_0, crc_0, row_1, crc_1, ...]``, the rows as views (nothing copied) and
    their crc32c little-endian, one crc32c call per row and no other Python object made per row but its view."""
    n, nbytes = rows.shape
    flat = memoryview(rows.reshape(-1))  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    views = [flat[i * nbytes : (i + 1) * nbytes] for i in range(n)]
    crcs = np.fromiter(map(_crc32c, views), dtype=_U4, count=n).tobytes()
    out: list[memoryview | bytes] = [b""] * (2 * n)
    out[0::2] = views
    out[1::2] = [crcs[i : i + _CRC_BYTES] for i in range(0, n * _CRC_BYTES, _CRC_BYTES)]
    return out


def raw_index(chunks_per_shard: int, chunks: np.ndarray, stride: int) -> np.ndarray:
    """The index (crc32c included) of a raw shard holding ``chunks`` (ascending chunk numbers) back to back from
    offset 0, ``stride`` bytes each: the last :func:`index_nbytes` bytes of its file."""
    offsets = np.full(chunks_per_shard, MISSING, dtype="<u8")
    nbytes = np.full(chunks_per_shard, MISSING, dtype="<u8")
    offsets[chunks] = np.arange(len(chunks), dtype=np.uint64) * np.uint64(stride)
    nbytes[chunks] = stride
    out = np.empty(index_nbytes(chunks_per_shard), dtype=np.uint8)
    _put_index(out, 0, offsets, nbytes)
    return out


def index_nbytes(chunks_per_shard: int) -> int:
    return chunks_per_shard * 16 + _CRC_BYTES


def _zstd(level: int = 3) -> Any:  # numcodecs is heavy to import; only compressed families pay for it
    from numcodecs import Zstd

    return Zstd(level=level)


_ZSTD_MAGIC = 0xFD2FB528


def zstd_content_size(frame: bytes | memoryview | np.ndarray) -> int | None:
    """The decompressed size a zstd frame's header declares, or None when it declares none (or is no frame)."""
    head = bytes(memoryview(frame)[:18])  # type: ignore[arg-type]
    if len(head) < 5 or int.from_bytes(head[:4], "little") != _ZSTD_MAGIC:
        return None
    descriptor = head[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def zstd_decode_exact(body: bytes | np.ndarray, nbytes: int) -> np.ndarray:
    """Decompress one chunk that must hold exactly ``nbytes`` bytes, into a buffer of that size.

    The frame's declared size is checked before anything is allocated, so a damaged
    or crafted chunk cannot make the reader allocate what its header claims.

    Raises:
        ChecksumError: the frame declares another size, or does not decompress.
    """
    declared = zstd_content_size(body if not isinstance(body, np.ndarray) else body[:18].tobytes())
    if declared != nbytes:
        raise ChecksumError(f"compressed chunk declares {declared} bytes, a row has {nbytes}")
    out = np.empty(nbytes, dtype=np.uint8)
    try:
        _zstd().decode(body if isinstance(body, bytes) else np.ascontiguousarray(body).tobytes(), out=out)
    except (ValueError, RuntimeError) as exc:
        raise ChecksumError(f"compressed chunk does not decompress ({exc})") from None
    return out


def encode_shard(
    rows: np.ndarray,
    present: np.ndarray,
    chunks_per_shard: int,
    compression: str | None = None,
) -> np.ndarray:
    """Bytes of one shard file.

    Args:
        rows: ``[n_present, ...]`` stored rows, in chunk order, any dtype (its
            bytes are written little-endian as they are).
        present: sorted chunk numbers (``0 <= c < chunks_per_shard``) of ``rows``.
        chunks_per_shard: inner chunks the shard's index describes.
        compression: ``None`` or ``"zstd"``.

    Returns:
        A uint8 array holding the whole file.
    """
    present = np.asarray(present, dtype=np.int64)
    n = len(present)
    assert rows.shape[0] == n, "one row per present chunk"
    row_bytes = int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.dtype.itemsize
    payload = np.ascontiguousarray(rows).view(np.uint8).reshape(n, row_bytes)  # n may be 0: an empty shard
    if compression is None:
        span = int(present[-1]) + 1 if n else 0
        builder = RawShardBuilder(chunks_per_shard, span, payload.shape[1])
        builder.payload[present] = payload
        mask = np.zeros(span, dtype=bool)
        mask[present] = True
        return builder.finish(mask)
    offsets = np.full(chunks_per_shard, MISSING, dtype="<u8")
    nbytes = np.full(chunks_per_shard, MISSING, dtype="<u8")
    codec = _zstd()
    parts = []
    pos = 0
    for c, r in zip(present.tolist(), payload, strict=False):
        blob = bytes(codec.encode(r))
        blob += crc32c(blob).to_bytes(_CRC_BYTES, "little")
        parts.append(blob)
        offsets[c] = pos
        nbytes[c] = len(blob)
        pos += len(blob)
    out = np.empty(pos + index_nbytes(chunks_per_shard), dtype=np.uint8)
    out[:pos] = np.frombuffer(b"".join(parts), dtype=np.uint8)
    _put_index(out, pos, offsets, nbytes)
    return out


class RawShardBuilder:
    """An uncompressed shard assembled in place: rows are copied once, into the file's bytes.

    Fill ``payload[c]`` (uint8, one row of chunk ``c``), then :meth:`finish`.
    """

    def __init__(
        self, chunks_per_shard: int, n_chunks: int, chunk_nbytes: int, buffer: np.ndarray | None = None
    ) -> None:
        self.chunks_per_shard = chunks_per_shard
        self.n_chunks = n_chunks
        self.chunk_nbytes = chunk_nbytes
        self.stride = chunk_nbytes + _CRC_BYTES
        size = n_chunks * self.stride + index_nbytes(chunks_per_shard)
        # a reused buffer (see nbytes_for) spares the page faults of a fresh allocation per shard
        self.buffer = buffer if buffer is not None and buffer.size >= size else np.empty(size, dtype=np.uint8)
        self._out = self.buffer[:size]
        body = self._out[: n_chunks * self.stride].reshape(n_chunks, self.stride)
        self.payload = body[:, :chunk_nbytes]
        self._crc = body[:, chunk_nbytes:]

    def finish(self, present: np.ndarray) -> np.ndarray:
        """The shard file's bytes; chunks where ``present`` (bool per chunk) is False are left out."""
        present = np.asarray(present, dtype=bool)
        n = int(present.sum())
        if n == self.n_chunks:
            out = self._out
        else:  # a shard with holes (rows skipped): compact the present chunks to the front
            out = np.empty(n * self.stride + index_nbytes(self.chunks_per_shard), dtype=np.uint8)
            body = out[: n * self.stride].reshape(n, self.stride)
            body[:, : self.chunk_nbytes] = self.payload[present]
            self.payload = body[:, : self.chunk_nbytes]
            self._crc = body[:, self.chunk_nbytes :]
        crcs = np.fromiter(map(_crc32c, self.payload[:n]), dtype="<u4", count=n)  # no wrapper: 1 call per row
        self._crc[:n] = crcs.view(np.uint8).reshape(n, _CRC_BYTES)
        out[n * self.stride :] = raw_index(self.chunks_per_shard, np.flatnonzero(present), self.stride)
        return out


def _put_index(out: np.ndarray, data_end: int, offsets: np.ndarray, nbytes: np.ndarray) -> None:
    index = np.stack([offsets, nbytes], axis=1).view(np.uint8).reshape(-1)
    out[data_end : data_end + index.size] = index
    out[data_end + index.size :] = np.frombuffer(crc32c(index).to_bytes(_CRC_BYTES, "little"), dtype=np.uint8)


@dataclass(frozen=True)
class ShardIndex:
    """Parsed index of one shard file."""

    offsets: np.ndarray
    nbytes: np.ndarray
    present: np.ndarray
    """bool per chunk."""
    stride: int
    """Bytes per chunk when every present chunk has the same size and they sit
    back to back in chunk order from offset 0 (what vlastore writes for raw
    families); 0 otherwise."""

    def chunk_bytes(
        self, buf: np.ndarray | memoryview, chunk: int, compression: str | None, row_nbytes: int | None = None
    ) -> np.ndarray:
        """Payload of one chunk (crc checked, decompressed), as uint8.

        Raises:
            KeyError: the chunk is absent. ChecksumError: outside the buffer, crc
                mismatch, or (with ``row_nbytes``) not one row's size.
        """
        if not self.present[chunk]:
            raise KeyError(chunk)
        off, nb = int(self.offsets[chunk]), int(self.nbytes[chunk])
        whole = np.frombuffer(buf, dtype=np.uint8)
        if nb < _CRC_BYTES or off + nb > whole.size:
            raise ChecksumError(f"chunk {chunk}: index points outside the shard")
        raw = whole[off : off + nb]
        body = raw[:-_CRC_BYTES]
        if not crc_ok(raw):
            raise ChecksumError(f"chunk {chunk}: crc32c mismatch")
        if compression is not None:
            if row_nbytes is None:
                return np.frombuffer(_zstd().decode(body.tobytes()), dtype=np.uint8)
            return zstd_decode_exact(body.tobytes(), row_nbytes)
        if row_nbytes is not None and body.size != row_nbytes:
            raise ChecksumError(f"chunk {chunk}: {body.size} bytes, a row has {row_nbytes}")
        return body


def decode_index(
    tail: bytes | memoryview | np.ndarray, chunks_per_shard: int, data_nbytes: int | None = None
) -> ShardIndex:
    """Parse the index from the last :func:`index_nbytes` bytes of a shard file.

    Args:
        tail: the file's last bytes (at least the index).
        chunks_per_shard: entries of the index.
        data_nbytes: bytes before the index, when known: every present chunk must
            lie inside them (a crafted index cannot point elsewhere).

    Raises:
        ChecksumError: the index bytes fail their crc32c, or point outside the data.
    """
    raw = np.frombuffer(tail, dtype=np.uint8)[-index_nbytes(chunks_per_shard) :]
    if raw.size != index_nbytes(chunks_per_shard):
        raise ChecksumError(f"shard too short for an index of {chunks_per_shard} chunks")
    index = raw[:-_CRC_BYTES]
    if not crc_ok(raw):
        raise ChecksumError("shard index: crc32c mismatch")
    pairs = index.view("<u8").reshape(chunks_per_shard, 2)
    offsets, nbytes = pairs[:, 0].copy(), pairs[:, 1].copy()
    present = offsets != MISSING
    if present.any():
        off, nb = offsets[present], nbytes[present]
        limit = np.uint64(data_nbytes if data_nbytes is not None else 1 << 62)
        # compare without overflow: nb <= limit and off <= limit - nb
        if (nb < _CRC_BYTES).any() or (nb > limit).any() or (off > limit - np.minimum(nb, limit)).any():
            raise ChecksumError("shard index points outside the shard's data")
    stride = 0
    if present.any():
        nb = nbytes[present]
        if (nb == nb[0]).all():
            expected = np.arange(int(present.sum()), dtype=np.uint64) * nb[0]
            if np.array_equal(offsets[present], expected):
                stride = int(nb[0])
    return ShardIndex(offsets=offsets, nbytes=nbytes, present=present, stride=stride)
