"""Kill -9 in the middle of an ingestion, run it again: the result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ingest_helpers import make_pt_cache

from vlastore.cli import main
from vlastore.report import verify_store
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parents[1]


def _shards(store: Path) -> list[Path]:
    values = store / "features" / "vl_features" / "gen-0001" / "values" / "c"
    return [p for p in values.glob("*/*") if not p.name.endswith(".partial")] if values.exists() else []


def test_sigkill_mid_ingest_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, {f"episode_2025103{i}_0251{i}9": 400 for i in range(6)}, shape=(1, 64))
    args = ["ingest", "pt-cache", str(cache), "--workers", "2", "--rows-per-shard", "16", "-q"]
    killed = tmp_path / "killed.vla"
    proc = subprocess.Popen([sys.executable, "-m", "vlastore", *args, "--out", str(killed)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _shards(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)  # only the parent: its workers must die with it
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    time.sleep(0.5)
    done_at_kill = len(_shards(killed))
    time.sleep(0.5)
    assert len(_shards(killed)) == done_at_kill  # no orphaned worker is still writing
    total = -(-2400 // 16)
    assert 0 < done_at_kill < total

    assert main([*args, "--out", str(killed)]) == 0
    clean = tmp_path / "clean.vla"
    assert main([*args, "--out", str(clean)]) == 0

    a, b = VLAStore.open(killed), VLAStore.open(clean)
    assert a.catalog == b.catalog and a.generation("vl_features").spec == b.generation("vl_features").spec
    assert a.coverage("vl_features").all() and b.coverage("vl_features").all()
    ra, rb = a.reader("vl_features"), b.reader("vl_features")
    for row in range(a.layout("vl_features").rows):
        assert np.array_equal(ra.row(row), rb.row(row))
    assert len(_shards(killed)) == total
    assert not list(killed.rglob("*.partial"))
    assert verify_store(a).ok
