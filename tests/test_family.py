"""FamilyHandle: the one place a global shard number becomes a storage key, and stale generations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import build_full_store, fill_family, random_rows, spec_for

from vlastore.family import FamilyHandle, Segment, StaleGenerationError
from vlastore.read import FeatureReader
from vlastore.store import VLAStore
from vlastore.writer import FamilyWriter


def test_v1_is_one_segment_from_shard_0(full_store) -> None:
    store, _ = full_store
    handle = store.handle("fixed")
    assert handle.segments == (Segment("features/fixed/gen-0001/values", 0, handle.layout.n_shards),)
    assert handle.shard_key(2) == "features/fixed/gen-0001/values/c/2/0"
    assert handle.locate(2) == (handle.segments[0], 2)
    with pytest.raises(IndexError):
        handle.locate(handle.layout.n_shards)


def test_shards_of_several_segments_are_written_and_read_where_the_segments_say(tmp_path: Path) -> None:
    """A generation whose shards live in two arrays (what appends add in format v2): writer and reader agree,
    and only the handle's segments decide where a shard goes."""
    store, _ = build_full_store(tmp_path / "s.vla")
    store.add_family("seg", spec_for("float32", rows_per_shard=2))
    v1 = store.handle("seg")
    n = v1.layout.n_shards
    split = (Segment(v1.segments[0].path, 0, 2), Segment("features/seg/gen-0001/s2/values", 2, n - 2))
    handle = FamilyHandle(v1.storage, "seg", v1.info, v1.layout, v1.catalog, split, writable=True)
    values = random_rows((v1.layout.rows, 8), "float32", seed=7)
    with FamilyWriter(handle, rank=0, world_size=1) as writer:
        writer.write_rows(np.arange(v1.layout.rows), values)
    np.testing.assert_array_equal(FeatureReader(handle).gather(np.arange(v1.layout.rows)), values)
    assert handle.written_shards().tolist() == list(range(n))
    assert handle.coverage().all()
    on_disk = sorted(k for k, _ in v1.storage.list("features/seg/gen-0001") if "values/c/" in k)
    assert on_disk == sorted(
        [f"{split[0].path}/c/{s}/0" for s in (0, 1)] + [f"{split[1].path}/c/{s}/0" for s in range(n - 2)]
    )
    with FamilyWriter(handle, rank=0, world_size=1) as again:  # resume: the segments say everything is there
        assert again.pending_rows().size == 0


def test_a_generation_deleted_after_opening_is_stale_not_damaged(tmp_path: Path) -> None:
    """Regression: a reader that opened the store before two switches read the deleted generation's metadata
    and reported the store as damaged (FormatError "missing"), instead of StaleGenerationError."""
    path = tmp_path / "s.vla"
    build_full_store(path)
    reader_store = VLAStore.open(path)
    assert reader_store.generation("fixed").generation == 1 and "fixed" not in {k[0] for k in reader_store._handles}
    writer_store = VLAStore.open(path, writable=True)
    info = writer_store.new_generation("fixed", writer_store.generation("fixed").producer)
    fill_family(writer_store, "fixed", random_rows((writer_store.layout("fixed").rows, 8), "bfloat16", seed=2))
    writer_store.switch_generation("fixed", info.generation, keep_previous=0)  # generation 1 is deleted
    with pytest.raises(StaleGenerationError, match="reload"):
        reader_store.reader("fixed")
    with pytest.raises(StaleGenerationError):
        reader_store.layout("fixed")
    assert VLAStore.open(path).reader("fixed").generation == info.generation  # a store opened after: current
    reader_store.reload()
    assert reader_store.reader("fixed").generation == info.generation


def test_a_handle_with_a_family_or_generation_of_its_own_only(full_store) -> None:
    store, _ = full_store
    handle = store.handle("fixed")
    assert FeatureReader(handle).handle is handle
    with pytest.raises(ValueError, match="give one or the other"):
        FeatureReader(handle, "tokens")
    assert FeatureReader(store, "fixed").handle is handle  # a store makes (and caches) the handle


def test_a_switch_removes_the_old_generations_metadata_before_its_shards(tmp_path: Path, monkeypatch) -> None:
    """Regression: shards deleted before the generation's zarr.json made a reader opened earlier report
    MissingRowError ("not written") instead of StaleGenerationError while the deletion was under way."""
    path = tmp_path / "s.vla"
    store, _ = build_full_store(path)
    early = VLAStore.open(path).reader("fixed")  # opened on generation 1, no shard mapped yet
    calls: list[tuple[str, str]] = []
    storage = store.storage
    for name in ("delete", "delete_prefix"):
        method = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda key, m=method, n=name: (calls.append((n, key)), m(key))[1])
    info = store.new_generation("fixed", store.generation("fixed").producer)
    fill_family(store, "fixed", random_rows((store.layout("fixed").rows, 8), "bfloat16", seed=3))
    calls.clear()
    store.switch_generation("fixed", info.generation, keep_previous=0)
    assert calls[0] == ("delete", "features/fixed/gen-0001/zarr.json")
    with pytest.raises(StaleGenerationError):
        early.gather(np.arange(store.layout("fixed").rows))
