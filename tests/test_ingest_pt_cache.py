"""`vlastore ingest pt-cache`: bit-exact round trips, bad files skipped with reasons, dry run, strict, safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ingest_helpers import RunsCode, bits, make_pt_cache, robot_csvs, tree_hashes

from vlastore.cli import main
from vlastore.ingest.shardwork import nonfinite_rows
from vlastore.store import VLAStore

EPISODES = {"episode_20251030_025119": 7, "recv_all_20251027_170308": 5}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("ragged", [False, True])
def test_round_trip_bit_exact(tmp_path: Path, dtype: str, ragged: bool) -> None:
    cache = tmp_path / "cache"
    values = make_pt_cache(cache, EPISODES, shape=(1, 3, 8) if ragged else (1, 16), dtype=dtype, ragged=ragged)
    out = tmp_path / "s.vla"
    report = tmp_path / "r.json"
    code = main(
        [
            "ingest",
            "pt-cache",
            str(cache),
            "--out",
            str(out),
            "--workers",
            "2",
            "--rows-per-shard",
            "8",
            "--verify",
            "-q",
            "--report-json",
            str(report),
        ]
    )
    assert code == 0
    store = VLAStore.open(out)
    assert store.datasets == tuple(sorted(EPISODES))
    assert store.catalog.steps.tolist() == [EPISODES[n] * 3 for n in sorted(EPISODES)]
    spec = store.spec("vl_features")
    assert spec.dtype == dtype and spec.ragged == ragged and spec.row_shape == ((8,) if ragged else (16,))
    for (name, idx), t in values.items():
        got = store.reader("vl_features").row(store.row("vl_features", name, idx))
        assert np.array_equal(got, bits(t).reshape(got.shape))
    data = json.loads(report.read_text())
    assert data["files_ingested"] == len(values) and data["verify"]["ok"]
    assert data["families"]["vl_features"]["coverage"] == 1.0


def _write(path: Path, obj: object) -> None:
    torch.save(obj, path)


def test_bad_files_are_skipped_with_reasons_and_the_rest_ingests(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    values = make_pt_cache(cache, {"ep_a": 6, "ep_b": 6})
    good = torch.randn(1, 16).bfloat16()
    full = (cache / "ep_a_vlm0.pt").read_bytes()
    (cache / "ep_a_vlm1.pt").write_bytes(full[: len(full) // 2])  # truncated
    (cache / "ep_a_vlm2.pt").write_bytes(b"not a zip at all" * 20)  # not a zip
    _write(cache / "ep_a_vlm3.pt", torch.randn(1, 17).bfloat16())  # wrong shape
    _write(cache / "ep_a_vlm4.pt", torch.randn(1, 16).float())  # wrong dtype
    nan = torch.randn(1, 16).bfloat16()
    nan[0, 3] = float("nan")
    _write(cache / "ep_b_vlm1.pt", nan)  # NaN
    _write(cache / "0a1b2c3d4e5f60718293a4b5.pt", {"features": good, "dataset": "ep_b", "vlm_idx": 2})  # duplicate
    _write(cache / "ffffeeee0000111122223333.pt", good)  # hash name, no metadata, no mapping
    marker = tmp_path / "PWNED"
    _write(cache / "ep_b_vlm4.pt", {"features": good, "payload": RunsCode(str(marker))})  # pickled code
    (cache / "notes.txt").write_text("ignored")
    before = tree_hashes(cache)
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(cache),
                "--out",
                str(tmp_path / "s.vla"),
                "--workers",
                "2",
                "-q",
                "--report-json",
                str(report),
                "--verify",
            ]
        )
        == 0
    )
    assert tree_hashes(cache) == before
    data = json.loads(report.read_text())
    reasons = {os.path.basename(p["path"]): p["reason"] for p in data["problems"]}
    assert reasons == {
        "ep_a_vlm1.pt": "truncated",
        "ep_a_vlm2.pt": "not-zip",
        "ep_a_vlm3.pt": "wrong-shape",
        "ep_a_vlm4.pt": "wrong-dtype",
        "ep_b_vlm1.pt": "nonfinite",
        "ep_b_vlm4.pt": "unsafe-pickle",
        "0a1b2c3d4e5f60718293a4b5.pt": "duplicate-key",
        "ffffeeee0000111122223333.pt": "unmatched-name",
    }
    store = VLAStore.open(tmp_path / "s.vla")
    present = store.coverage("vl_features")
    assert not marker.exists()
    assert present.sum() == 12 - 6 and data["files_ingested"] == 6
    assert torch.equal(store.feature("vl_features", "ep_b", 2), values[("ep_b", 2)][0])
    assert data["verify"]["ok"]
    # --strict: the same problems are fatal and nothing new is written
    strict_report = tmp_path / "strict.json"
    code = main(
        [
            "ingest",
            "pt-cache",
            str(cache),
            "--out",
            str(tmp_path / "strict.vla"),
            "--strict",
            "-q",
            "--report-json",
            str(strict_report),
        ]
    )
    assert code == 1 and not (tmp_path / "strict.vla").exists() and not marker.exists()
    assert json.loads(strict_report.read_text())["skipped_by_reason"] == data["skipped_by_reason"]


def test_hash_named_files_with_mapping_csv_and_metadata(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    a, b, c = (torch.randn(1, 8).half() for _ in range(3))
    torch.save(a, cache / "00002a20a20e3399f3c7d146.pt")
    torch.save(b, cache / "11112a20a20e3399f3c7d146.pt")
    torch.save({"features": c, "dataset_name": "ep_x", "vlm_idx": torch.tensor(1)}, cache / "2222aaaa.pt")
    torch.save(a, cache / "3333bbbb.pt")  # not in the mapping, no metadata
    mapping = tmp_path / "map.csv"
    mapping.write_text("file,dataset,vlm_idx\n00002a20a20e3399f3c7d146.pt,ep_x,0\n11112a20a20e3399f3c7d146.pt,ep_y,0\n")
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(cache),
                "--out",
                str(tmp_path / "s.vla"),
                "--mapping",
                str(mapping),
                "--workers",
                "1",
                "-q",
                "--report-json",
                str(report),
            ]
        )
        == 0
    )
    store = VLAStore.open(tmp_path / "s.vla")
    assert store.datasets == ("ep_x", "ep_y")
    assert torch.equal(store.feature("vl_features", "ep_x", 0), a[0])
    assert torch.equal(store.feature("vl_features", "ep_x", 1), c[0])
    assert torch.equal(store.feature("vl_features", "ep_y", 0), b[0])
    problems = json.loads(report.read_text())["problems"]
    assert [(os.path.basename(p["path"]), p["reason"]) for p in problems] == [("3333bbbb.pt", "no-mapping-row")]


def test_dry_run_writes_nothing_and_reports_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, EPISODES)
    (cache / "bad_vlm0.pt").write_bytes(b"PK\x03\x04 truncated")
    before = tree_hashes(tmp_path)
    assert main(["ingest", "pt-cache", str(cache), "--out", str(tmp_path / "s.vla"), "--dry-run", "-q"]) == 0
    assert tree_hashes(tmp_path) == before
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "estimated size of the new store" in text
    assert "13 rows of [16] bfloat16, 12 with a source file" in text
    assert "[truncated]" in text


def test_features_into_a_robot_store(tmp_path: Path) -> None:
    robot = tmp_path / "robot"
    robot_csvs(robot, {"ep_a": 9, "ep_b": 7})
    cache = tmp_path / "cache"
    values = make_pt_cache(cache, {"ep_a": 3, "ep_b": 4})  # ep_b_vlm3 is past ceil(7 / 3) = 3 rows
    out = tmp_path / "s.vla"
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(cache),
                "--robot",
                str(robot),
                "--out",
                str(out),
                "-q",
                "--robot-series",
                "state=joint_*,gripper",
                "--robot-series",
                "action=action_*",
                "--report-json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    store = VLAStore.open(out)
    assert store.catalog.steps.tolist() == [9, 7]
    assert store.columns("state") == ("joint_0", "joint_1", "joint_2", "gripper")
    assert store.layout("vl_features").episode_rows.tolist() == [0, 3, 6]
    assert torch.equal(store.feature("vl_features", "ep_b", 2), values[("ep_b", 2)][0])
    problems = json.loads((tmp_path / "r.json").read_text())["problems"]
    assert [p["reason"] for p in problems] == ["index-out-of-range"]


def test_verify_catches_a_source_that_no_longer_matches(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 4})
    args = ["ingest", "pt-cache", str(cache), "--out", str(tmp_path / "s.vla"), "-q", "--workers", "1"]
    assert main([*args, "--verify"]) == 0
    torch.save(torch.randn(1, 16).bfloat16(), cache / "ep_a_vlm2.pt")  # same shape, other values
    report = tmp_path / "r.json"
    assert main([*args, "--verify", "--report-json", str(report)]) == 1  # rerun: nothing to write, verify fails
    data = json.loads(report.read_text())
    assert data["rows_written"] == 0 and data["rows_already_done"] == 4
    assert len(data["verify"]["mismatches"]) == 1 and "vlm_idx=2" in data["verify"]["mismatches"][0]


def test_verify_names_the_changed_row_when_another_source_went_bad(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 5})
    args = ["ingest", "pt-cache", str(cache), "--out", str(tmp_path / "s.vla"), "-q", "--workers", "1"]
    assert main(args) == 0
    (cache / "ep_a_vlm1.pt").write_bytes(b"junk")  # the rows read back no longer line up with the shard's rows
    torch.save(torch.randn(1, 16).bfloat16(), cache / "ep_a_vlm3.pt")
    report = tmp_path / "r.json"
    assert main([*args, "--verify", "--report-json", str(report)]) == 1
    mismatches = json.loads(report.read_text())["verify"]["mismatches"]
    assert len(mismatches) == 2
    assert "vlm_idx=1" in mismatches[0] and "ep_a_vlm1.pt" in mismatches[0]
    assert "vlm_idx=3" in mismatches[1] and f"stored bytes differ from {cache / 'ep_a_vlm3.pt'}" in mismatches[1]


@pytest.mark.parametrize("full_scan", [False, True])
def test_named_bad_files_found_by_fast_and_full_scan_alike(tmp_path: Path, full_scan: bool) -> None:
    cache = tmp_path / "cache"
    values = make_pt_cache(cache, {"ep_a": 40})
    full = (cache / "ep_a_vlm0.pt").read_bytes()
    (cache / "ep_a_vlm1.pt").write_bytes(full[:100])
    (cache / "ep_a_vlm2.pt").write_bytes(b"garbage" * 50)
    torch.save(torch.randn(1, 17).bfloat16(), cache / "ep_a_vlm3.pt")
    torch.save(torch.randn(1, 16).half(), cache / "ep_a_vlm4.pt")
    torch.save(torch.full((1, 16), float("inf")).bfloat16(), cache / "ep_a_vlm5.pt")
    marker = tmp_path / "PWNED"
    torch.save(RunsCode(str(marker)), cache / "ep_a_vlm6.pt")
    report = tmp_path / "r.json"
    args = [
        "ingest",
        "pt-cache",
        str(cache),
        "--out",
        str(tmp_path / "s.vla"),
        "--workers",
        "2",
        "-q",
        "--rows-per-shard",
        "8",
        "--report-json",
        str(report),
    ]
    assert main(args + (["--full-scan"] if full_scan else [])) == 0
    data = json.loads(report.read_text())
    assert any("fast scan" in n for n in data["notes"]) != full_scan
    reasons = sorted((os.path.basename(p["path"]), p["reason"]) for p in data["problems"])
    assert reasons == [
        ("ep_a_vlm1.pt", "truncated"),
        ("ep_a_vlm2.pt", "not-zip"),
        ("ep_a_vlm3.pt", "wrong-shape"),
        ("ep_a_vlm4.pt", "wrong-dtype"),
        ("ep_a_vlm5.pt", "nonfinite"),
        ("ep_a_vlm6.pt", "unsafe-pickle"),
    ]
    assert not marker.exists()
    store = VLAStore.open(tmp_path / "s.vla")
    assert store.coverage("vl_features").tolist() == [True] + [False] * 6 + [True] * 33
    assert torch.equal(store.feature("vl_features", "ep_a", 39), values[("ep_a", 39)][0])


def test_rerun_of_a_finished_ingest_reports_the_same_skips(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 10})
    (cache / "ep_a_vlm4.pt").write_bytes(b"garbage" * 40)
    args = ["ingest", "pt-cache", str(cache), "--out", str(tmp_path / "s.vla"), "-q", "--workers", "1"]
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    assert main([*args, "--report-json", str(first)]) == 0
    assert main([*args, "--report-json", str(second)]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["problems"] == b["problems"] and [p["reason"] for p in b["problems"]] == ["not-zip"]
    assert (a["rows_written"], a["rows_already_done"]) == (9, 0)
    assert (b["rows_written"], b["rows_already_done"], b["files_ingested"]) == (0, 9, 9)


def test_zstd_family_round_trip(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    values = make_pt_cache(cache, {"ep_a": 9}, shape=(1, 64), dtype="float16")
    out = tmp_path / "s.vla"
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(cache),
                "--out",
                str(out),
                "--compression",
                "zstd",
                "--workers",
                "2",
                "--rows-per-shard",
                "4",
                "--verify",
                "-q",
            ]
        )
        == 0
    )
    store = VLAStore.open(out)
    assert store.spec("vl_features").compression == "zstd"
    for (name, idx), t in values.items():
        assert torch.equal(store.feature("vl_features", name, idx), t[0])


@settings(max_examples=200, deadline=None)
@given(bits=st.lists(st.lists(st.integers(0, 0xFFFF), min_size=3, max_size=3), min_size=1, max_size=20))
def test_nonfinite_bfloat16_rows_are_those_with_nan_or_inf_as_float32(bits: list[list[int]]) -> None:
    batch = np.array(bits, dtype=np.uint16)
    as_float32 = (batch.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
    assert nonfinite_rows(batch, "bfloat16").tolist() == (~np.isfinite(as_float32).all(axis=1)).tolist()


def test_pt_cache_into_an_appended_store_copies_only_the_new_episodes_rows(tmp_path: Path) -> None:
    """Issue 11: after `ingest robot --into`, the family has missing rows for the new episode; `ingest
    pt-cache --into` fills those and leaves every existing row and shard file as it was."""
    robot_csvs(tmp_path / "day1", {"ep_a": 9, "ep_b": 7})
    out = tmp_path / "s.vla"
    first = make_pt_cache(tmp_path / "cache1", {"ep_a": 3, "ep_b": 3})
    day1 = ["ingest", "pt-cache", str(tmp_path / "cache1"), "--robot", str(tmp_path / "day1"), "--out", str(out)]
    assert main([*day1, "-q", "--format-version", "2"]) == 0
    robot_csvs(tmp_path / "day2", {"ep_c": 6}, seed=1)
    assert main(["ingest", "robot", str(tmp_path / "day2"), "--into", str(out), "-q"]) == 0
    store = VLAStore.open(out)
    rows = store.layout("vl_features").episode_rows.tolist()
    assert rows == [0, 3, 6, 8]  # ep_c planned: ceil(6 / 3) rows, missing until written
    assert store.coverage("vl_features").tolist() == [True] * 6 + [False] * 2
    shards = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "/values/" in str(p)}
    second = make_pt_cache(tmp_path / "cache2", {"ep_a": 3, "ep_b": 3, "ep_c": 2}, seed=5)  # other values
    assert main(["ingest", "pt-cache", str(tmp_path / "cache2"), "--into", str(out), "-q"]) == 0
    store = VLAStore.open(out)
    assert store.coverage("vl_features").all()
    for (name, idx), value in first.items():  # existing rows kept (not overwritten by the second cache)
        assert torch.equal(store.feature("vl_features", name, idx), value[0])
    for idx in range(2):
        assert torch.equal(store.feature("vl_features", "ep_c", idx), second[("ep_c", idx)][0])
    assert all(p.read_bytes() == data for p, data in shards.items())  # no existing shard file rewritten
