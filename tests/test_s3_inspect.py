"""Inspection without downloading: `info`, single rows and small batches of an s3:// store use ranged reads,
one request per run of adjacent chunks (requests counted at a proxy in front of moto)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import build_full_store
from s3_server import FaultProxy

pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")

from vlastore.cli import main  # noqa: E402
from vlastore.shardcodec import index_nbytes  # noqa: E402
from vlastore.storage import ObjectStorage  # noqa: E402
from vlastore.store import VLAStore  # noqa: E402


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    path = tmp_path_factory.mktemp("local") / "store.vla"
    _, values = build_full_store(path)
    return path, values


@pytest.fixture
def remote(
    local: tuple[Path, dict[str, object]], s3_url: str, proxy_options: dict[str, str], s3_proxy: FaultProxy
) -> str:
    storage = ObjectStorage(s3_url, proxy_options)
    for path in sorted(local[0].rglob("*")):
        if path.is_file():
            storage.put(path.relative_to(local[0]).as_posix(), path.read_bytes())
    s3_proxy.reset()
    return s3_url


def value_gets(proxy: FaultProxy, family: str) -> list[str | None]:
    """Ranges of the GETs of ``family``'s shard objects, in order."""
    return [r.range for r in proxy.requests("GET") if f"features/{family}/" in r.key and "/values/c/" in r.key]


def test_info_reads_no_shard(
    local: tuple[Path, dict[str, object]], remote: str, proxy_options: dict[str, str], s3_proxy: FaultProxy, capsys
) -> None:
    args = [arg for k, v in proxy_options.items() for arg in ("--storage-option", f"{k}={v}")]
    assert main(["info", remote, "--json", *args]) == 0
    capsys.readouterr()
    shard_reads = [r for r in s3_proxy.requests("GET") if "/values/c/" in r.key]
    assert shard_reads  # coverage comes from the shard indexes ...
    index_sizes = {index_nbytes(4), index_nbytes(6), index_nbytes(3)}
    for record in shard_reads:  # ... each read with one suffix request of exactly the index
        assert record.range is not None and record.range.startswith("bytes=-"), record
        assert int(record.range[len("bytes=-") :]) in index_sizes
        assert record.body_bytes == int(record.range[len("bytes=-") :])
    shard_bytes = sum(p.stat().st_size for p in local[0].rglob("*") if "/values/c/" in p.as_posix())
    assert sum(r.body_bytes for r in shard_reads) < shard_bytes / 4


def test_single_rows_cost_one_request_each_after_the_index(
    local: tuple[Path, dict[str, object]], remote: str, proxy_options: dict[str, str], s3_proxy: FaultProxy
) -> None:
    values = local[1]
    store = VLAStore.open(remote, storage_options=proxy_options)
    reader = store.reader("fixed")  # 4 rows per shard, raw bfloat16
    s3_proxy.reset()
    assert np.array_equal(reader.row(1), values["fixed"][1])  # type: ignore[index]
    gets = value_gets(s3_proxy, "fixed")
    assert len(gets) == 2 and gets[0] == f"bytes=-{index_nbytes(4)}"  # the shard's index, then the row
    for row in (3, 0, 2):  # the same shard: its index is known, one request per row
        s3_proxy.reset()
        assert np.array_equal(reader.row(row), values["fixed"][row])  # type: ignore[index]
        assert len(value_gets(s3_proxy, "fixed")) == 1
    s3_proxy.reset()
    got = reader.gather([4, 5, 6, 7])  # a new shard, every row adjacent: the index and one request
    assert np.array_equal(got, values["fixed"][4:8])  # type: ignore[index]
    assert len(value_gets(s3_proxy, "fixed")) == 2
    s3_proxy.reset()
    got = reader.gather([0, 2, 3])  # runs [0] and [2, 3]: two requests
    assert np.array_equal(got, values["fixed"][[0, 2, 3]])  # type: ignore[index]
    assert len(value_gets(s3_proxy, "fixed")) == 2


def test_ragged_and_compressed_rows_are_ranged_too(
    local: tuple[Path, dict[str, object]], remote: str, proxy_options: dict[str, str], s3_proxy: FaultProxy
) -> None:
    values = local[1]
    store = VLAStore.open(remote, storage_options=proxy_options)
    for family in ("tokens", "packed"):
        reader = store.reader(family)
        reader.row(0)  # the first shard's index
        s3_proxy.reset()
        for row in (0, 1):
            got = reader.row(row)
            assert np.array_equal(got, values[family][row])  # type: ignore[index]
        assert len(value_gets(s3_proxy, family)) == 2  # one request per row (a ragged row: its run of tokens)
        assert all(r is not None and not r.startswith("bytes=-") for r in value_gets(s3_proxy, family))


def test_notebook_tables_read_no_shard_body(
    local: tuple[Path, dict[str, object]],
    remote: str,
    proxy_options: dict[str, str],
    s3_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("pandas", reason="pip install vlastore[notebook]")
    from vlastore.inspect import coverage_table, episode_table, open_store, store_summary  # noqa: PLC0415

    monkeypatch.setenv("VLASTORE_STORAGE_OPTIONS", json.dumps(proxy_options))  # as `vlastore` sets it
    store = open_store(remote)
    summary = store_summary(store)
    assert len(episode_table(store)) == 4
    coverage = coverage_table(store)
    assert len(summary) and len(coverage)
    for record in (r for r in s3_proxy.requests("GET") if "/values/c/" in r.key):
        assert record.range is not None and record.range.startswith("bytes=-"), record  # indexes only
