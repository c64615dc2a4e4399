"""Training from an s3:// store (moto on loopback) through the node-local shard cache.

Batches equal those of the same store on local disk; each shard is downloaded once per node however
many DataLoader workers read it (requests counted at the proxy); a damaged download is never served; a
cache without room reads with ranged requests or says so; prefetch fetches what the sampler asks next.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import build_full_store
from s3_server import FaultProxy

pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")

from vlastore.dataset import VLADataset, collate  # noqa: E402
from vlastore.shardcodec import ChecksumError  # noqa: E402
from vlastore.storage import CachedStorage, CacheFullError, ObjectStorage  # noqa: E402
from vlastore.storage.settings import CACHE_ENV  # noqa: E402

FEATURES = ["fixed", "tokens", "packed"]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("local") / "store.vla"
    build_full_store(path)
    return path


def upload(folder: Path, url: str, options: dict[str, str]) -> list[str]:
    """Copy a local store to ``url`` file by file; returns the shard keys."""
    remote = ObjectStorage(url, options)
    shards = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = path.relative_to(folder).as_posix()
            remote.put(key, path.read_bytes())
            if "/values/c/" in key:
                shards.append(key)
    return shards


@pytest.fixture
def remote_store(local_store: Path, s3_url: str, proxy_options: dict[str, str], s3_proxy: FaultProxy) -> list[str]:
    shards = upload(local_store, s3_url, proxy_options)
    s3_proxy.reset()
    return shards


def batches(ds: VLADataset, **kwargs: object) -> list[dict]:
    return list(ds.dataloader(batch_size=5, shuffle=False, **kwargs))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == y[key].dtype and torch.equal(value, y[key]), key
            else:
                assert value == y[key], key


def shard_gets(proxy: FaultProxy, shards: list[str]) -> dict[str, int]:
    """Downloads of each shard: GETs of the whole object (not the few bytes of an index read, ``bytes=-N``)."""
    counts = dict.fromkeys(shards, 0)
    for record in proxy.requests("GET"):
        if record.range is not None and record.range.startswith("bytes=-"):
            continue
        for key in shards:
            if record.key.endswith(key):
                counts[key] += 1
    return counts


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_batches_from_s3_equal_local_and_each_shard_is_downloaded_once(
    local_store: Path,
    remote_store: list[str],
    s3_url: str,
    proxy_options: dict[str, str],
    s3_proxy: FaultProxy,
    tmp_path: Path,
    context: str,
) -> None:
    local = batches(VLADataset(local_store, features=FEATURES))
    ds = VLADataset(s3_url, features=FEATURES, storage_options=proxy_options, cache_dir=tmp_path / "cache")
    assert isinstance(ds.store.storage, CachedStorage)
    s3_proxy.reset()
    got = batches(ds, num_workers=2, multiprocessing_context=context, persistent_workers=False)
    assert_same(local, got)
    counts = shard_gets(s3_proxy, remote_store)
    assert set(counts.values()) == {1}, counts  # every shard read, each downloaded once for the node
    if context == "spawn":
        return  # the rest does not depend on how workers start (and spawn costs seconds per worker)
    # a second epoch, and another process of the node later: nothing is downloaded again
    s3_proxy.reset()
    assert_same(local, batches(ds, num_workers=2, multiprocessing_context=context))
    again = VLADataset(s3_url, features=FEATURES, storage_options=proxy_options, cache_dir=tmp_path / "cache")
    assert_same(local, batches(again))
    assert set(shard_gets(s3_proxy, remote_store).values()) == {0}


def test_cache_folder_from_the_environment(
    local_store: Path,
    remote_store: list[str],
    s3_url: str,
    proxy_options: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    ds = VLADataset(s3_url, features=FEATURES, storage_options=proxy_options)
    assert isinstance(ds.store.storage, CachedStorage)
    assert_same(batches(VLADataset(local_store, features=FEATURES)), batches(ds))
    assert len(list((tmp_path / "env-cache").rglob("objects/*"))) == len(remote_store)


def test_without_a_cache_rows_are_ranged_reads(
    local_store: Path, remote_store: list[str], s3_url: str, proxy_options: dict[str, str], s3_proxy: FaultProxy
) -> None:
    ds = VLADataset(s3_url, features=FEATURES, storage_options=proxy_options)
    assert isinstance(ds.store.storage, ObjectStorage)
    assert_same(batches(VLADataset(local_store, features=FEATURES)), batches(ds))
    assert all(r.range is not None for r in s3_proxy.requests("GET") if "/values/c/" in r.key)


def test_faulty_downloads_are_retried_to_the_right_values(
    local_store: Path,
    remote_store: list[str],
    s3_url: str,
    proxy_options: dict[str, str],
    s3_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    s3_proxy.inject(["short", "lie", "reset_after", "500"], method="GET", key_contains="/values/c/")
    ds = VLADataset(s3_url, features=FEATURES, storage_options=proxy_options, cache_dir=tmp_path / "cache")
    assert_same(batches(VLADataset(local_store, features=FEATURES)), batches(ds))
    assert any(r.fault for r in s3_proxy.log)


def test_a_damaged_shard_is_refused_on_arrival_and_never_cached(
    local_store: Path, remote_store: list[str], s3_url: str, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    """A shard whose object is intact for S3 (its own crc32c matches) but whose chunk is corrupt."""
    remote = ObjectStorage(s3_url, proxy_options)
    key = next(k for k in remote_store if k.startswith("features/fixed/"))
    data = bytearray(remote.get(key) or b"")
    data[3] ^= 0x10  # inside the first row's payload
    remote.put(key, bytes(data))
    ds = VLADataset(
        s3_url, features=["fixed"], storage_options=proxy_options, cache_dir=tmp_path / "cache", verify="never"
    )  # even a reader that checks nothing gets no wrong value
    with pytest.raises(ChecksumError, match="crc32c"):
        batches(ds)
    cache = ds.store.storage
    assert isinstance(cache, CachedStorage)
    assert len(list((cache.root / "objects").iterdir())) < len([k for k in remote_store if "fixed" in k])
    cache.close()  # prefetches of the next shards may still be downloading: they finish first
    assert not list((cache.root / "tmp").iterdir())


def test_a_cache_without_room_reads_ranged_or_says_so(
    local_store: Path, remote_store: list[str], s3_url: str, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    local = batches(VLADataset(local_store, features=FEATURES))
    tiny = {**proxy_options, "cache_max_bytes": "64"}  # smaller than any shard
    ds = VLADataset(s3_url, features=FEATURES, storage_options=tiny, cache_dir=tmp_path / "a")
    assert_same(local, batches(ds))  # every shard read with ranged requests instead
    strict = {**tiny, "cache_on_full": "error"}
    ds = VLADataset(s3_url, features=FEATURES, storage_options=strict, cache_dir=tmp_path / "b")
    with pytest.raises(CacheFullError, match="cache_max_bytes|max_bytes"):
        batches(ds)


def test_prefetch_downloads_the_shards_the_sampler_asks_next(
    local_store: Path,
    remote_store: list[str],
    s3_url: str,
    proxy_options: dict[str, str],
    s3_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    ds = VLADataset(s3_url, features=["fixed"], storage_options=proxy_options, cache_dir=tmp_path / "cache")
    cache = ds.store.storage
    assert isinstance(cache, CachedStorage)
    assert ds.prefetch([0]) == 1  # the one shard sample 0 reads
    cache.close()  # waits for the background download
    fixed = [k for k in remote_store if k.startswith("features/fixed/")]
    assert len(list((cache.root / "objects").iterdir())) == 1
    assert ds.prefetch(range(len(ds))) == len(fixed)
    cache.close()
    assert len(list((cache.root / "objects").iterdir())) == len(fixed)
    s3_proxy.reset()
    batches(ds)  # everything is local now
    assert not [r for r in s3_proxy.requests("GET") if "/values/c/" in r.key]


def test_the_loader_prefetches_ahead_of_the_batches(
    local_store: Path, remote_store: list[str], s3_url: str, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    ds = VLADataset(s3_url, features=["fixed"], storage_options=proxy_options, cache_dir=tmp_path / "cache")
    loader = ds.dataloader(batch_size=2, shuffle=True, prefetch_batches=100)
    first = next(iter(loader))  # the sampler's whole epoch was read ahead and handed to prefetch
    ds.store.storage.close()  # type: ignore[attr-defined]
    fixed = [k for k in remote_store if k.startswith("features/fixed/")]
    assert len(list((ds.store.storage.root / "objects").iterdir())) == len(fixed)  # type: ignore[attr-defined]
    assert first["fixed"].shape == (2, 8)
    local = VLADataset(local_store, features=["fixed"])
    for indices in ([0, 1], [5, 7, 3]):
        assert torch.equal(collate(ds.__getitems__(indices))["fixed"], collate(local.__getitems__(indices))["fixed"])


def test_shards_in_the_readers_arena_stay_pinned_until_released(
    remote_store: list[str], s3_url: str, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    """The arena maps a descriptor and closes it: the cache keeps its own pin, so eviction spares the file."""
    remote = ObjectStorage(s3_url, proxy_options)
    a, b, c = [k for k in remote_store if k.startswith("features/fixed/")][:3]
    room = 2 * max(remote.size(k) or 0 for k in (a, b, c)) + 2 * 4096  # two shards (whole blocks)
    cache = CachedStorage(remote, tmp_path / "cache", room, on_full="ranged")
    fd = cache.open_fd(a)
    assert fd is not None
    os.close(fd)  # as ArenaSource does once the shard is mapped
    fd = cache.open_fd(b)
    assert fd is not None
    os.close(fd)
    assert cache.open_fd(c) is None  # no room: both cached shards are pinned, nothing is evicted
    assert len(list((cache.root / "objects").iterdir())) == 2
    cache.unpin()
    fd = cache.open_fd(c)  # now the least recently used one gives way
    assert fd is not None
    assert os.pread(fd, 16, 0) == (remote.get(c) or b"")[:16]
    os.close(fd)
    assert len(list((cache.root / "objects").iterdir())) == 2


@pytest.mark.parametrize("how", ["resumable", "distributed", "batch_sampler"])
def test_every_sampler_path_prefetches_ahead_of_the_workers(
    local_store: Path,
    remote_store: list[str],
    s3_url: str,
    proxy_options: dict[str, str],
    tmp_path: Path,
    how: str,
) -> None:
    """The resumable sampler, a DistributedSampler and a batch sampler of one's own all hand the shards of the
    batches ahead to the cache's prefetch (in the training process), while a real worker reads one batch."""
    from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

    ds = VLADataset(s3_url, features=["fixed"], storage_options=proxy_options, cache_dir=tmp_path / "cache")
    one_worker = {"num_workers": 1, "prefetch_factor": 1, "multiprocessing_context": "fork", "prefetch_batches": 100}
    if how == "resumable":
        loader = ds.dataloader(batch_size=1, resumable=True, shuffle=False, **one_worker)
        local = VLADataset(local_store, features=["fixed"]).dataloader(batch_size=1, resumable=True, shuffle=False)
    elif how == "distributed":
        sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
        loader = ds.dataloader(batch_size=1, sampler=sampler, **one_worker)
        local = VLADataset(local_store, features=["fixed"]).dataloader(batch_size=1, sampler=sampler)
    else:
        own = BatchSampler(SequentialSampler(range(len(ds))), 1, drop_last=False)
        loader = ds.dataloader(batch_sampler=own, **one_worker)
        local = VLADataset(local_store, features=["fixed"]).dataloader(batch_sampler=own)
    it = iter(loader)
    first = next(it)  # the worker has read at most two batches of one sample (one shard)
    ds.store.storage.close()  # type: ignore[attr-defined]  # waits for the downloads under way
    fixed = [k for k in remote_store if k.startswith("features/fixed/")]
    assert len(list((ds.store.storage.root / "objects").iterdir())) == len(fixed)  # type: ignore[attr-defined]
    assert_same(list(local), [first, *it])  # and the batches are those of the same store on local disk


def rows_of_shard_0_trusted(ds: VLADataset) -> bool:
    """Whether the reader counts every row of shard 0 of "fixed" as checked (arena or per-shard map)."""
    reader = ds._readers["fixed"]
    arena = reader._arena
    if arena is not None and arena.row_ok is not None:
        return bool(arena.row_ok[: reader.layout.rows_per_shard].all())
    return bool(reader._shards[0].verified.all())


def test_a_shard_verified_on_arrival_is_not_checked_again_unless_its_file_changed(
    remote_store: list[str], s3_url: str, proxy_options: dict[str, str], tmp_path: Path
) -> None:
    """The stamp written after the verify on arrival lets a reader skip its per-row crc32c; a copy replaced
    (a new inode) or written again in place (a new mtime) is not trusted."""
    ds = VLADataset(s3_url, features=["fixed"], storage_options=proxy_options, cache_dir=tmp_path / "cache")
    cache = ds.store.storage
    assert isinstance(cache, CachedStorage)
    ds.__getitems__([0])  # maps the shard of sample 0 (downloaded and verified on arrival)
    assert rows_of_shard_0_trusted(ds)  # every row of the shard, not only the one read
    key = next(k for k in remote_store if k.startswith("features/fixed/"))
    (path,) = [p for p in (cache.root / "objects").iterdir()]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert cache.verified_on_arrival(key, fd)
    finally:
        os.close(fd)
    copy = path.with_name("copy")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # same bytes, another file: no longer the one verified
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not cache.verified_on_arrival(key, fd)
    finally:
        os.close(fd)
    fresh = VLADataset(s3_url, features=["fixed"], storage_options=proxy_options, cache_dir=tmp_path / "cache")
    fresh.__getitems__([0])
    assert not rows_of_shard_0_trusted(fresh)  # checked as read, row by row
    with open(path, "r+b") as f:  # written again in place: the mtime moves
        f.write(f.read(1))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not cache.verified_on_arrival(key, fd)
    finally:
        os.close(fd)
