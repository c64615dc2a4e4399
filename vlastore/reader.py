"""Reading feature rows: memory-mapped shards for local stores, bytes otherwise.

Rows come back as numpy views of the storage dtype (``uint16`` bits for
bfloat16) and as torch tensors of the true dtype through :func:`to_tensor`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .shardcodec import ChecksumError, ShardIndex, crc32c, decode_index, index_nbytes

if TYPE_CHECKING:
    import torch

    from .store import VLAStore

__all__ = ["FeatureReader", "MissingRowError", "to_tensor"]


class MissingRowError(KeyError):
    """A planned row has not been written (its shard is missing or the row was skipped)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def to_tensor(array: np.ndarray, true_dtype: str) -> torch.Tensor:
    """A torch tensor sharing memory with ``array``, reinterpreted as ``true_dtype``."""
    import torch

    if not array.flags.writeable:  # decompressed or fetched bytes: torch wants writable memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    if true_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


class _Shard:
    __slots__ = ("index", "buf")

    def __init__(self, index: ShardIndex, buf: Any) -> None:
        self.index = index
        self.buf = buf


class FeatureReader:
    """Rows of one generation of one family.

    Picklable: a copy (e.g. in a DataLoader worker) reopens shards lazily in its
    own process, so no memory map or file handle crosses a ``fork``/``spawn``.
    """

    def __init__(self, store: VLAStore, family: str, generation: int) -> None:
        self.store = store
        self.family = family
        self.generation = generation
        self.info = store.generation(family, generation)
        self.spec = self.info.spec
        self.layout = store.layout(family, generation)
        self.row_shape = self.spec.row_shape
        self.dtype = self.spec.storage_dtype
        self._shards: dict[int, _Shard] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        self._shards.clear()

    # ------------------------------------------------------------------ shards

    def _shard(self, shard: int) -> _Shard:
        if self._pid != os.getpid():
            self._shards = {}
            self._pid = os.getpid()
        cached = self._shards.get(shard)
        if cached is not None:
            return cached
        key = self.store.shard_key(self.family, shard, self.generation)
        path = self.store.storage.file_path(key)
        buf: Any
        if path is not None:
            # copy-on-write mapping: pages are shared with the page cache, arrays are
            # writable (so torch.from_numpy needs no copy), and a write never reaches the file
            try:
                with open(path, "rb") as f:
                    buf = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
            except (FileNotFoundError, ValueError):  # ValueError: empty file cannot be mapped
                buf = None
        else:
            data = self.store.storage.read_bytes(key)
            buf = None if data is None else np.frombuffer(data, dtype=np.uint8)
        if buf is None:
            raise MissingRowError(
                f"family {self.family!r} generation {self.generation}: shard {shard} is not written "
                f"(rows {self._describe_shard(shard)}); run the writer/ingestion again to finish it"
            )
        try:
            index = decode_index(buf[-index_nbytes(self.layout.rows_per_shard):], self.layout.rows_per_shard)
        except ChecksumError as exc:
            raise ChecksumError(f"{path or key}: {exc}; the shard is corrupt, rewrite it") from None
        entry = _Shard(index, buf)
        self._shards[shard] = entry
        return entry

    def _describe_shard(self, shard: int) -> str:
        rows = self.layout.shard_rows(shard)
        if rows.size == 0:
            return "none"
        return f"{self.describe(int(rows[0]))} .. {self.describe(int(rows[-1]))}"

    def describe(self, row: int) -> str:
        e, item = self.layout.address(row)
        return f"({self.store.catalog.names[e]!r}, {self.spec.index_name}={item})"

    # -------------------------------------------------------------------- rows

    def row(self, row: int) -> np.ndarray:
        """One row as a numpy array of the storage dtype (a view into the mapped shard).

        Raises:
            MissingRowError: not written. ChecksumError: the stored bytes are corrupt.
        """
        if not 0 <= row < self.layout.rows:
            raise IndexError(f"row {row} out of range: family {self.family!r} has {self.layout.rows} rows")
        start = int(self.layout.starts[row])
        length = int(self.layout.lengths[row])
        shard = start // self.layout.rows_per_shard
        first = start - shard * self.layout.rows_per_shard
        entry = self._shard(shard)
        index = entry.index
        if not index.present[first : first + length].all():
            raise MissingRowError(
                f"family {self.family!r}: row {self.describe(row)} was not written (shard {shard} "
                "holds no data for it); it was skipped at ingestion or the writer never got it"
            )
        try:
            if index.stride and self.spec.compression is None:
                data = self._strided(entry, first, length)
            else:
                parts = [index.chunk_bytes(entry.buf, c, self.spec.compression) for c in range(first, first + length)]
                data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        except ChecksumError:
            raise ChecksumError(
                f"family {self.family!r}: row {self.describe(row)} is corrupt (crc32c mismatch in shard "
                f"{shard}); run `vlastore verify` and rewrite the affected rows"
            ) from None
        shape = (length, *self.row_shape) if self.spec.ragged else self.row_shape
        # ragged rows from a raw shard are strided views: token rows with a crc between them
        return data.view(self.dtype).reshape(shape)

    def _strided(self, entry: _Shard, first: int, length: int) -> np.ndarray:
        index = entry.index
        stride = index.stride
        payload = stride - 4
        base = int(index.offsets[first])
        block = np.ndarray((length, stride), dtype=np.uint8, buffer=entry.buf, offset=base, strides=(stride, 1))
        for i in range(length):
            chunk = block[i]
            if crc32c(chunk[:payload]) != int.from_bytes(chunk[payload:].tobytes(), "little"):
                raise ChecksumError("crc32c mismatch")
        if length == 1:
            return block[0, :payload]
        return block[:, :payload]

    def rows(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Several rows (each as :meth:`row`), read in shard order."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        for i in np.argsort(rows, kind="stable").tolist():
            out[i] = self.row(int(rows[i]))
        return out

    def tensor(self, row: int) -> torch.Tensor:
        """One row as a torch tensor of the family's true dtype."""
        return to_tensor(self.row(row), self.spec.dtype)
