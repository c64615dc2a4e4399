"""Fault suite of `vlastore ingest`: kill -9 at every stage then resume, hostile and broken inputs, exhausted resources.

Every case runs the real command: a ``python -m vlastore`` subprocess where a hang, a
traceback, an exit code or memory is what is checked, ``main()`` in-process elsewhere.
Three classes (counted in the closing note of issue 9):

* crash points: SIGKILL (and Ctrl-C) during scan, store creation, shard writes,
  ``--verify`` and robot ingestion; the rerun equals an uninterrupted run byte for byte;
* bad inputs: every malformed or hostile source seen so far; each is one skipped file
  with its reason, the rest is ingested, the sources are unchanged, nothing is written
  outside the output, memory stays bounded;
* resources: a full disk, ``ulimit -f``, a read-only store, a concurrent writer and
  transient I/O errors: a few lines, the right exit code, nothing half-written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_helpers import (
    ROOT,
    RunsCode,
    bits,
    deflate_bomb,
    make_pt_cache,
    no_traceback,
    pt_records,
    raw_zip,
    robot_csvs,
    run_cli,
    snapshot,
)

from vlastore.cli import main
from vlastore.ingest import ptfile
from vlastore.ingest.source import classify_os_error
from vlastore.store import VLAStore

LIMIT_AS = 3 << 30  # address space of a run fed with memory bombs
PEAK_RSS = 200 << 20  # a normal run peaks near 55 MB; any bomb that went off would take gigabytes


# ----------------------------------------------------------------- helpers


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a store; creation times (and the manifest checksum over them) blanked: all runs differ in."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "zarr.json":
                # the manifest's checksum covers its creation time, so it differs with it
                data = re.sub(rb'"(created|checksum)": "[^"]*"', rb'"\1": ""', data)
            out[str(path.relative_to(root))] = data
    return out


def assert_same_store(a: Path, b: Path) -> None:
    left, right = store_bytes(a), store_bytes(b)
    assert sorted(left) == sorted(right)
    for key in left:
        assert left[key] == right[key], key
    assert not [p for p in a.rglob("*") if p.name.endswith(".partial")]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_when(args: list[str], ready, timeout: float = 120, sig: int = signal.SIGKILL) -> subprocess.Popen:  # noqa: ANN001
    """Start ``python -m vlastore ARGS``; send ``sig`` to it (only the parent) once ``ready(proc)`` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlastore", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready(proc) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the command ended before the crash point: {proc.stderr.read().decode()}"
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    return proc


def shards(store: Path, family: str = "vl_features") -> list[Path]:
    values = store / "features" / family / "gen-0001" / "values" / "c"
    return [p for p in values.rglob("*") if p.is_file() and not p.name.endswith(".partial")] if values.exists() else []


def settled(store: Path, proc: subprocess.Popen | None = None) -> None:
    """After a kill -9 of the parent, no worker may still be writing (they die with it).

    With ``proc`` (started in a session of its own): first wait until every process of its group
    is gone; the workers of a forkserver pool learn of the parent's death a moment later.
    """
    deadline = time.monotonic() + 30
    while proc is not None and time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    time.sleep(0.4)
    before = snapshot(store) if store.exists() else {}
    time.sleep(0.4)
    assert (snapshot(store) if store.exists() else {}) == before


def reasons(report: Path) -> dict[str, str]:
    return {os.path.basename(p["path"]): p["reason"] for p in json.loads(report.read_text())["problems"]}


# ----------------------------------------------------------------- crash points

CACHE_EPISODES = {f"episode_2025103{i}_02511{i}": 120 for i in range(6)}
ROWS_PER_SHARD = 8
TOTAL_SHARDS = -(-sum(CACHE_EPISODES.values()) // ROWS_PER_SHARD)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "cache"
    make_pt_cache(folder, CACHE_EPISODES, shape=(1, 64))
    return folder


def _pt_args(cache: Path, *extra: str) -> list[str]:
    return ["ingest", "pt-cache", str(cache), "--workers", "2", "--rows-per-shard", str(ROWS_PER_SHARD), "-q", *extra]


@pytest.fixture(scope="module")
def clean_stores(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs to compare with: raw and zstd (--full-scan and --verify give the same bytes)."""
    out = {}
    for name, extra in (("raw", []), ("zstd", ["--compression", "zstd"])):
        out[name] = tmp_path_factory.mktemp("clean") / "clean.vla"
        assert main([*_pt_args(cache, *extra), "--out", str(out[name])]) == 0
    return out


CRASH_POINTS = {
    # name: (extra options, when to kill)
    "scan": (["--full-scan"], lambda out, total: lambda p: bool(children(p.pid)) and not out.exists()),
    # the hidden build folder lives a few tens of ms; should a loaded machine miss it, right after the rename
    "store creation": (
        ["--full-scan"],
        lambda out, total: (
            lambda p: out.exists() or any(n.startswith(f".{out.name}.creating-") for n in os.listdir(out.parent))
        ),
    ),
    "shard writes": ([], lambda out, total: lambda p: 0 < len(shards(out)) < total // 2),
    "shard writes, zstd": (["--compression", "zstd"], lambda out, total: lambda p: 0 < len(shards(out)) < total // 2),
    "verify": (["--verify"], lambda out, total: lambda p: len(shards(out)) == total),
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, cache: Path, clean_stores: dict, point: str
) -> None:
    extra, when = CRASH_POINTS[point]
    killed = tmp_path / "killed.vla"
    before = snapshot(cache)
    proc = kill_when([*_pt_args(cache, *extra), "--out", str(killed)], when(killed, TOTAL_SHARDS))
    assert proc.returncode == -signal.SIGKILL
    settled(killed, proc)
    assert main([*_pt_args(cache, *extra), "--out", str(killed)]) == 0
    assert_same_store(killed, clean_stores["zstd" if "zstd" in extra else "raw"])
    assert len(shards(killed)) == TOTAL_SHARDS and VLAStore.open(killed).coverage("vl_features").all()
    assert os.listdir(tmp_path) == ["killed.vla"]  # no hidden build folder left
    assert snapshot(cache) == before


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_workers_without_tracebacks_and_resumes(tmp_path: Path, cache: Path, clean_stores: dict) -> None:
    # A run may end before a shard is seen, or finish its last shard as the interrupt lands (a fast
    # machine): then it runs again. A Ctrl-C that never stops a run fails all 5 attempts.
    for attempt in range(5):
        out = tmp_path / f"s{attempt}.vla"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlastore", *_pt_args(cache), "--out", str(out)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_default_sigint,  # a background job (CI) may have inherited SIGINT ignored
        )
        while proc.poll() is None and not 0 < len(shards(out)) < TOTAL_SHARDS // 2:
            time.sleep(0.002)
        if proc.poll() is not None:
            proc.communicate()
            continue
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole process group
        err = proc.communicate(timeout=60)[1].decode()
        if proc.returncode != 0:
            break
    else:
        pytest.fail("no run of the ingest was interrupted by Ctrl-C in 5 attempts")
    assert proc.returncode == 130 and no_traceback(err) and len(err.strip().splitlines()) <= 3, err
    assert main([*_pt_args(cache), "--out", str(out)]) == 0
    assert_same_store(out, clean_stores["raw"])


@pytest.mark.parametrize("point", ["reading", "store creation"])
def test_sigkill_of_robot_ingest_then_rerun_equals_an_uninterrupted_run(tmp_path: Path, point: str) -> None:
    robot_csvs(tmp_path / "csv", {f"ep_{i:03d}": 40 for i in range(150)})
    killed, clean = tmp_path / "killed.vla", tmp_path / "clean.vla"
    args = ["ingest", "robot", str(tmp_path / "csv"), "--workers", "2", "-q", "--series", "state=joint_*"]

    def creating() -> bool:  # or just created, should a loaded machine miss the short-lived build folder
        return killed.exists() or any(n.startswith(".killed.vla.creating-") for n in os.listdir(tmp_path))

    def ready(p: subprocess.Popen) -> bool:
        return (bool(children(p.pid)) or creating()) if point == "reading" else creating()

    proc = kill_when([*args, "--out", str(killed)], ready)
    assert proc.returncode == -signal.SIGKILL
    settled(tmp_path, proc)
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(clean)]) == 0
    assert_same_store(killed, clean)
    assert sorted(os.listdir(tmp_path)) == ["clean.vla", "csv", "killed.vla"]


# ----------------------------------------------------------------- bad inputs: .pt caches


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _save(path: Path, obj: object) -> None:
    torch.save(obj, path)


def _edit_pickle(path: Path, edit) -> None:  # noqa: ANN001
    path.write_bytes(
        raw_zip([(n, edit(d) if n.endswith("data.pkl") else d) for n, d in pt_records(torch.randn(1, 16).bfloat16())])
    )


def _zip64_bomb(path: Path) -> None:
    records = pt_records(torch.zeros(1, 16).bfloat16())
    bomb = deflate_bomb(4)
    records = [(n, bomb if n.endswith("data/0") else d) for n, d in records]
    name = next(n for n, _ in records if n.endswith("data/0"))
    path.write_bytes(raw_zip(records, zip64=True, method=8, declared={name: 4 << 30}))


def _legacy_huge(path: Path) -> None:
    torch.save(torch.randn(1, 16).bfloat16(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"K\x10N", b"J\x00\x00\x00\x40N", 1))


BAD_PT = {
    # file name: (how to make it, reason it is skipped with)
    "ep_c_vlm0.pt": (_fifo, "not-a-regular-file"),
    "ep_c_vlm1.pt": (lambda p: p.mkdir(), "not-a-regular-file"),
    "ep_c_vlm2.pt": (_socket, "not-a-regular-file"),
    "ep_c_vlm3.pt": (lambda p: p.symlink_to(p.parent / "gone.pt"), "dangling-symlink"),
    "ep_c_vlm4.pt": (lambda p: p.symlink_to(p.name), "symlink-loop"),
    "ep_c_vlm5.pt": (lambda p: p.write_bytes(p.parent.joinpath("ep_a_vlm0.pt").read_bytes()[:-6]), "truncated"),
    "ep_c_vlm6.pt": (lambda p: (_save(p, torch.randn(1, 16).bfloat16()), os.truncate(p, 6 << 30)), "too-large"),
    "ep_c_vlm7.pt": (_zip64_bomb, "corrupt"),
    "ep_c_vlm8.pt": (lambda p: _edit_pickle(p, lambda d: b"\x80\x02K\x01r\xff\xff\xff\x03."), "corrupt"),
    "ep_c_vlm9.pt": (_legacy_huge, "corrupt"),
    "ep_c_vlm10.pt": (
        lambda p: _edit_pickle(p, lambda d: b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R."),
        "unsafe-pickle",
    ),
    "ep_c_vlm11.pt": (lambda p: _save(p, torch.randn(1, 1).bfloat16().expand(1, 16)), "corrupt"),
    "ep_c_vlm12.pt": (lambda p: _edit_pickle(p, lambda d: d.replace(b"K\x10t", b"M\xff\xfft", 1)), "corrupt"),
    "ep_c_vlm13.pt": (
        lambda p: _edit_pickle(p, lambda d: b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."),
        "no-tensor",
    ),
    "ep_c_vlm14.pt": (
        lambda p: _save(p, {"features": torch.randn(1, 16).bfloat16(), "x": RunsCode(str(p.parent.parent / "PWNED"))}),
        "unsafe-pickle",
    ),
    "ep_c_vlm99999999999.pt": (lambda p: _save(p, torch.randn(1, 16).bfloat16()), "index-out-of-range"),
    f"ep_c_vlm{'9' * 200}.pt": (lambda p: _save(p, torch.randn(1, 16).bfloat16()), "index-out-of-range"),
    "ep_c_vlm15.pt": (lambda p: p.symlink_to("/dev/zero"), "not-a-regular-file"),  # endless if it were read
    os.fsdecode(b"ep_\xff_vlm0.pt"): (lambda p: _save(p, torch.randn(1, 16).bfloat16()), "bad-name"),
}


@pytest.fixture
def hostile_cache(tmp_path: Path) -> tuple[Path, dict]:
    cache = tmp_path / "cache"
    values = make_pt_cache(cache, {"ep_a": 20, "ep_b": 20})
    for name, (make, _) in BAD_PT.items():
        make(cache / name)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    values[("ep_d", 0)] = torch.randn(1, 16).bfloat16()
    torch.save(values[("ep_d", 0)], outside / "real.pt")
    (cache / "ep_d_vlm0.pt").symlink_to(outside / "real.pt")  # read, and noted
    _fifo(cache / "notes.txt")  # not a .pt: never opened
    return cache, values


@pytest.mark.parametrize("scan", ["fast", "full"])
def test_hostile_pt_cache_each_bad_file_skipped_with_its_reason(
    tmp_path: Path, hostile_cache: tuple, scan: str
) -> None:
    cache, values = hostile_cache
    out, report = tmp_path / "out" / "s.vla", tmp_path / "out" / "r.json"
    out.parent.mkdir()
    before = snapshot(tmp_path)
    run = run_cli(
        [
            "ingest",
            "pt-cache",
            str(cache),
            "--out",
            str(out),
            "--workers",
            "2",
            "-q",
            "--verify",
            "--report-json",
            str(report),
            *(["--full-scan"] if scan == "full" else []),
        ],
        limit_as=LIMIT_AS,
    )
    assert run.code == 0, run.err
    assert no_traceback(run.err) and run.peak_rss < PEAK_RSS, (run.err, run.peak_rss)
    assert reasons(report) == {name: reason for name, (_, reason) in BAD_PT.items()}
    store = VLAStore.open(out)
    for (episode, index), tensor in values.items():
        assert torch.equal(store.feature("vl_features", episode, index), tensor[0])
    data = json.loads(report.read_text())
    assert data["files_ingested"] == len(values) and data["verify"]["ok"]
    assert len(data["outside_links"]) == 2 and any("lead outside" in n for n in data["notes"])
    assert not (tmp_path / "PWNED").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if "/out" not in k} == {
        k: v for k, v in before.items() if "/out" not in k
    }


def test_links_leading_outside_are_skipped_on_request(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 3})
    (tmp_path / "x").mkdir()
    torch.save(torch.randn(1, 16).bfloat16(), tmp_path / "x" / "y.pt")
    (cache / "ep_a_vlm3.pt").symlink_to(tmp_path / "x" / "y.pt")
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(cache),
                "--out",
                str(tmp_path / "s.vla"),
                "-q",
                "--skip-outside-links",
                "--report-json",
                str(report),
            ]
        )
        == 0
    )
    assert reasons(report) == {"ep_a_vlm3.pt": "outside-source"}


def test_unreadable_file_is_skipped_with_its_reason(tmp_path: Path) -> None:
    if os.geteuid() == 0 and not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("root reads any file; setpriv (util-linux) is needed to drop that")
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 4})
    (cache / "ep_a_vlm2.pt").chmod(0)
    report = tmp_path / "r.json"
    run = run_cli(
        ["ingest", "pt-cache", str(cache), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(report)],
        drop_file_caps=os.geteuid() == 0,
    )
    assert run.code == 0 and no_traceback(run.err), run.err
    assert reasons(report) == {"ep_a_vlm2.pt": "unreadable"}


# ----------------------------------------------------------------- bad inputs: robot data


def test_hostile_csv_folder(tmp_path: Path) -> None:
    csv = tmp_path / "csv"
    robot_csvs(csv, {f"ep_{i}": 9 for i in range(4)})
    _fifo(csv / "ep_fifo.csv")
    (csv / "ep_dup.csv").write_text("joint_0,joint_0\n1,2\n")
    (csv / "ep_latin1.csv").write_bytes("time_str,joint_0\n\xe9t\xe9,1\n".encode("latin-1"))
    (csv / "ep_dangling.csv").symlink_to(csv / "gone.csv")
    (csv / "ep_loop.csv").symlink_to("ep_loop.csv")
    (csv / "ep_dir.csv").mkdir()
    (csv / "ep_big.csv").write_text("a\n1\n")
    os.truncate(csv / "ep_big.csv", 2 << 30)  # sparse 2 GiB: over the 1 GiB limit, never read
    (tmp_path / "elsewhere").mkdir()
    robot_csvs(tmp_path / "elsewhere", {"ep_far": 9})
    (csv / "ep_far.csv").symlink_to(tmp_path / "elsewhere" / "ep_far.csv")
    before = snapshot(tmp_path)
    report = tmp_path / "out" / "r.json"
    report.parent.mkdir()
    run = run_cli(
        ["ingest", "robot", str(csv), "--out", str(tmp_path / "out" / "s.vla"), "-q", "--report-json", str(report)],
        limit_as=LIMIT_AS,
    )
    assert run.code == 0 and no_traceback(run.err), run.err
    got = reasons(report)
    assert got == {
        "ep_fifo.csv": "not-a-regular-file",
        "ep_dup.csv": "bad-series",
        "ep_latin1.csv": "bad-series",
        "ep_dangling.csv": "dangling-symlink",
        "ep_loop.csv": "symlink-loop",
        "ep_dir.csv": "not-a-regular-file",
        "ep_big.csv": "too-large",
    }
    problems = json.loads(report.read_text())["problems"]
    assert any("'joint_0' twice" in p["message"] for p in problems)
    assert VLAStore.open(tmp_path / "out" / "s.vla").datasets == ("ep_0", "ep_1", "ep_2", "ep_3", "ep_far")
    assert len(json.loads(report.read_text())["outside_links"]) == 1
    assert {k: v for k, v in snapshot(tmp_path).items() if "/out" not in k} == {
        k: v for k, v in before.items() if "/out" not in k
    }


def _npz_declaring(path: Path, shape: tuple[int, ...]) -> None:
    """An NPZ whose 'joint_0' header declares ``shape`` while its member holds 8 bytes."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("joint_0.npy", header.getvalue() + bytes(8))


def test_hostile_npz_folder(tmp_path: Path) -> None:
    folder = tmp_path / "npz"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"ep_{i}.npz", joint_0=np.arange(5.0), gripper=np.ones(5))
    _npz_declaring(folder / "ep_tib.npz", (1 << 37,))  # 1 TiB declared
    np.save(folder / "ep_npy.npy", np.arange(5.0))
    os.rename(folder / "ep_npy.npy", folder / "ep_npy.npz")  # a .npy, not a zip
    _fifo(folder / "ep_fifo.npz")
    bomb = deflate_bomb(2)[: 8 << 20]  # inflates to 1 GiB and more: declared 2 GiB, over the limit, never inflated
    (folder / "ep_bomb.npz").write_bytes(raw_zip([("joint_0.npy", bomb)], method=8, declared={"joint_0.npy": 2 << 30}))
    report = tmp_path / "r.json"
    run = run_cli(
        ["ingest", "robot", str(folder), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(report)],
        limit_as=LIMIT_AS,
    )
    assert run.code == 0 and no_traceback(run.err) and run.peak_rss < PEAK_RSS, run.err
    got = reasons(report)
    assert got == {
        "ep_tib.npz": "bad-series",
        "ep_npy.npz": "bad-series",
        "ep_fifo.npz": "not-a-regular-file",
        "ep_bomb.npz": "too-large",
    }
    assert any("declares shape" in p["message"] for p in json.loads(report.read_text())["problems"])
    assert VLAStore.open(tmp_path / "s.vla").datasets == ("ep_0", "ep_1", "ep_2")


def test_hostile_robomimic_file(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py", reason="pip install vlastore[hdf5]")
    (tmp_path / "elsewhere").mkdir()
    with h5py.File(tmp_path / "elsewhere" / "far.hdf5", "w") as far:
        far["actions"] = np.ones((4, 2))
    (tmp_path / "data").mkdir()
    _fifo(tmp_path / "data" / "pipe.hdf5")
    path = tmp_path / "data" / "demo.hdf5"
    with h5py.File(path, "w") as f:
        for n in (0, 1):
            f[f"data/demo_{n}/actions"] = np.full((5, 2), float(n))
        f["data/demo_2/actions"] = np.float64(3.0)  # 0-d
        f.create_dataset("data/demo_3/actions", shape=(300_000_000, 2), dtype="f8", chunks=(1024, 2))  # 4.8 GB
        f["data/demo_4/actions"] = h5py.ExternalLink("../elsewhere/far.hdf5", "actions")  # outside: read, noted
        f["data/demo_5/actions"] = h5py.ExternalLink("pipe.hdf5", "actions")  # a FIFO: never opened
        f.create_dataset("data/demo_6/actions", shape=(20_000_000, 2), dtype="f8", chunks=(1024, 2))  # never written
    report = tmp_path / "r.json"
    run = run_cli(
        ["ingest", "robot", str(path), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(report)],
        limit_as=LIMIT_AS,
    )
    assert run.code == 0 and no_traceback(run.err) and run.peak_rss < PEAK_RSS, run.err
    problems = {p["path"].rsplit(":", 1)[1]: p["reason"] for p in json.loads(report.read_text())["problems"]}
    assert problems == {
        "data/demo_2": "bad-series",
        "data/demo_3": "too-large",
        "data/demo_5": "not-a-regular-file",
        "data/demo_6": "bad-series",
    }
    assert any("stores 0 bytes" in p["message"] for p in json.loads(report.read_text())["problems"])
    data = json.loads(report.read_text())
    assert len(data["outside_links"]) == 1 and "far.hdf5" in data["outside_links"][0]
    assert VLAStore.open(tmp_path / "s.vla").datasets == ("demo_0", "demo_1", "demo_4")


@pytest.mark.parametrize("kind", ["truncated", "not hdf5", "fifo", "zero-d only"])
def test_unusable_hdf5_file_exits_1_with_its_reason(tmp_path: Path, kind: str) -> None:
    h5py = pytest.importorskip("h5py", reason="pip install vlastore[hdf5]")
    path = tmp_path / "demo.h5"
    if kind == "fifo":
        _fifo(path)
    elif kind == "not hdf5":
        path.write_bytes(b"just text\n" * 100)
    else:
        with h5py.File(path, "w") as f:
            f["data/demo_0/actions"] = np.float64(1.0) if kind == "zero-d only" else np.ones((500, 7))
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:3000])
    report = tmp_path / "r.json"
    run = run_cli(
        ["ingest", "robot", str(path), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(report)], timeout=60
    )
    assert run.code == 1 and no_traceback(run.err), run.err
    assert "nothing was ingested" in run.err
    expected = "not-a-regular-file" if kind == "fifo" else "bad-series"
    assert set(reasons(report).values()) == {expected} and not (tmp_path / "s.vla").exists()


# ----------------------------------------------------------------- bad inputs: names, usage, nothing to ingest


def _robot_store(tmp_path: Path, *options: str) -> Path:
    robot_csvs(tmp_path / "csv", {"ep_a": 9, "ep_b": 7})
    store = tmp_path / "s.vla"
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(store), "-q", *options]) == 0
    return store


def test_out_onto_an_existing_store_is_a_usage_mistake_naming_into(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    store = _robot_store(tmp_path)
    make_pt_cache(tmp_path / "cache", {"ep_a": 3, "ep_b": 3})
    capsys.readouterr()
    assert main(["ingest", "pt-cache", str(tmp_path / "cache"), "--out", str(store), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--into {store}" in err and len(err.strip().splitlines()) == 1
    assert main(["ingest", "pt-cache", str(tmp_path / "cache"), "--into", str(store), "-q"]) == 0


def test_robot_into_a_format_1_store_upgrades_it_then_appends(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A store made by an older vlastore (format 1) takes appends: the first change upgrades it in place."""
    store = _robot_store(tmp_path, "--format-version", "1")
    before = VLAStore.open(store)
    robot_csvs(tmp_path / "more", {"ep_c": 4})
    capsys.readouterr()
    shutil.copy(tmp_path / "csv" / "ep_b.csv", tmp_path / "more" / "ep_b.csv")  # recorded again, unchanged
    assert main(["ingest", "robot", str(tmp_path / "more"), "--into", str(store)]) == 0
    out = capsys.readouterr().out
    assert "upgraded from format 1" in out and "1 episode(s) appended, 1 already there with the same data" in out
    after = VLAStore.open(store)
    assert after.format_version == 2 and after.datasets == (*before.datasets, "ep_c")
    old = VLAStore.open(store, snapshot=0)  # what a run that trained on the format-1 store recorded
    assert old.datasets == before.datasets
    key = before.series_keys[0]
    for name in before.datasets:
        np.testing.assert_array_equal(old.series(key, name), before.series(key, name))
    assert main(["rm", str(store), "nope"]) == 2 and main(["rm", str(store), "ep_a"]) == 0
    assert VLAStore.open(store).datasets == ("ep_b", "ep_c") and main(["verify", "-q", str(store)]) == 0


def test_a_living_store_made_by_ingest_takes_appends(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Issue 11: `ingest robot --out` then `--into` with new episodes (drop the option once 2 is the default)."""
    store = _robot_store(tmp_path, "--format-version", "2")
    robot_csvs(tmp_path / "more", {"ep_c": 4})
    assert main(["ingest", "robot", str(tmp_path / "more"), "--into", str(store), "-q"]) == 0
    opened = VLAStore.open(store)
    assert opened.format_version == 2 and opened.datasets == ("ep_a", "ep_b", "ep_c")
    assert opened.series(opened.series_keys[0], "ep_c").shape[0] == 4
    assert main(["rm", str(store), "ep_a"]) == 0 and main(["verify", "-q", str(store)]) == 0
    assert VLAStore.open(store).datasets == ("ep_b", "ep_c")


@pytest.mark.parametrize("case", ["unknown episodes", "hash names without mapping", "empty folder"])
def test_nothing_ingested_exits_1_saying_why(tmp_path: Path, capsys, case: str) -> None:  # noqa: ANN001
    cache = tmp_path / "cache"
    cache.mkdir()
    args = ["ingest", "pt-cache", str(cache), "-q"]
    if case == "unknown episodes":
        store = _robot_store(tmp_path)
        make_pt_cache(cache, {"ep_x": 2, "ep_y": 2})
        args += ["--into", str(store)]
        expected = ["catalog", "ingest their robot data first"]
    elif case == "hash names without mapping":
        for i in range(3):
            torch.save(torch.randn(1, 8), cache / f"{i:024x}.pt")
        args += ["--out", str(tmp_path / "new.vla")]
        expected = ["{dataset}_vlm{idx}.pt", "--mapping"]
    else:
        args += ["--out", str(tmp_path / "new.vla")]
        expected = ["no .pt files"]
    capsys.readouterr()
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "nothing was ingested" in captured.err and all(e in captured.err for e in expected), captured.err
    assert "no usable tensor" not in captured.out + captured.err
    assert not (tmp_path / "new.vla").exists()
    assert main([*args, "--dry-run"]) == 1


def test_rerun_on_an_intact_store_reports_its_real_size(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    make_pt_cache(tmp_path / "cache", {"ep_a": 5})
    args = [
        "ingest",
        "pt-cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "s.vla"),
        "-q",
        "--report-json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    first = json.loads((tmp_path / "r.json").read_text())["store_after"]
    assert main(args) == 0
    again = json.loads((tmp_path / "r.json").read_text())
    assert first["files"] > 0 and again["store_before"] == again["store_after"] == first
    assert f"in {first['files']:,} files; after:" in capsys.readouterr().out
    make_pt_cache(tmp_path / "other", {"ep_x": 2})  # nothing to write into it: the report still measures it
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(tmp_path / "other"),
                "--into",
                str(tmp_path / "s.vla"),
                "-q",
                "--report-json",
                str(tmp_path / "r.json"),
            ]
        )
        == 1
    )
    assert json.loads((tmp_path / "r.json").read_text())["store_after"] == first


@pytest.mark.parametrize("name", ["a**b.vla", "x[1].vla", "star*.vla", "q?.vla"])
def test_output_names_with_glob_characters(tmp_path: Path, name: str) -> None:
    make_pt_cache(tmp_path / "cache", {"ep_a": 3})
    (tmp_path / f".{name}.creating-1-deadbeef").mkdir()  # a killed run's leftover (pid 1 is alive: kept)
    assert main(["ingest", "pt-cache", str(tmp_path / "cache"), "--out", str(tmp_path / name), "-q"]) == 0
    assert VLAStore.open(tmp_path / name).coverage("vl_features").all()


@pytest.mark.parametrize(
    "case",
    [
        "mapping fifo",
        "report fifo",
        "manifest fifo",
        "workers",
        "reuse",
        "pattern",
        "into missing",
        "robot source missing",
        "max size",
    ],
)
def test_usage_mistakes_exit_2_naming_the_fix(tmp_path: Path, capsys, case: str) -> None:  # noqa: ANN001
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 2})
    base = ["ingest", "pt-cache", str(cache), "--out", str(tmp_path / "s.vla"), "-q"]
    _fifo(tmp_path / "pipe")
    args = {
        "mapping fifo": [*base, "--mapping", str(tmp_path / "pipe")],
        "report fifo": [*base, "--report-json", str(tmp_path / "pipe")],
        "manifest fifo": [
            "ingest",
            "vggt",
            str(cache),
            "--out",
            str(tmp_path / "v.vla"),
            "--manifest",
            str(tmp_path / "pipe"),
            "-q",
        ],
        "workers": [*base, "--workers", "-1"],
        "reuse": [*base, "--vlm-reuse-count", "0"],
        "pattern": [*base, "--pattern", "(unclosed"],
        "into missing": ["ingest", "pt-cache", str(cache), "--into", str(tmp_path / "nope.vla"), "-q"],
        "robot source missing": ["ingest", "robot", str(tmp_path / "nope"), "--out", str(tmp_path / "r.vla"), "-q"],
    }
    if case == "max size":
        with pytest.raises(SystemExit) as exc:
            main([*base, "--max-file-size", "lots"])
        assert exc.value.code == 2
        return
    capsys.readouterr()
    assert main(args[case]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlastore ingest: error:") and len(err.strip().splitlines()) == 1, err


def test_mapping_csv_with_a_repeated_column_is_refused_naming_it(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(torch.randn(1, 8), cache / "00aa.pt")
    (tmp_path / "map.csv").write_text("file,dataset,vlm_idx,dataset\n00aa.pt,ep_a,0,ep_b\n")
    assert (
        main(
            [
                "ingest",
                "pt-cache",
                str(cache),
                "--out",
                str(tmp_path / "s.vla"),
                "-q",
                "--mapping",
                str(tmp_path / "map.csv"),
            ]
        )
        == 1
    )
    assert "'dataset' twice" in capsys.readouterr().err


def test_vggt_manifest_that_is_a_fifo_is_noted_not_opened(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "ep_a" / "cam").mkdir(parents=True)
    for i in range(3):
        torch.save({"features": torch.randn(4, 8).half()}, root / "ep_a" / "cam" / f"{i}.png.vggt_cache.pt")
    _fifo(root / "manifest.json")
    report = tmp_path / "r.json"
    run = run_cli(
        ["ingest", "vggt", str(root), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(report)], timeout=60
    )
    assert run.code == 0 and no_traceback(run.err), run.err
    assert any("not a regular file" in n for n in json.loads(report.read_text())["notes"])


# ----------------------------------------------------------------- resources


@pytest.fixture
def tmpfs(tmp_path: Path):  # noqa: ANN201
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def _lines(text: str) -> int:
    return len(text.strip().splitlines())


def test_full_disk_is_a_few_lines_leaves_no_partial_file_and_resumes(tmp_path: Path, tmpfs: Path) -> None:
    make_pt_cache(tmp_path / "cache", {f"ep_{i}": 400 for i in range(4)}, shape=(1, 64))
    args = ["ingest", "pt-cache", str(tmp_path / "cache"), "--workers", "2", "--rows-per-shard", "64", "-q"]
    run = run_cli([*args, "--out", str(tmpfs / "s.vla")])
    assert run.code == 1 and no_traceback(run.err) and _lines(run.err) <= 4, run.err
    assert "No space left on device" in run.err and "rerun the same command" in run.err
    assert not [p for p in tmpfs.rglob("*") if p.name.endswith(".partial")]
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    assert main([*args, "--out", str(tmpfs / "s.vla")]) == 0
    assert main([*args, "--out", str(tmp_path / "clean.vla")]) == 0
    assert_same_store(tmpfs / "s.vla", tmp_path / "clean.vla")


def test_read_only_store_is_a_few_lines(tmp_path: Path, tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    store = _robot_store(tmpfs)
    make_pt_cache(tmp_path / "cache", {"ep_a": 3, "ep_b": 3})
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    run = run_cli(["ingest", "pt-cache", str(tmp_path / "cache"), "--into", str(store), "-q", "--workers", "2"])
    assert run.code == 1 and no_traceback(run.err) and _lines(run.err) <= 4, run.err
    assert "Read-only file system" in run.err


def test_file_size_limit_is_a_few_lines_leaves_no_partial_file(tmp_path: Path) -> None:
    make_pt_cache(tmp_path / "cache", {"ep_a": 600}, shape=(1, 64))
    args = [
        "ingest",
        "pt-cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "s.vla"),
        "--workers",
        "2",
        "-q",
        "--rows-per-shard",
        "512",
    ]
    run = run_cli(args, limit_fsize=48 << 10)  # a shard of 512 rows is 68 KiB
    assert run.code == 1 and no_traceback(run.err) and _lines(run.err) <= 4, run.err
    assert "File too large" in run.err and "ulimit -f" in run.err
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]
    assert main(args) == 0
    assert VLAStore.open(tmp_path / "s.vla").coverage("vl_features").all()


def test_concurrent_runs_of_one_command_never_print_tracebacks(tmp_path: Path, cache: Path, clean_stores: dict) -> None:
    out = tmp_path / "s.vla"
    args = [sys.executable, "-m", "vlastore", *_pt_args(cache), "--out", str(out)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        err = proc.communicate(timeout=120)[1].decode()
        assert proc.returncode in (0, 1) and no_traceback(err) and _lines(err) <= 4, err
    assert main([*_pt_args(cache), "--out", str(out)]) == 0
    assert_same_store(out, clean_stores["raw"])


@pytest.mark.parametrize("failures", [2, 100])
def test_transient_read_errors_are_retried_then_left_pending_for_a_rerun(
    tmp_path: Path,
    monkeypatch,  # noqa: ANN001
    failures: int,
) -> None:
    cache = tmp_path / "cache"
    make_pt_cache(cache, {"ep_a": 64, "ep_b": 64})
    victim, attempts = str(cache / "ep_a_vlm5.pt"), tmp_path / "attempts"
    real_open = ptfile.open_regular

    def flaky_open(path, *args, **kwargs):  # noqa: ANN001, ANN202 - EIO from the disk, as a NFS hiccup gives
        if str(path) == victim:
            with open(attempts, "ab") as f:  # counted across the forked workers
                f.write(b".")
            if attempts.stat().st_size <= failures:
                raise classify_os_error(path, OSError(errno.EIO, "Input/output error", str(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ptfile, "open_regular", flaky_open)
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
        "16",
        "--report-json",
        str(tmp_path / "r.json"),
    ]
    store = tmp_path / "s.vla"
    if failures == 2:  # fewer than the retries: nobody notices
        assert main(args) == 0 and reasons(tmp_path / "r.json") == {}
        assert VLAStore.open(store).coverage("vl_features").all()
        return
    assert main(args) == 1
    assert reasons(tmp_path / "r.json") == {"ep_a_vlm5.pt": "transient-error"}
    written = shards(store)
    assert len(written) == 8 - 1 and VLAStore.open(store).coverage("vl_features").sum() == 128 - 16
    monkeypatch.setattr(ptfile, "open_regular", real_open)  # the disk recovered
    assert main(args) == 0 and reasons(tmp_path / "r.json") == {}
    assert main([*args[:4], str(tmp_path / "clean.vla"), *args[5:]]) == 0
    assert_same_store(store, tmp_path / "clean.vla")
    assert np.array_equal(VLAStore.open(store).reader("vl_features").row(5), bits(torch.load(victim))[0])
