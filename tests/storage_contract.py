"""The storage seam's contract, written once over a ``storage`` fixture.

A test module subclasses :class:`StorageContract` as ``TestXxxContract`` and
provides a ``storage`` fixture returning an empty Storage (zarr-python's
``StoreTests`` pattern). tests/test_remote_objects.py runs it against
ObjectStorage on moto and tests/test_remote_cache.py against CachedStorage; a
LocalStorage test module can reuse it the same way.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlastore.storage import AlreadyExistsError, Storage, VersionMismatchError

__all__ = ["StorageContract"]

PAYLOAD = bytes(range(256)) * 4  # 1 KiB with every byte value


class StorageContract:
    """Behaviour every Storage must have. Subclasses provide the ``storage`` fixture."""

    # ------------------------------------------------------------------ reads

    def test_absent_objects(self, storage: Storage) -> None:
        assert storage.get("missing/key") is None
        assert storage.get_range("missing/key", 0, 10) is None
        assert storage.get_versioned("missing/key") is None
        assert storage.size("missing/key") is None
        with pytest.raises(FileNotFoundError):
            storage.get_ranges("missing/key", [(0, 1)])

    def test_put_get_round_trip(self, storage: Storage) -> None:
        kinds = {
            "empty": b"",
            "one": b"x",
            "bytes": PAYLOAD,
            "bytearray": bytearray(PAYLOAD),
            "memoryview": memoryview(PAYLOAD),
            "uint8": np.frombuffer(PAYLOAD, dtype=np.uint8),
            "float32": np.arange(64, dtype=np.float32),
        }
        for name, data in kinds.items():
            storage.put(f"a/{name}.bin", data)  # type: ignore[arg-type]
        for name, data in kinds.items():
            expected = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)  # type: ignore[arg-type]
            assert storage.get(f"a/{name}.bin") == expected, name
            assert storage.size(f"a/{name}.bin") == len(expected), name

    def test_get_range(self, storage: Storage) -> None:
        storage.put("obj", PAYLOAD)
        cases = [
            (0, 10, PAYLOAD[:10]),
            (100, 356, PAYLOAD[100:356]),
            (1000, 5000, PAYLOAD[1000:]),
            (1024, 2000, b""),
            (5000, None, b""),
            (17, None, PAYLOAD[17:]),
            (-10, None, PAYLOAD[-10:]),
            (-5000, None, PAYLOAD),
            (10, 10, b""),
            (10, 5, b""),
        ]
        for start, end, expected in cases:
            assert storage.get_range("obj", start, end) == expected, (start, end)

    def test_get_ranges_keeps_order_and_overlaps(self, storage: Storage) -> None:
        storage.put("obj", PAYLOAD)
        ranges = [(500, 600), (0, 10), (10, 20), (5, 15), (700, 700), (1000, 1024), (900, 1100)]
        assert storage.get_ranges("obj", ranges) == [PAYLOAD[a:b] for a, b in ranges]
        assert storage.get_ranges("obj", []) == []

    @settings(  # one contract run by many storage classes: differing executors are the point
        max_examples=10,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(ranges=st.lists(st.tuples(st.integers(0, 1100), st.integers(0, 300)), max_size=12))
    def test_get_ranges_match_slicing(self, storage: Storage, ranges: list[tuple[int, int]]) -> None:
        storage.put("prop", PAYLOAD)
        spans = [(a, a + n) for a, n in ranges]
        assert storage.get_ranges("prop", spans) == [PAYLOAD[a:b] for a, b in spans]

    @settings(  # write paths against a dict model: whatever the order of writes, reads agree with it
        max_examples=8,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(
        ops=st.lists(
            st.tuples(
                st.sampled_from(["put", "put_if_absent", "cas", "stale_cas", "delete"]),
                st.sampled_from(["k0", "k1", "d/k2"]),
                st.binary(max_size=40),
            ),
            max_size=10,
        )
    )
    def test_writes_match_a_model(self, storage: Storage, ops: list[tuple[str, str, bytes]]) -> None:
        storage.delete_prefix("model")
        model: dict[str, bytes] = {}
        for op, name, data in ops:
            key = f"model/{name}"
            if op == "put":
                storage.put(key, data)
                model[key] = data
            elif op == "put_if_absent":
                if key in model:
                    with pytest.raises(AlreadyExistsError):
                        storage.put_if_absent(key, data)
                else:
                    storage.put_if_absent(key, data)
                    model[key] = data
            elif op in ("cas", "stale_cas"):
                found = storage.get_versioned(key)
                if found is None:
                    assert key not in model
                    continue
                assert found[0] == model[key]
                if op == "stale_cas":
                    storage.put(key, model[key] + b"!")  # another writer gets in between
                    model[key] += b"!"
                    with pytest.raises(VersionMismatchError):
                        storage.put_if_version(key, data, found[1])
                else:
                    storage.put_if_version(key, data, found[1])
                    model[key] = data
            else:
                storage.delete(key)
                model.pop(key, None)
        assert dict(storage.list("model")) == {k: len(v) for k, v in model.items()}
        for key, data in model.items():
            assert storage.get(key) == data

    def test_list(self, storage: Storage) -> None:
        for key in ("a/x", "a/y/z", "ab/x", "c"):
            storage.put(key, key.encode())
        assert sorted(storage.list("")) == [("a/x", 3), ("a/y/z", 5), ("ab/x", 4), ("c", 1)]
        assert sorted(storage.list("a")) == [("a/x", 3), ("a/y/z", 5)]  # a folder, not a string prefix
        assert sorted(storage.list("a/")) == [("a/x", 3), ("a/y/z", 5)]
        assert list(storage.list("nothing")) == []

    # ----------------------------------------------------------------- writes

    def test_put_replaces(self, storage: Storage) -> None:
        storage.put("k", b"old")
        storage.put("k", b"new value")
        assert storage.get("k") == b"new value"

    def test_put_if_absent(self, storage: Storage) -> None:
        storage.put_if_absent("shard/0", b"first")
        with pytest.raises(AlreadyExistsError):
            storage.put_if_absent("shard/0", b"second")
        assert storage.get("shard/0") == b"first"

    def test_put_if_absent_threads_one_winner(self, storage: Storage) -> None:
        wins: list[int] = []
        losses: list[int] = []
        barrier = threading.Barrier(4)

        def writer(i: int) -> None:
            barrier.wait()
            try:
                storage.put_if_absent("race", str(i).encode())
                wins.append(i)
            except AlreadyExistsError:
                losses.append(i)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == 3
        assert storage.get("race") == str(wins[0]).encode()

    def test_compare_and_swap(self, storage: Storage) -> None:
        storage.put("manifest", b"v1")
        found = storage.get_versioned("manifest")
        assert found is not None and found[0] == b"v1"
        version = found[1]
        new_version = storage.put_if_version("manifest", b"v2", version)
        assert new_version != version
        with pytest.raises(VersionMismatchError):
            storage.put_if_version("manifest", b"v3", version)  # stale: another writer got there
        assert storage.get_versioned("manifest") == (b"v2", new_version)
        storage.delete("manifest")
        with pytest.raises(VersionMismatchError):
            storage.put_if_version("manifest", b"v4", new_version)  # gone

    def test_delete(self, storage: Storage) -> None:
        storage.put("k", b"1")
        storage.delete("k")
        storage.delete("k")  # missing is fine
        assert storage.get("k") is None

    def test_delete_prefix(self, storage: Storage) -> None:
        for key in ("gen-0001/a", "gen-0001/b/c", "gen-00010/a", "keep"):
            storage.put(key, b"1")
        storage.delete_prefix("gen-0001")
        assert sorted(k for k, _ in storage.list("")) == ["gen-00010/a", "keep"]

    def test_bad_keys_are_refused(self, storage: Storage) -> None:
        for key in ["", "/abs", "a//b", "../up", "a/../b", "a/./b", "trailing/", "back\\slash"]:
            with pytest.raises(ValueError):
                storage.get(key)
            with pytest.raises(ValueError):
                storage.put(key, b"x")

    # ------------------------------------------------------------------- zarr

    def test_zarr_python_reads_and_writes(self, storage: Storage) -> None:
        values = np.arange(60, dtype=np.int32).reshape(6, 10)
        array = zarr.create_array(
            store=storage.zarr_store(), name="small", shape=values.shape, chunks=(4, 10), dtype=values.dtype
        )
        array[...] = values
        again = zarr.open_array(store=storage.zarr_store(), path="small", mode="r")
        np.testing.assert_array_equal(again[...], values)
        assert storage.get("small/zarr.json") is not None  # the same bytes under the same root
