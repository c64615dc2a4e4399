"""CachedStorage: the node-local shard cache, with real processes, a real S3 server and a real tmpfs."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from s3_server import FaultProxy
from storage_contract import StorageContract

if TYPE_CHECKING:
    from s3_server import FaultProxy

pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")

from vlastore.shardcodec import ChecksumError, crc32c  # noqa: E402
from vlastore.storage import CachedStorage, CacheFullError, ObjectStorage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD = 200_000


def shard_bytes(seed: int, n: int = SHARD) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def child(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def cached_files(cache: CachedStorage, sub: str = "objects") -> list[Path]:
    return sorted((cache.root / sub).iterdir())


@pytest.fixture
def remote(s3_url: str, proxy_options: dict[str, str]) -> ObjectStorage:
    """Object storage reached through the counting proxy."""
    return ObjectStorage(s3_url, proxy_options)


class TestCachedStorageContract(StorageContract):
    @pytest.fixture
    def storage(self, s3_url: str, s3_options: dict[str, str], tmp_path: Path) -> CachedStorage:
        return CachedStorage(ObjectStorage(s3_url, s3_options), tmp_path / "cache", 1 << 30)


# ------------------------------------------------------------- basic serving


def test_open_map_downloads_once_then_serves_locally(
    remote: ObjectStorage, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = shard_bytes(0)
    remote.put("features/f/gen-0001/values/c/0", data)
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    s3_proxy.reset()
    first = cache.open_map("features/f/gen-0001/values/c/0")
    assert first is not None and first.dtype == np.uint8 and first.tobytes() == data
    again = cache.open_map("features/f/gen-0001/values/c/0")
    assert again is not None and again.tobytes() == data
    assert cache.get_range("features/f/gen-0001/values/c/0", -10) == data[-10:]  # the index read, locally
    assert cache.get_ranges("features/f/gen-0001/values/c/0", [(5, 9), (0, 3)]) == [data[5:9], data[:3]]
    assert [r.method for r in s3_proxy.log] == ["GET"]  # cold: the GET's headers name the version, no HEAD
    s3_proxy.reset()
    later = CachedStorage(remote, tmp_path / "cache", 1 << 30)  # another process of the node, later
    assert later.open_map("features/f/gen-0001/values/c/0").tobytes() == data  # type: ignore[union-attr]
    assert [r.method for r in s3_proxy.log] == ["HEAD"]  # is the copy still the current version?
    first[:4] = 0  # a private map: writing to it never reaches the cached file
    path = cache.local_path("features/f/gen-0001/values/c/0")
    assert path is not None and path.read_bytes() == data


def test_metadata_is_never_cached(remote: ObjectStorage, tmp_path: Path) -> None:
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    cache.put("zarr.json", b'{"v": 1}')
    assert cache.get("zarr.json") == b'{"v": 1}'
    remote.put("zarr.json", b'{"v": 2}')  # another process commits
    assert cache.get("zarr.json") == b'{"v": 2}'
    assert cached_files(cache) == []


def test_rewritten_object_is_not_served_stale(
    remote: ObjectStorage, s3_url: str, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    remote.put("shard", b"version one")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    assert cache.open_map("shard").tobytes() == b"version one"  # type: ignore[union-attr]
    remote.put("shard", b"version two!")  # the store was rebuilt at the same URL
    fresh = CachedStorage(ObjectStorage(s3_url, proxy_options), tmp_path / "cache", 1 << 30)  # a later process
    assert fresh.open_map("shard").tobytes() == b"version two!"  # type: ignore[union-attr]
    cache.forget()
    assert cache.open_map("shard").tobytes() == b"version two!"  # type: ignore[union-attr]


def test_missing_object(remote: ObjectStorage, tmp_path: Path) -> None:
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    with pytest.raises(FileNotFoundError, match="no such object"):
        cache.open_map("nope")


# ------------------------------------------------------------ verification


def test_verify_rejects_a_corrupt_download(remote: ObjectStorage, tmp_path: Path) -> None:
    data = shard_bytes(1)
    remote.put("shard", data)
    seen: list[tuple[str, int]] = []

    def verify(key: str, array: np.ndarray) -> None:
        seen.append((key, crc32c(array)))
        raise ChecksumError("chunk 3 of shard: stored crc32c 0x1234 does not match")

    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30, verify=verify)
    with pytest.raises(ChecksumError, match="chunk 3") as info:
        cache.open_map("shard")
    assert "the copy was discarded" in "".join(info.value.__notes__)
    assert seen == [("shard", crc32c(data))]
    assert cached_files(cache) == [] and cached_files(cache, "tmp") == []
    ok = CachedStorage(remote, tmp_path / "cache", 1 << 30, verify=lambda key, array: None)
    assert ok.open_map("shard").tobytes() == data  # type: ignore[union-attr]


def test_damaged_bytes_in_flight_never_reach_the_cache(
    remote: ObjectStorage, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = shard_bytes(2)
    remote.put("shard", data)
    s3_proxy.reset()
    s3_proxy.inject(["lie", "short", "500"], method="GET")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    assert cache.open_map("shard").tobytes() == data  # type: ignore[union-attr]
    assert [r.fault for r in s3_proxy.requests("GET")] == ["lie", "short", "500", None]


# ------------------------------------------------------- many processes

DOWNLOAD = """
import sys, time
from vlastore.storage import CachedStorage, ObjectStorage
from vlastore.shardcodec import crc32c
url, endpoint, cache_dir, key, start = sys.argv[1:6]
remote = ObjectStorage(url, {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing"})
cache = CachedStorage(remote, cache_dir, 1 << 30)
time.sleep(max(0.0, float(start) - time.time()))
print("start", flush=True)
mapped = cache.open_map(key)
print(crc32c(mapped), flush=True)
if len(sys.argv) > 6:
    sys.stdin.readline()  # hold the map (and its pin) until told
    print(crc32c(mapped), flush=True)
"""


def test_four_processes_download_a_shard_once(
    remote: ObjectStorage, s3_proxy: FaultProxy, s3_url: str, tmp_path: Path
) -> None:
    data = shard_bytes(3)
    remote.put("shard", data)
    s3_proxy.reset()
    s3_proxy.slow_s = 2.0
    s3_proxy.inject(["slow"], method="GET", key_contains="shard")  # the first download lasts while the rest start
    procs = [child(DOWNLOAD, s3_url, s3_proxy.endpoint, str(tmp_path / "cache"), "shard", "0") for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert {out.split()[-1] for out, _ in outs} == {str(crc32c(data))}
    assert len(s3_proxy.requests("GET", key_contains="shard")) == 1


def test_killed_download_leaves_nothing_half_written(
    remote: ObjectStorage, s3_proxy: FaultProxy, s3_url: str, tmp_path: Path
) -> None:
    data = shard_bytes(4, 2 << 20)
    remote.put("shard", data)
    s3_proxy.slow_s = 60.0  # the download stalls halfway: long enough to kill it there
    s3_proxy.inject(["slow"], method="GET", key_contains="shard")
    proc = child(DOWNLOAD, s3_url, s3_proxy.endpoint, str(tmp_path / "cache"), "shard", "0")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the body is flowing into the temp file
        if any(r.fault == "slow" for r in s3_proxy.requests("GET")) and cached_files(cache, "tmp"):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert cached_files(cache) == []  # nothing in place: no process can map half a shard
    assert len(cached_files(cache, "tmp")) == 1
    mapped = cache.open_map("shard")  # the lock died with its holder: this process downloads
    assert mapped is not None and mapped.tobytes() == data
    assert cached_files(cache, "tmp") == []  # the dead download's temp file was cleaned up


# ---------------------------------------------------------------- eviction


def test_lru_eviction_never_removes_a_mapped_file(
    remote: ObjectStorage, s3_url: str, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    shards = {f"s{i}": shard_bytes(10 + i) for i in range(5)}
    for key, data in shards.items():
        remote.put(key, data)
    cache_dir = tmp_path / "cache"
    holder = child(DOWNLOAD, s3_url, s3_proxy.endpoint, str(cache_dir), "s0", "0", "hold")  # another process pins s0
    assert holder.stdout is not None and holder.stdout.readline() == "start\n"
    assert holder.stdout.readline().strip() == str(crc32c(shards["s0"]))
    cache = CachedStorage(remote, cache_dir, 3 * SHARD + 20_000)  # room for three shards (whole blocks)
    mine = cache.open_map("s1")  # pinned by this process
    for key in ("s2", "s3", "s4"):  # each needs room: the least recently used unpinned shard goes
        mapped = cache.open_map(key)
        assert mapped is not None and mapped.tobytes() == shards[key]
        del mapped
        gc.collect()
        time.sleep(0.02)  # distinct last-use times
    remaining = {p.name.split("-")[0] for p in cached_files(cache)}
    assert len(remaining) == 3
    assert cache._object_path("s0", cache._entry("s0")).exists()  # type: ignore[arg-type]
    assert cache._object_path("s1", cache._entry("s1")).exists()  # type: ignore[arg-type]
    assert cache._object_path("s4", cache._entry("s4")).exists()  # type: ignore[arg-type]
    assert mine is not None and mine.tobytes() == shards["s1"]
    out, err = holder.communicate("\n", timeout=60)
    assert holder.returncode == 0, err
    assert out.split()[-1] == str(crc32c(shards["s0"]))


def test_full_cache_falls_back_or_says_so(remote: ObjectStorage, tmp_path: Path) -> None:
    for i in range(3):
        remote.put(f"s{i}", shard_bytes(20 + i))
    cache = CachedStorage(remote, tmp_path / "cache", 2 * SHARD + 20_000)
    held = [cache.open_map("s0"), cache.open_map("s1")]  # everything evictable is pinned
    assert cache.open_map("s2") is None  # on_full="ranged": the reader uses ranged reads
    assert cache.get_range("s2", 10, 20) == shard_bytes(22)[10:20]
    strict = CachedStorage(remote, tmp_path / "cache", 2 * SHARD + 20_000, on_full="error")
    with pytest.raises(CacheFullError, match="has no room for .*s2: everything in it is in use"):
        strict.open_map("s2")
    del held
    gc.collect()
    assert strict.open_map("s2").tobytes() == shard_bytes(22)  # type: ignore[union-attr]


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_gives_a_fallback_or_a_clear_error(remote: ObjectStorage, tmp_path: Path) -> None:
    for i in range(3):
        remote.put(f"s{i}", shard_bytes(30 + i, 400_000))
    with tiny_tmpfs(tmp_path / "small", "1m") as folder:
        cache = CachedStorage(remote, folder / "cache", 10 << 30)  # the limit is far away; the disk is not
        held = [cache.open_map("s0"), cache.open_map("s1")]
        assert cache.open_map("s2") is None
        strict = CachedStorage(remote, folder / "cache", 10 << 30, on_full="error")
        with pytest.raises(CacheFullError, match="the disk is full"):
            strict.open_map("s2")
        assert cached_files(cache, "tmp") == []
        assert [m.tobytes() for m in held] == [shard_bytes(30, 400_000), shard_bytes(31, 400_000)]  # type: ignore
        del held
        gc.collect()
        assert strict.open_map("s2").tobytes() == shard_bytes(32, 400_000)  # type: ignore[union-attr]


# ---------------------------------------------------------------- prefetch


def test_prefetch_downloads_in_the_background(remote: ObjectStorage, s3_proxy: FaultProxy, tmp_path: Path) -> None:
    keys = [f"p{i}" for i in range(4)]
    for i, key in enumerate(keys):
        remote.put(key, shard_bytes(40 + i))
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30, prefetch_threads=2)
    s3_proxy.reset()
    futures = cache.prefetch(keys)
    assert [f.result(timeout=60) for f in futures] == [True] * 4
    gets = len(s3_proxy.requests("GET"))
    assert gets == 4
    for i, key in enumerate(keys):
        assert cache.open_map(key).tobytes() == shard_bytes(40 + i)  # type: ignore[union-attr]
    assert len(s3_proxy.requests("GET")) == gets  # all served from the cache
    cache.close()


def test_forked_child_uses_the_cache(remote: ObjectStorage, tmp_path: Path) -> None:
    remote.put("a", b"parent shard")
    remote.put("b", b"child shard")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    cache.prefetch(["a"])[0].result(timeout=60)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through its exit code
        code = 1
        try:
            signal.alarm(30)
            ok = cache.open_map("b").tobytes() == b"child shard"  # type: ignore[union-attr]
            ok = ok and cache.prefetch(["a"])[0].result(timeout=20) is True
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_files_of_an_earlier_boot_are_dropped(remote: ObjectStorage, tmp_path: Path) -> None:
    remote.put("a", b"shard")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    cache.open_map("a")
    (cache.root / "boot_id").write_text(f"{uuid.uuid4()}\n")  # as after a machine crash
    again = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    assert cached_files(again) == []
    assert again.open_map("a").tobytes() == b"shard"  # type: ignore[union-attr]


def test_a_symlink_in_the_cache_is_refused(remote: ObjectStorage, tmp_path: Path) -> None:
    remote.put("a", b"shard")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    target = cache._object_path("a", cache._entry("a"))  # type: ignore[arg-type]
    (tmp_path / "elsewhere").write_bytes(b"shard")
    target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        cache.open_map("a")


def test_cut_body_with_matching_length_is_caught_without_a_stored_crc(
    remote: ObjectStorage, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """An object written by another tool (no crc32c in its metadata) behind a middlebox that cuts bodies."""
    data = shard_bytes(5)
    remote._client.put_object(Bucket=remote.bucket, Key=remote._full("foreign"), Body=data)
    s3_proxy.reset()
    s3_proxy.inject(["lie"], method="GET")
    cache = CachedStorage(remote, tmp_path / "cache", 1 << 30)
    assert cache.open_map("foreign").tobytes() == data  # type: ignore[union-attr]
    assert [r.fault for r in s3_proxy.requests("GET")] == ["lie", None]
