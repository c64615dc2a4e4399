"""The storage seam: the contract run against LocalStorage and ZarrStoreStorage, and what only local files do."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from storage_contract import StorageContract

from vlastore.storage import (
    AlreadyExistsError,
    LocalStorage,
    ObjectStorage,
    SeamStore,
    Storage,
    UnsafeFileError,
    VersionMismatchError,
    ZarrStoreStorage,
    open_storage,
)
from vlastore.storage.local import host_tag

ROOT = Path(__file__).resolve().parents[1]


class TestLocalStorageContract(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> LocalStorage:
        return LocalStorage(tmp_path / "root")


class TestDurableLocalStorageContract(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        return LocalStorage(tmp_path / "root").durable()


class TestZarrMemoryStoreContract(StorageContract):
    @pytest.fixture
    def storage(self) -> ZarrStoreStorage:
        return ZarrStoreStorage(zarr.storage.MemoryStore())


# ------------------------------------------------------------------ local files


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_a_fifo_is_refused_and_never_blocks(local: LocalStorage) -> None:
    local.put("a/real", b"x")
    os.mkfifo(local.root / "a" / "pipe")
    for read in (local.get, local.get_versioned, local.open_map, local.open_fd):
        with pytest.raises(UnsafeFileError, match="FIFO"):
            read("a/pipe")  # type: ignore[operator]
    with pytest.raises(UnsafeFileError, match="FIFO"):
        local.get_ranges("a/pipe", [(0, 1)])
    assert local.size("a/pipe") is None and local.local_path("a/pipe") is None
    assert [key for key, _ in local.unsafe_entries()] == ["a/pipe"]


def test_links_are_never_followed_nor_written_through(local: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    local.put("keep", b"1")
    os.symlink(outside / "secret", local.root / "file-link")
    os.symlink(outside, local.root / "dir-link")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        local.get("file-link")
    with pytest.raises(UnsafeFileError, match="outside the store"):
        local.get("dir-link/secret")
    with pytest.raises(UnsafeFileError, match="outside the store"):
        local.put("dir-link/new", b"x")
    with pytest.raises(UnsafeFileError):
        local.delete_prefix("dir-link")
    with pytest.raises(UnsafeFileError, match="root"):
        local.delete_prefix("")
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_bytes() == b"secret"
    assert sorted(k for k, _ in local.list("")) == ["file-link", "keep"]  # listed, never entered: dir-link
    assert {k for k, _ in local.unsafe_entries()} == {"file-link", "dir-link"}


def test_maps_are_private_and_descriptors_read_only(local: LocalStorage) -> None:
    local.put("shard", np.arange(100, dtype=np.uint8))
    view = local.open_map("shard")
    view[:10] = 255  # copy-on-write: this process only
    assert local.get("shard") == bytes(range(100))
    fd = local.open_fd("shard")
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            assert mapped[:3] == bytes([0, 1, 2])
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        local.open_map("absent")
    local.put("empty", b"")
    assert local.open_map("empty").size == 0


def test_compare_and_swap_sees_a_replace_with_the_same_size(local: LocalStorage) -> None:
    local.put("k", b"aaaa")
    _, version = local.get_versioned("k")  # type: ignore[misc]
    local.put("k", b"bbbb")  # another writer: same size, new inode
    with pytest.raises(VersionMismatchError):
        local.put_if_version("k", b"cccc", version)
    assert local.get("k") == b"bbbb"
    assert local.version("k") == local.get_versioned("k")[1]  # type: ignore[index]


def test_put_if_absent_from_processes_one_winner(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from vlastore.storage import AlreadyExistsError, LocalStorage
        s = LocalStorage(sys.argv[1])
        sys.stdin.readline()
        try:
            s.put_if_absent("shard/0", sys.argv[2].encode())
            print("won")
        except AlreadyExistsError:
            print("lost")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "root"), f"writer {i}"],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i in range(3)
    ]
    outs = [p.communicate("go\n", timeout=120)[0].strip() for p in procs]
    assert sorted(outs) == ["lost", "lost", "won"]
    assert LocalStorage(tmp_path / "root").get("shard/0") == f"writer {outs.index('won')}".encode()
    with pytest.raises(AlreadyExistsError):
        LocalStorage(tmp_path / "root").put_if_absent("shard/0", b"late")


def test_cleanup_removes_only_temporaries_of_dead_writers(local: LocalStorage) -> None:
    local.put("g/values/c/0", b"shard")
    folder = local.root / "g" / "values" / "c"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".0.{host_tag()}.{dead.stdout.strip()}.beef.partial"
    live = folder / f".0.{host_tag()}.{os.getpid()}.cafe.partial"
    other = folder / ".1.otherhost.1.cafe.partial"
    for path in (stale, live, other):
        path.write_bytes(b"half")
    assert local.cleanup("g/values/c/0") == 1
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(k for k, _ in local.list("g")) == ["g/values/c/0"]  # temporaries are never listed


def test_a_local_storage_pickles_and_durable_keeps_the_root(local: LocalStorage) -> None:
    import pickle

    local.put("k", b"1")
    copy = pickle.loads(pickle.dumps(local))
    assert copy.get("k") == b"1" and copy.root == local.root
    durable = local.durable()
    assert durable.fsync and durable.root == local.root and durable.durable() is durable


# -------------------------------------------------------------------- opening


def test_open_storage_picks_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path / "a"), LocalStorage)
    assert open_storage(f"file://{tmp_path}/b").location == str(tmp_path / "b")  # type: ignore[union-attr]
    zarr_local = zarr.storage.LocalStore(tmp_path / "c")
    assert isinstance(open_storage(zarr_local), LocalStorage)  # zarr's own local store reads through our checks
    memory = zarr.storage.MemoryStore()
    assert isinstance(open_storage(memory), ZarrStoreStorage)
    given = LocalStorage(tmp_path / "d")
    assert open_storage(given) is given and open_storage(SeamStore(given)) is given
    remote = open_storage("s3://bucket-name/prefix/store.vla", {"endpoint": "http://127.0.0.1:9"})
    assert isinstance(remote, ObjectStorage) and remote.location == "s3://bucket-name/prefix/store.vla"
    with pytest.raises(ValueError, match="storage_options are for s3://"):
        open_storage(tmp_path / "e", {"endpoint": "http://127.0.0.1:9"})
    with pytest.raises(ValueError, match="gs://bucket"):
        open_storage("gs://bucket/store.vla")


def test_zarr_store_storage_round_trips_a_zarr_array() -> None:
    storage = ZarrStoreStorage(zarr.storage.MemoryStore())
    array = zarr.create_array(store=storage.zarr_store(), name="a", shape=(3,), dtype="int32")
    array[:] = [1, 2, 3]
    assert sorted(k for k, _ in storage.list("a")) == ["a/c/0", "a/zarr.json"]
    assert storage.disk_usage("a")[1] == 2
