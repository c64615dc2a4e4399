"""The commit log: one writer per commit number, no lost update under racing committers, damaged commits refused."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from vlastore.commitlog import CommitLog, SnapshotNotFoundError
from vlastore.format import FormatError
from vlastore.snapshot import CatalogRef, Change, Snapshot, log_key

pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")
from vlastore.storage.objects import ObjectStorage  # noqa: E402


def bump(head: Snapshot | None, number: int, who: str = "t") -> Snapshot:
    """A change that counts: each commit adds one episode to the catalog's count."""
    episodes = 0 if head is None else head.catalog.episodes
    return Snapshot(
        commit=number,
        parent=None if head is None else head.commit,
        time="t",
        vlastore_version="test",
        changes=(Change("append", {"episodes": [f"{who}{episodes}"]}),),
        next_episode_id=episodes + 1,
        catalog=CatalogRef(f"catalog/{number:08d}-000000", episodes + 1, 0),
        series={},
        families={},
        arrays={},
    )


def committer(url: str, options: dict[str, str], who: str, times: int) -> None:
    log = CommitLog(ObjectStorage(url, options))
    for _ in range(times):
        log.commit(lambda head, number: bump(head, number, who))


def test_racing_committers_lose_no_update(s3_url: str, s3_options: dict[str, str]) -> None:
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=committer, args=(s3_url, s3_options, who, 15)) for who in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    log = CommitLog(ObjectStorage(s3_url, s3_options))
    assert log.numbers() == list(range(1, 31))  # every commit made, each number once
    head = log.head()
    assert head.catalog.episodes == 30  # each change applied on top of all the others
    parents = [log.read(n).parent for n in range(1, 31)]
    assert parents == [None, *range(1, 30)]


def test_a_damaged_or_missing_commit_is_refused(s3_url: str, s3_options: dict[str, str]) -> None:
    storage = ObjectStorage(s3_url, s3_options)
    log = CommitLog(storage)
    log.commit(bump)
    log.commit(bump)
    document = json.loads(storage.get(log_key(2)))
    document["catalog"]["episodes"] = 7  # a flipped field: the checksum no longer matches
    storage.put(log_key(2), json.dumps(document).encode())
    with pytest.raises(FormatError, match="checksum"):
        log.read(2)
    storage.put(log_key(2), storage.get(log_key(1)))  # a commit in the wrong place
    with pytest.raises(FormatError, match="says it is commit 1"):
        log.read(2)
    with pytest.raises(SnapshotNotFoundError, match="gc"):
        log.read(9)
    storage.put("_log/00000000000000000003.json.tmp", b"junk")  # not a commit name: ignored
    assert log.numbers() == [1, 2]
