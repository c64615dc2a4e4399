"""`vlastore ingest vggt`: caches next to images, rows keyed by image path, optional manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from ingest_helpers import bits, robot_csvs, tree_hashes

from vlastore.cli import main
from vlastore.store import VLAStore


def _vggt_root(root: Path, episodes: dict[str, int]) -> dict[str, torch.Tensor]:
    values = {}
    for name, n in episodes.items():
        for i in range(n):
            image = root / name / "cam_high" / f"{i:06d}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"\x89PNG fake image")
            t = torch.randn(1, 5, 12).to(torch.bfloat16)
            torch.save({"features": t}, f"{image}.vggt_cache.pt")
            values[f"{name}/cam_high/{i:06d}.png"] = t
    return values


def test_vggt_round_trip_and_lookup_by_image_path(tmp_path: Path) -> None:
    root = tmp_path / "data"
    values = _vggt_root(root, {"ep_a": 4, "ep_b": 3})
    before = tree_hashes(root)
    out = tmp_path / "s.vla"
    assert main(["ingest", "vggt", str(root), "--out", str(out), "--workers", "2", "--verify", "-q"]) == 0
    assert tree_hashes(root) == before
    store = VLAStore.open(out)
    assert store.datasets == ("ep_a", "ep_b")
    spec = store.spec("vggt")
    assert spec.has_keys and spec.index_name == "image_idx" and spec.row_shape == (5, 12)
    for key, t in values.items():
        assert np.array_equal(store.reader("vggt").row(store.row_by_key("vggt", key)), bits(t)[0])
        assert torch.equal(store.feature_by_key("vggt", key), t[0])
    assert torch.equal(store.feature("vggt", "ep_b", 2), values["ep_b/cam_high/000002.png"][0])


def test_vggt_manifest_orders_rows_and_keeps_missing_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    values = _vggt_root(root, {"ep_a": 3})
    (root / "ep_a" / "cam_high" / "000001.png.vggt_cache.pt").unlink()  # an image without a cache
    listing = {"ep_a": ["ep_a/cam_high/000002.png", "ep_a/cam_high/000001.png", "ep_a/cam_high/000000.png"]}
    (root / "manifest.json").write_text(json.dumps(listing))
    out = tmp_path / "s.vla"
    assert main(["ingest", "vggt", str(root), "--out", str(out), "--workers", "1", "-q"]) == 0
    store = VLAStore.open(out)
    assert store.keys("vggt") == tuple(listing["ep_a"])
    assert store.coverage("vggt").tolist() == [True, False, True]
    assert torch.equal(store.feature("vggt", "ep_a", 0), values["ep_a/cam_high/000002.png"][0])


def test_vggt_into_robot_store(tmp_path: Path) -> None:
    robot_csvs(tmp_path / "csv", {"ep_a": 5, "ep_b": 4})
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(tmp_path / "s.vla"), "-q"]) == 0
    values = _vggt_root(tmp_path / "data", {"ep_b": 2, "ep_zzz": 1})
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "ingest",
                "vggt",
                str(tmp_path / "data"),
                "--into",
                str(tmp_path / "s.vla"),
                "-q",
                "--report-json",
                str(report),
            ]
        )
        == 0
    )
    store = VLAStore.open(tmp_path / "s.vla")
    assert store.layout("vggt").episode_rows.tolist() == [0, 0, 2]
    assert torch.equal(store.feature_by_key("vggt", "ep_b/cam_high/000001.png"), values["ep_b/cam_high/000001.png"][0])
    assert [p["reason"] for p in json.loads(report.read_text())["problems"]] == ["unknown-episode"]


def test_vggt_caches_that_are_not_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "data"
    values = _vggt_root(root, {"ep_a": 3})
    cam = root / "ep_a" / "cam_high"
    os.mkfifo(cam / "000100.png.vggt_cache.pt")  # would hang a reader that opened it
    (cam / "000101.png.vggt_cache.pt").mkdir()
    (cam / "000102.png.vggt_cache.pt").symlink_to(cam / "gone.pt")
    (root / "ep_a" / "linked").symlink_to(root / "ep_a" / "cam_high")  # a linked folder: not walked twice
    report = tmp_path / "r.json"
    assert (
        main(["ingest", "vggt", str(root), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(report)]) == 0
    )
    got = {Path(p["path"]).name: p["reason"] for p in json.loads(report.read_text())["problems"]}
    assert got == {
        "000100.png.vggt_cache.pt": "not-a-regular-file",
        "000101.png.vggt_cache.pt": "not-a-regular-file",
        "000102.png.vggt_cache.pt": "dangling-symlink",
    }
    store = VLAStore.open(tmp_path / "s.vla")
    for key, t in values.items():
        assert torch.equal(store.feature_by_key("vggt", key), t[0])
