"""Where a reader's bytes come from: ranged reads (one request per run of rows), per-shard maps, the arena."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import episodes, fill_family, ragged_rows, random_rows, spec_for
from s3_server import FaultProxy

from vlastore.read.sources import IndexedShard, StridedShard
from vlastore.storage import LocalStorage, Storage, coalesce_ranges
from vlastore.storage.base import Buffer
from vlastore.store import VLAStore


class CountingStorage(Storage):
    """A real storage (local files) seen through the interface an object store offers: every ``get_range`` is one
    request, ``get_ranges`` makes one request per run of touching ranges (as ObjectStorage does). With
    ``maps=True`` it also hands out the inner storage's memory maps (as the node-local cache does)."""

    is_local = False

    def __init__(self, inner: Storage, maps: bool = False) -> None:
        self.inner = inner
        self.location = inner.location
        self.maps = maps
        self.requests: list[tuple[str, int, int | None]] = []

    def get(self, key: str) -> bytes | None:
        self.requests.append((key, 0, None))
        return self.inner.get(key)

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        self.requests.append((key, start, end))
        return self.inner.get_range(key, start, end)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = [b""] * len(ranges)
        for start, end, members in coalesce_ranges(ranges):
            data = self.get_range(key, start, end)
            if data is None:
                raise FileNotFoundError(key)
            for i in members:
                out[i] = data[ranges[i][0] - start : ranges[i][1] - start]
        return out

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def put(self, key: str, data: Buffer) -> None:
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: Buffer) -> None:
        self.inner.put_if_absent(key, data)

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        return self.inner.get_versioned(key)

    def put_if_version(self, key: str, data: Buffer, version: str) -> str:
        return self.inner.put_if_version(key, data, version)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def open_map(self, key: str) -> np.ndarray | None:
        return self.inner.open_map(key) if self.maps else None

    def zarr_store(self) -> Any:
        return self.inner.zarr_store()

    def data_requests(self) -> int:
        """Requests for shard bytes other than the index (a suffix read)."""
        return sum(1 for key, start, _ in self.requests if "/values/c/" in key and start >= 0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``fixed``: 30 rows of [8] float32, 16 rows per shard; ``tokens``: ragged float16 [L, 4] with a 20-token row."""
    path = tmp_path_factory.mktemp("sources") / "s.vla"
    store = VLAStore.create(path, episodes((30, 20, 25, 12)))
    store.add_family("fixed", spec_for("float32", rows_per_shard=16))
    fixed = random_rows((store.layout("fixed").rows, 8), "float32", seed=1)
    fill_family(store, "fixed", fixed)
    lengths = np.full(store.layout("fixed").rows, 3)
    lengths[5] = 20
    store.add_family("tokens", spec_for("float16", ragged=True, rows_per_shard=64, row_shape=(4,)), lengths=lengths)
    tokens = ragged_rows(lengths, (4,), "float16", seed=2)
    fill_family(store, "tokens", tokens)
    return path, {"fixed": fixed, "tokens": tokens}


def test_ranged_reads_make_one_request_per_run_of_rows(built: tuple[Path, dict[str, Any]]) -> None:
    path, values = built
    counting = CountingStorage(LocalStorage(path))
    store = VLAStore.open(counting)
    tokens = store.reader("tokens", verify="always")
    fixed = store.reader("fixed", verify="always")
    counting.requests.clear()  # the metadata read at open
    np.testing.assert_array_equal(tokens.row(0), values["tokens"][0])  # the shard's index: one suffix read
    assert len(counting.requests) == 2 and counting.data_requests() == 1
    counting.requests.clear()
    np.testing.assert_array_equal(tokens.row(5), values["tokens"][5])  # 20 token rows: 20 adjacent chunks
    assert counting.requests and len(counting.requests) == 1
    fixed.row(0)
    counting.requests.clear()
    np.testing.assert_array_equal(fixed.gather(np.arange(2, 12)), values["fixed"][2:12])  # 10 adjacent rows
    assert len(counting.requests) == 1
    counting.requests.clear()
    np.testing.assert_array_equal(fixed.gather([13, 3, 4, 12]), values["fixed"][[13, 3, 4, 12]])  # two runs
    assert len(counting.requests) == 2
    counting.requests.clear()
    got = fixed.gather(np.arange(10, 20))  # two shards: the second one's index, then one run in each
    np.testing.assert_array_equal(got, values["fixed"][10:20])
    assert len(counting.requests) == 3 and counting.data_requests() == 2
    assert all(isinstance(s, IndexedShard) for s in fixed._shards.values())
    counting.requests.clear()
    padded, lengths = tokens.gather_padded([5, 6, 7])  # three adjacent ragged rows: one run
    assert len(counting.requests) == 1 and lengths.tolist() == [20, 3, 3]
    np.testing.assert_array_equal(padded[0], values["tokens"][5])


def test_a_storage_that_maps_is_read_through_maps(built: tuple[Path, dict[str, Any]]) -> None:
    path, values = built
    counting = CountingStorage(LocalStorage(path), maps=True)  # e.g. the node-local cache of an object store
    store = VLAStore.open(counting)
    fixed, tokens = store.reader("fixed"), store.reader("tokens")
    counting.requests.clear()  # the metadata read at open
    np.testing.assert_array_equal(fixed.gather(np.arange(30)), values["fixed"])
    for row in (0, 5, 29):
        np.testing.assert_array_equal(tokens.row(row), values["tokens"][row])
    assert counting.requests == []  # every byte came through the maps
    assert all(isinstance(s, StridedShard) for s in [*fixed._shards.values(), *tokens._shards.values()])
    assert fixed._arena is None  # no descriptors to map side by side: one map per shard


def test_a_store_on_s3_is_written_and_read_with_one_request_per_run(
    moto_s3: Any, s3_url: str, s3_proxy: FaultProxy, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    from vlastore.storage import CachedStorage, ObjectStorage

    store = VLAStore.create(s3_url, episodes((30, 20)), storage_options=proxy_options)
    store.add_family("fixed", spec_for("bfloat16", rows_per_shard=16))
    values = random_rows((store.layout("fixed").rows, 8), "bfloat16", seed=3)
    fill_family(store, "fixed", values)
    again = VLAStore.open(s3_url, storage_options=proxy_options)
    reader = again.reader("fixed")
    reader.row(0)
    s3_proxy.reset()
    np.testing.assert_array_equal(reader.gather(np.arange(3, 13)), values[3:13])
    assert len(s3_proxy.requests("GET", "/values/c/")) == 1
    cached = VLAStore.open(CachedStorage(ObjectStorage(s3_url, proxy_options), tmp_path / "cache", 1 << 30))
    np.testing.assert_array_equal(cached.reader("fixed").gather(np.arange(17)), values)
    assert all(isinstance(s, StridedShard) for s in cached.reader("fixed")._shards.values())
