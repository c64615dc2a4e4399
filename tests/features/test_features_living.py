"""build-features on a living store (format 2): after an append it computes only the new episodes' rows."""

from __future__ import annotations

import numpy as np

from vlastore.features import DataFolder, build_features, get_extractor
from vlastore.store import EpisodeData, VLAStore


def test_build_after_an_append_computes_only_the_new_rows(episodes, tmp_path):
    store_path, data = episodes
    extractor = get_extractor("features_plugins:patch_colors")
    whole = VLAStore.open(store_path)
    eps = [EpisodeData(n, {k: whole.series(k, n) for k in whole.series_keys}) for n in whole.datasets]
    build_features(store_path, extractor, DataFolder(data), rows_per_shard=2, progress=False)  # the reference
    reference = VLAStore.open(store_path)
    living = tmp_path / "living.vla"
    VLAStore.create(living, eps[:2], format_version=2)
    first = build_features(living, extractor, DataFolder(data), rows_per_shard=2, progress=False)
    files = {p: p.read_bytes() for p in living.rglob("*") if p.is_file() and "/values/c/" in str(p)}
    VLAStore.open(living, writable=True).add_episodes(eps[2:])
    again = build_features(living, extractor, DataFolder(data), progress=False)
    store = VLAStore.open(living)
    new_rows = int(np.diff(store.layout("qwen_vl").episode_rows)[2])
    assert again.rows == new_rows and first.rows == store.layout("qwen_vl").rows - new_rows
    assert all(p.read_bytes() == b for p, b in files.items())  # no earlier shard rewritten
    rows = np.arange(store.layout("qwen_vl").rows)
    np.testing.assert_array_equal(
        np.asarray(store.reader("qwen_vl").gather(rows)), np.asarray(reference.reader("qwen_vl").gather(rows))
    )
