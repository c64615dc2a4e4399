"""`info` and `verify` as library functions."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import flip_byte, random_rows, spec_for

from vlastore.report import format_info, store_info, verify_store
from vlastore.store import VLAStore


def test_store_info_describes_every_family(full_store) -> None:
    store, _ = full_store
    info = store_info(VLAStore.open(store.location))
    json.dumps(info)  # plain data
    assert (info["format_version"], info["episodes"], info["steps"]) == (1, 4, 24)
    assert info["steps_per_episode"] == {"min": 3, "mean": 6.0, "max": 9}
    assert info["series"]["state"] == {"columns": ["x", "y", "z"], "dtype": "float32"}
    assert info["series"]["action"]["dtype"] == "float64"
    fixed = info["families"]["fixed"]
    assert fixed["rows"] == fixed["rows_present"] == 9
    assert (fixed["shards"], fixed["shards_written"], fixed["rows_per_shard"]) == (3, 3, 4)
    assert fixed["payload_bytes"] == 9 * 8 * 2
    assert fixed["dtype"] == "bfloat16" and fixed["row_shape"] == [8] and fixed["compression"] is None
    tokens = info["families"]["tokens"]
    assert tokens["row_shape"] == ["L", 4] and tokens["ragged"]
    assert tokens["token_rows"] == int(store.layout("tokens").lengths.sum())
    on_disk = [p for p in Path(store.location).rglob("*") if p.is_file()]
    assert info["files"] == len(on_disk)
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in on_disk)
    text = format_info(info)
    assert "episodes    4  steps 24 (per episode min 3, mean 6.0, max 9)" in text
    assert "family      tokens: 9 rows of [Lx4] float16 by (vlm_idx), vlm_reuse_count 3" in text
    assert "coverage  9/9 rows present (100.0%), 3/3 shards" in text


def test_info_shows_partial_coverage(empty_store: VLAStore) -> None:
    empty_store.add_family("f", spec_for("float32"))
    with empty_store.writer("f") as writer:
        writer.write_rows([0, 1, 2, 3, 8], random_rows((5, 8), "float32"))
    info = store_info(empty_store)
    assert info["families"]["f"]["rows_present"] == 5
    assert "coverage  5/9 rows present (55.6%), 2/3 shards" in format_info(info)


def test_verify_clean_store(full_store) -> None:
    store, _ = full_store
    ticks: list[int] = []
    report = verify_store(store, progress=ticks.append)
    assert report.ok and not report.corrupt
    assert report.coverage == {"fixed": (9, 9), "tokens": (9, 9), "packed": (9, 9)}
    assert report.chunks_checked == 9 + 9 + int(store.layout("tokens").lengths.sum())
    assert sum(ticks) == 3 + 4 + 3  # shard files of fixed, tokens, packed
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_verify_names_every_corrupt_row(full_store) -> None:
    store, _ = full_store
    stride = 8 * 2 + 4
    flip_byte(store.storage.zarr_store(), store.shard_key("fixed", 0), 0)  # row 0
    flip_byte(store.storage.zarr_store(), store.shard_key("fixed", 0), stride + 19)  # row 1's crc
    flip_byte(store.storage.zarr_store(), store.shard_key("fixed", 2), -1)  # shard 2's index: row 8
    report = verify_store(VLAStore.open(store.location))
    assert not report.ok
    found = [(c.family, c.dataset, c.index) for c in report.corrupt]
    assert found == [("fixed", "episode_000", 0), ("fixed", "episode_000", 1), ("fixed", "episode_003", 0)]
    assert str(report.corrupt[0]).startswith("fixed: ('episode_000', vlm_idx=0) crc32c mismatch [features/fixed/")
    assert "shard index unreadable" in report.corrupt[2].reason
    assert report.coverage["fixed"] == (8, 9)  # the unreadable shard counts as not present


def test_verify_checks_catalog_and_series_too(full_store) -> None:
    store, _ = full_store
    flip_byte(store.storage.zarr_store(), "series/state/c/0/0", 5)
    report = verify_store(VLAStore.open(store.location))
    assert [c.where for c in report.corrupt] == ["series/state"]
    assert "unreadable" in str(report.corrupt[0])


def test_verify_covers_every_generation(full_store) -> None:
    store, values = full_store
    store.new_generation("fixed", store.generation("fixed").producer)
    with store.writer("fixed", generation=2) as writer:
        writer.write_rows([0, 1, 2, 3], values["fixed"][:4])
    report = verify_store(store)
    assert report.coverage["fixed"] == (9, 9) and report.coverage["fixed@2"] == (4, 9)
    # an unfinished generation is not OK: its planned rows are reported missing, with examples
    assert not report.ok and not report.corrupt
    assert report.missing["fixed@2"].rows == 5 and report.missing["fixed@2"].examples[0] == ("episode_001", 1)
