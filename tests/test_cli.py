"""The `vlastore` command in real subprocesses: output, exit codes, no tracebacks on user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import flip_byte

from vlastore.report import verify_store
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parent.parent


def vlastore(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vlastore", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_lists_the_commands() -> None:
    out = vlastore("--help")
    assert out.returncode == 0
    for command in ("demo", "info", "verify"):
        assert command in out.stdout


def test_info_and_verify_on_a_clean_store(full_store) -> None:
    store, _ = full_store
    info = vlastore("info", store.location)
    assert info.returncode == 0, info.stderr
    assert "coverage  9/9 rows present (100.0%), 3/3 shards" in info.stdout
    as_json = json.loads(vlastore("info", store.location, "--json").stdout)
    assert as_json["families"]["tokens"]["rows_present"] == 9
    verify = vlastore("verify", "-q", store.location)
    assert verify.returncode == 0, verify.stderr
    assert "fixed: 9/9 rows present" in verify.stdout and "OK: no corruption found" in verify.stdout


def test_verify_exits_1_and_names_the_corrupt_row(full_store) -> None:
    store, _ = full_store
    flip_byte(store.storage.store, store.shard_key("fixed", 1), 2 * (8 * 2 + 4) + 5)  # row 6
    out = vlastore("verify", store.location)
    assert out.returncode == 1
    assert "CORRUPT fixed: ('episode_002', vlm_idx=1) crc32c mismatch" in out.stdout
    assert "FAILED: 1 corrupt item(s)" in out.stdout
    assert "Traceback" not in out.stderr
    report = json.loads(vlastore("verify", "--json", "-q", store.location).stdout)
    assert report["ok"] is False
    assert [(c["dataset"], c["index"]) for c in report["corrupt"]] == [("episode_002", 1)]


def _not_a_store(tmp_path: Path) -> str:
    (tmp_path / "photos").mkdir()
    return str(tmp_path / "photos")


def _newer(tmp_path: Path) -> str:
    from helpers import episodes

    store = VLAStore.create(tmp_path / "new.vla", episodes())
    meta_path = Path(store.location) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["vlastore"]["format_version"] = 7
    meta_path.write_text(json.dumps(meta))
    return store.location


@pytest.mark.parametrize(
    ("make", "says", "commands"),
    [
        (lambda tmp: str(tmp / "missing.vla"), "no such store", ["info"]),
        (_not_a_store, "is not a vlastore store", ["verify"]),
        (_newer, "format version 7", ["info", "verify"]),
    ],
    ids=["missing", "not-a-store", "newer-format"],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, make, says: str, commands: list[str]) -> None:
    where = make(tmp_path)
    for command in commands:
        out = vlastore(command, where)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vlastore {command}: error: ") and says in lines[0]


def test_demo_makes_a_store_that_verifies(tmp_path: Path) -> None:
    out = vlastore("demo", "--out", str(tmp_path / "demo.vla"))
    assert out.returncode == 0, out.stderr
    assert "read back: qwen_vl" in out.stdout
    assert verify_store(VLAStore.open(tmp_path / "demo.vla")).ok
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = vlastore("demo", "--out", str(tmp_path / "mine"))
    assert refused.returncode == 2 and "not a vlastore store" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
