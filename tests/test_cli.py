"""The `vlastore` command: output, exit codes, no tracebacks on user errors.

The commands run in this process (``main([...])``, output through capsys); one test starts
``python -m vlastore`` for real, to hold the entry point and the process's exit code to the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import flip_byte

from vlastore.cli import main
from vlastore.report import verify_store
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def vlastore(capsys: pytest.CaptureFixture[str]):
    """``vlastore ARGS`` in this process: exit code, stdout and stderr (argparse's exits included)."""

    def run(*args: str) -> Ran:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage mistakes
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def test_python_m_vlastore_is_the_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "vlastore", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0
    for command in ("demo", "info", "verify"):
        assert command in out.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "vlastore", "info", str(ROOT / "missing.vla")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 2 and "no such store" in missing.stderr and "Traceback" not in missing.stderr


def test_info_and_verify_on_a_clean_store(full_store, vlastore) -> None:
    store, _ = full_store
    info = vlastore("info", store.location)
    assert info.returncode == 0, info.stderr
    assert "coverage  9/9 rows present (100.0%), 3/3 shards" in info.stdout
    as_json = json.loads(vlastore("info", store.location, "--json").stdout)
    assert as_json["families"]["tokens"]["rows_present"] == 9
    verify = vlastore("verify", "-q", store.location)
    assert verify.returncode == 0, verify.stderr
    assert "fixed: 9/9 rows present" in verify.stdout and "OK: no corruption found" in verify.stdout


def test_verify_exits_1_and_names_the_corrupt_row(full_store, vlastore) -> None:
    store, _ = full_store
    flip_byte(store.storage.zarr_store(), store.shard_key("fixed", 1), 2 * (8 * 2 + 4) + 5)  # row 6
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
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, make, says: str, commands: list[str], vlastore) -> None:
    where = make(tmp_path)
    for command in commands:
        out = vlastore(command, where)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vlastore {command}: error: ") and says in lines[0]


def test_demo_makes_a_store_that_verifies(tmp_path: Path, vlastore) -> None:
    out = vlastore("demo", "--out", str(tmp_path / "demo.vla"))
    assert out.returncode == 0, out.stderr
    assert "read back: qwen_vl" in out.stdout
    assert verify_store(VLAStore.open(tmp_path / "demo.vla")).ok
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = vlastore("demo", "--out", str(tmp_path / "mine"))
    assert refused.returncode == 2 and "not a vlastore store" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------ issue 9: exit codes and messages


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_demo_force_replaces_only_a_store_and_only_its_files(tmp_path: Path, capsys) -> None:
    from vlastore.store import remove_store

    store_path = tmp_path / "demo.vla"
    VLAStore.create(store_path, [])
    code, text = _run(capsys, "demo", "--out", str(store_path))
    assert code == 2 and "--force" in text  # an existing store needs --force
    (store_path / "notes.txt").write_text("mine")
    code, text = _run(capsys, "demo", "--out", str(store_path), "--force")
    assert code == 2 and "notes.txt" in text and "nothing was deleted" in text
    assert (store_path / "notes.txt").read_text() == "mine" and (store_path / "zarr.json").exists()
    (store_path / "notes.txt").unlink()
    assert remove_store(store_path) > 0 and not store_path.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.json").write_text("{}")  # what the old check took for a store
    code, text = _run(capsys, "demo", "--out", str(other), "--force")
    assert code == 2 and "not a vlastore store" in text and (other / "zarr.json").exists()


def test_verify_reports_missing_rows_and_info_a_damaged_store_in_a_few_lines(full_store, capsys) -> None:
    store, _ = full_store
    (Path(store.location) / store.shard_key("fixed", 2)).unlink()
    code, text = _run(capsys, "verify", "-q", store.location)
    assert code == 1 and "MISSING fixed: 1 of 9 planned rows not stored, e.g. ('episode_003', vlm_idx=0)" in text
    assert "FAILED: 0 corrupt item(s), 1 missing row(s)" in text
    (Path(store.location) / "episodes/steps/c/0").write_bytes(b"garbage")
    code, text = _run(capsys, "info", store.location)
    assert code == 1 and "is damaged" in text and "vlastore verify" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) <= 3
    code, text = _run(capsys, "verify", "-q", store.location)
    assert code == 1 and "CORRUPT episodes" in text


def test_usage_mistakes_exit_2(tmp_path: Path, full_store, capsys) -> None:
    store, _ = full_store
    code, text = _run(capsys, "build-features", store.location, "--data-root", str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in text
    code, text = _run(capsys, "build-features", str(tmp_path / "missing.vla"), "--data-root", str(tmp_path))
    assert code == 2 and "no such store" in text
    with pytest.raises(SystemExit) as exited:
        _run(capsys, "build-features", store.location, "--data-root", str(tmp_path), "--batch-size", "0")
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        _run(capsys, "info")
    assert exited.value.code == 2


def test_unexpected_errors_are_one_line_unless_debugging(full_store, capsys, monkeypatch) -> None:
    from vlastore.cli import _failure

    code, lines = _failure(RuntimeError("boom"), "info")
    assert code == 1 and lines == [
        "internal error: RuntimeError: boom",
        "rerun with VLASTORE_DEBUG=1 for the traceback, and report it",
    ]
    code, lines = _failure(OSError(28, "No space left on device", "/data/x.vla/c/0"), "ingest")
    assert code == 1 and lines[0] == "No space left on device (ENOSPC): /data/x.vla/c/0" and "disk is full" in lines[1]
