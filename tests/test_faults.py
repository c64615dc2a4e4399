"""Fault suite: crashes, corruption, malicious stores, concurrency and resource exhaustion.

Every case runs the real thing: real files, real subprocesses killed with SIGKILL, real FIFOs and
symlinks, a real tmpfs (when root) and a real RLIMIT_FSIZE. The contract checked everywhere: a
damaged store is reported (verify exits 1, naming (dataset, vlm_idx) where it can), reads either
raise a vlastore error or return exactly the values written, nothing outside the store is touched,
nothing hangs, and a resumed run ends bit-identical to an uninterrupted one.

Case counts per class are printed at the end of the module (``pytest -s tests/test_faults.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import as_value, build_full_store, expected_values, plan_writer_store, random_rows, snapshot

from vlastore.cli import main as cli_main
from vlastore.format import FamilySpec, FormatError, GenerationInfo, Manifest, seal
from vlastore.reader import MissingRowError, StaleGenerationError
from vlastore.report import verify_store
from vlastore.shardcodec import ChecksumError
from vlastore.storage import StoreNotFoundError
from vlastore.store import VLAStore

ROOT = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")
ALLOWED = (FormatError, ChecksumError, MissingRowError, StoreNotFoundError, StaleGenerationError)
"""What a read of a damaged store may raise: vlastore's own errors, never a wrong value or a numpy error."""
CASES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    print("\nfault suite cases: " + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())))


# ------------------------------------------------------------------ helpers


def _cli(*args: str) -> tuple[int, str]:
    """Run the CLI in this process (no startup cost); exit code and everything printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue() + err.getvalue()


def _read_everything(path: Path, values: dict[str, object]) -> None:
    """Read every value of the store; each read raises a vlastore error or returns exactly what was written."""
    try:
        store = VLAStore.open(path)
    except ALLOWED:
        return
    for key, expected in values.get("series", {}).items():  # type: ignore[union-attr]
        with contextlib.suppress(*ALLOWED):
            np.testing.assert_array_equal(store.series_all(key), expected)
    for family in ("fixed", "tokens", "packed", "keyed"):
        try:
            reader = store.reader(family)
            rows = store.layout(family).rows
        except ALLOWED:
            continue
        try:  # all rows at once (the batched paths), newest first
            if store.spec(family).ragged:
                for got, want in zip(reader.rows(np.arange(rows)[::-1]), values[family][::-1], strict=True):
                    np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_array_equal(reader.gather(np.arange(rows)[::-1]), np.asarray(values[family])[::-1])
            continue
        except ALLOWED:
            pass
        for row in range(rows):  # something failed: every row that still reads must be exact
            try:
                got = reader.row(row)
            except ALLOWED:
                continue
            np.testing.assert_array_equal(got, values[family][row])  # type: ignore[index]
    with contextlib.suppress(*ALLOWED):
        assert store.keys("keyed") == values["keyed_keys"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """A complete store (4 families: raw bf16, ragged f16, zstd f32, zstd f32 with keys) and its values."""
    path = tmp_path_factory.mktemp("faults") / "pristine.vla"
    store, values = build_full_store(path)
    rows = store.layout("fixed").rows
    keys = [f"img/{i:03d}.jpg" for i in range(rows)]
    store.add_family(
        "keyed",
        FamilySpec((2, 3), "float32", compression="zstd", rows_per_shard=4, vlm_reuse_count=3, has_keys=True),
        keys=keys,
    )
    keyed = random_rows((rows, 2, 3), "float32", seed=9)
    with store.writer("keyed") as writer:
        writer.write_rows(np.arange(rows), keyed)
    values = {
        **values,
        "keyed": keyed,
        "keyed_keys": tuple(keys),
        "series": {k: store.series_all(k) for k in store.series_keys},
    }
    assert verify_store(path).ok
    return path, values


def _copy(pristine_path: Path, tmp_path: Path, name: str = "case.vla") -> Path:
    dest = tmp_path / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pristine_path, dest)
    return dest


FULL_MATRIX = os.environ.get("VLASTORE_FAULTS", "") == "full"
"""VLASTORE_FAULTS=full: five damages per file (flips of the first, last and a random byte, a truncation, a
deletion; about 270 cases, ~75 s here); by default one per file (a flip, a truncation or a deletion, in turn) and
a flip in every shard file (about 65 cases)."""


def _damage_cases(root: Path) -> list[tuple[str, str, object]]:
    """(relative file, kind, argument) for every file of the store: bit flips, truncations, deletions."""
    rng = np.random.default_rng(0)
    cases: list[tuple[str, str, object]] = []
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        rel = str(path.relative_to(root))
        size = path.stat().st_size
        if FULL_MATRIX:
            offsets = sorted({0, size - 1, int(rng.integers(0, size))})  # first and last byte, one at random
            cases += [(rel, "flip", (offset, 1 << int(rng.integers(0, 8)))) for offset in offsets]
            cases += [(rel, "truncate", int(rng.integers(0, size))), (rel, "delete", None)]
        else:  # one damage per file, cycling through the kinds; shard files (rows to name) also get a flip
            flip = (rel, "flip", (int(rng.integers(0, size)), 1 << int(rng.integers(0, 8))))
            cases.append([flip, (rel, "truncate", int(rng.integers(0, size))), (rel, "delete", None)][i % 3])
            if _family_of(rel) is not None and i % 3:
                cases.append(flip)
    return cases


def _apply(root: Path, rel: str, kind: str, arg: object) -> None:
    path = root / rel
    if kind == "flip":
        offset, bit = arg  # type: ignore[misc]
        data = bytearray(path.read_bytes())
        data[offset] ^= bit
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        os.truncate(path, int(arg))  # type: ignore[arg-type]
    else:
        path.unlink()


def _family_of(rel: str) -> str | None:
    parts = rel.split("/")
    return parts[1] if parts[0] == "features" and len(parts) > 4 and parts[3] == "values" and parts[4] == "c" else None


# --------------------------------------------------------------- corruptions


def test_corruption_of_every_file_is_reported_and_never_read_as_a_wrong_value(pristine, tmp_path: Path) -> None:
    """One flipped bit, a truncation or a deletion anywhere: verify reports it, reads never return wrong values."""
    source, values = pristine
    cases = _damage_cases(source)
    unreported = []
    for i, (rel, kind, arg) in enumerate(cases):
        case = _copy(source, tmp_path)
        _apply(case, rel, kind, arg)
        report = verify_store(case)  # never raises
        CASES["corruptions"] += 1
        if report.ok:
            unreported.append((rel, kind, arg))
            continue
        family = _family_of(rel)
        if family is not None:  # shard data or index: the damaged rows are named by (dataset, index)
            named = [c for c in report.corrupt if c.family == family and c.dataset is not None]
            assert named or family in report.missing, (rel, kind, arg, report)
        _read_everything(case, values)
        if i % 9 == 0:  # the command too: exit 1, a report, no traceback
            code, text = _cli("verify", "-q", str(case))
            assert code == 1 and "Traceback" not in text and ("CORRUPT" in text or "MISSING" in text), text
            code, text = _cli("info", str(case))
            assert code in (0, 1) and "Traceback" not in text and "internal error" not in text, text
    assert not unreported, unreported


def test_corrupt_shard_rows_are_named_and_other_rows_still_read(pristine, tmp_path: Path) -> None:
    source, values = pristine
    case = _copy(source, tmp_path)
    store = VLAStore.open(case)
    key = store.shard_key("fixed", 1)
    data = bytearray((case / key).read_bytes())
    data[2 * (8 * 2 + 4) + 3] ^= 0x40  # row 6's payload
    (case / key).write_bytes(bytes(data))
    code, text = _cli("verify", "-q", str(case))
    assert code == 1 and "CORRUPT fixed: ('episode_002', vlm_idx=1) crc32c mismatch" in text
    reader = VLAStore.open(case).reader("fixed")
    with pytest.raises(ChecksumError, match=r"\('episode_002', vlm_idx=1\) is corrupt"):
        reader.gather([5, 6])
    np.testing.assert_array_equal(reader.gather([5, 7]), values["fixed"][[5, 7]])
    CASES["corruptions"] += 1


# ---------------------------------------------------------- malicious stores


def _rewrite_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _reseal_manifest(root: Path, change) -> None:
    """Change the manifest as an attacker would: consistently, with a valid checksum."""

    def edit(meta: dict) -> None:
        manifest = meta["attributes"]["vlastore"]
        change(manifest)
        meta["attributes"]["vlastore"] = seal(manifest)

    _rewrite_json(root / "zarr.json", edit)


def _reseal_generation(root: Path, family: str, change) -> None:
    def edit(meta: dict) -> None:
        info = meta["attributes"]["vlastore_generation"]
        change(info)
        meta["attributes"]["vlastore_generation"] = seal(info)

    _rewrite_json(root / "features" / family / "gen-0001" / "zarr.json", edit)


def _canary(tmp_path: Path) -> Path:
    outside = tmp_path / "victim"
    outside.mkdir(exist_ok=True)
    (outside / "keep.txt").write_text("precious")
    (outside / "gen-0001").mkdir(exist_ok=True)
    (outside / "gen-0001" / "keep.txt").write_text("precious too")
    return outside


def _canary_intact(outside: Path) -> bool:
    return (outside / "keep.txt").read_text() == "precious" and (
        outside / "gen-0001" / "keep.txt"
    ).read_text() == "precious too"


def _manifest_family_escapes(root: Path, tmp_path: Path) -> None:
    def change(m: dict) -> None:
        m["families"]["../../victim"] = m["families"].pop("fixed")

    _reseal_manifest(root, change)


def _manifest_series_escapes(root: Path, tmp_path: Path) -> None:
    def change(m: dict) -> None:
        m["series"]["../../victim/keep.txt"] = m["series"].pop("state")

    _reseal_manifest(root, change)


def _huge_episode_rows(root: Path, tmp_path: Path) -> None:
    """episode_rows ending in 1e12, with generation attributes to match (a consistent, crafted store)."""
    store = VLAStore.open(root, writable=True)
    rows = np.asarray([0, 3, 5, 8, 10**12], dtype=np.int64)
    store.nodes.write_small_array("features/fixed/gen-0001/episode_rows", rows)
    _reseal_generation(root, "fixed", lambda g: g.update(rows=10**12, capacity=10**12))


def _huge_row_shape(root: Path, tmp_path: Path) -> None:
    _reseal_generation(root, "fixed", lambda g: g["spec"].update(row_shape=[10**9]))
    _rewrite_json(root / "features/fixed/gen-0001/values/zarr.json", lambda m: m.update(shape=[9, 10**9]))


def _huge_rows_per_shard(root: Path, tmp_path: Path) -> None:
    _reseal_generation(root, "fixed", lambda g: g["spec"].update(rows_per_shard=1 << 40))


def _negative_episode_rows(root: Path, tmp_path: Path) -> None:
    store = VLAStore.open(root, writable=True)
    store.nodes.write_small_array("features/fixed/gen-0001/episode_rows", np.asarray([0, 3, -2, 8, 9], dtype=np.int64))


def _huge_steps(root: Path, tmp_path: Path) -> None:
    _reseal_manifest(root, lambda m: m.update(steps=1 << 40))


def _index_claims_huge_chunk(root: Path, tmp_path: Path) -> None:
    """A shard whose index (with a valid crc) points far past the file's end."""
    from vlastore.shardcodec import crc32c, index_nbytes

    path = root / "features/fixed/gen-0001/values/c/0/0"
    data = bytearray(path.read_bytes())
    n = index_nbytes(4)
    index = np.frombuffer(bytes(data[-n:-4]), dtype="<u8").copy().reshape(4, 2)
    index[1] = (0, 1 << 40)
    raw = index.tobytes()
    data[-n:] = raw + crc32c(raw).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _zstd_claims_huge_size(root: Path, tmp_path: Path) -> None:
    """A compressed chunk (crc valid) whose zstd frame declares 1 TiB."""
    from numcodecs import Zstd

    from vlastore.shardcodec import crc32c, decode_index, index_nbytes

    path = root / "features/packed/gen-0001/values/c/0/0"
    data = path.read_bytes()
    index = decode_index(data[-index_nbytes(3) :], 3)
    frame = bytearray(Zstd(level=3).encode(np.zeros(32, np.uint8).tobytes()))
    # rewrite the frame header to declare 2**40 bytes (8-byte content size field)
    frame = bytearray(frame[:4]) + bytes([0xC0]) + bytes([0x58]) + (1 << 40).to_bytes(8, "little") + frame[6:]
    blob = bytes(frame) + crc32c(bytes(frame)).to_bytes(4, "little")
    offsets, nbytes = index.offsets.copy(), index.nbytes.copy()
    body = bytearray()
    for chunk in range(3):
        piece = blob if chunk == 0 else data[int(offsets[chunk]) : int(offsets[chunk] + nbytes[chunk])]
        offsets[chunk], nbytes[chunk] = len(body), len(piece)
        body += piece
    raw = np.stack([offsets, nbytes], axis=1).astype("<u8").tobytes()
    path.write_bytes(bytes(body) + raw + crc32c(raw).to_bytes(4, "little"))


def _fifo_shard(root: Path, tmp_path: Path) -> None:
    path = root / "features/fixed/gen-0001/values/c/1/0"
    path.unlink()
    os.mkfifo(path)


def _fifo_metadata(root: Path, tmp_path: Path) -> None:
    path = root / "features/fixed/gen-0001/zarr.json"
    path.unlink()
    os.mkfifo(path)


def _fifo_array_meta(root: Path, tmp_path: Path) -> None:
    path = root / "series/state/zarr.json"
    path.unlink()
    os.mkfifo(path)


def _fifo_catalog_chunk(root: Path, tmp_path: Path) -> None:
    path = root / "episodes/steps/c/0"
    path.unlink()
    os.mkfifo(path)


def _fifo_root(root: Path, tmp_path: Path) -> None:
    path = root / "zarr.json"
    path.unlink()
    os.mkfifo(path)


def _symlink_shard_out(root: Path, tmp_path: Path) -> None:
    outside = _canary(tmp_path)
    path = root / "features/fixed/gen-0001/values/c/1/0"
    shutil.copy(path, outside / "shard")
    path.unlink()
    path.symlink_to(outside / "shard")


def _symlink_chunk_dir_out(root: Path, tmp_path: Path) -> None:
    outside = _canary(tmp_path)
    values_c = root / "features/packed/gen-0001/values/c"
    shutil.copytree(values_c, outside / "c")
    shutil.rmtree(values_c)
    values_c.symlink_to(outside / "c")


def _symlink_generation_out(root: Path, tmp_path: Path) -> None:
    """A generation folder that is a link to a folder outside: switch/delete must not remove what it points to."""
    outside = _canary(tmp_path)
    gen = root / "features/fixed/gen-0001"
    shutil.copytree(gen, outside / "gen-copy")
    shutil.rmtree(gen)
    gen.symlink_to(outside / "gen-copy")


MALICIOUS = {
    "family-name-walks-out": _manifest_family_escapes,
    "series-key-walks-out": _manifest_series_escapes,
    "episode-rows-1e12": _huge_episode_rows,
    "row-shape-1e9": _huge_row_shape,
    "rows-per-shard-2**40": _huge_rows_per_shard,
    "negative-episode-rows": _negative_episode_rows,
    "steps-2**40": _huge_steps,
    "index-claims-huge-chunk": _index_claims_huge_chunk,
    "zstd-claims-1-TiB": _zstd_claims_huge_size,
    "fifo-shard": _fifo_shard,
    "fifo-generation-zarr.json": _fifo_metadata,
    "fifo-array-zarr.json": _fifo_array_meta,
    "fifo-catalog-chunk": _fifo_catalog_chunk,
    "fifo-root-zarr.json": _fifo_root,
    "symlink-shard-out": _symlink_shard_out,
    "symlink-chunk-dir-out": _symlink_chunk_dir_out,
    "symlink-generation-out": _symlink_generation_out,
}


class _FifoGuard:
    """Opens every FIFO of a folder for writing after a delay, so code that wrongly blocks on one wakes up
    (and the test fails on the time it took) instead of hanging the suite."""

    def __init__(self, root: Path, delay: float = 8.0) -> None:
        self.fifos = [p for p in root.rglob("*") if p.is_fifo()]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(delay,), daemon=True)
        self.thread.start()

    def _run(self, delay: float) -> None:
        if self.stop.wait(delay):
            return
        for fifo in self.fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    def close(self) -> None:
        self.stop.set()


@pytest.mark.parametrize("attack", list(MALICIOUS), ids=list(MALICIOUS))
def test_malicious_store_is_refused_cleanly_and_touches_nothing_outside(pristine, tmp_path: Path, attack: str) -> None:
    source, values = pristine
    case = _copy(source, tmp_path)
    outside = _canary(tmp_path)
    MALICIOUS[attack](case, tmp_path)
    before_outside = snapshot(tmp_path / "victim")
    guard = _FifoGuard(case)
    started = time.monotonic()
    try:
        report = verify_store(case)
        assert not report.ok, attack
        code, text = _cli("verify", "-q", str(case))
        assert code == 1 and "Traceback" not in text and "internal error" not in text, text
        code, text = _cli("info", str(case))
        assert code in (0, 1) and "Traceback" not in text and "internal error" not in text, text
        _read_everything(case, values)
        with contextlib.suppress(*ALLOWED):  # what a writer does with it: refuse, or stay inside the store
            store = VLAStore.open(case, writable=True)
            for family in store.families:
                with contextlib.suppress(*ALLOWED):
                    store.new_generation(family, store.generation(family).producer)
                    store.switch_generation(family, max(store.manifest.families[family].generations), keep_previous=0)
    finally:
        guard.close()
    assert time.monotonic() - started < 6, "something blocked on a FIFO"
    assert _canary_intact(outside)
    assert snapshot(tmp_path / "victim") == before_outside
    CASES["malicious stores"] += 1


def test_malicious_names_in_a_manifest_are_refused_on_load() -> None:
    base = Manifest(1, "0.2", "now", 1, 3).to_dict()
    for field, bad in [
        ("families", {"../../victim": {"current_generation": 1, "generations": [1]}}),
        ("families", {"ok": {"current_generation": 1, "generations": [1, 1]}}),
        ("families", {"ok": {"current_generation": 0, "generations": [0]}}),
        ("series", {"a/b": {"columns": ["x"], "dtype": "float32"}}),
        ("series", {"s": {"columns": ["x"], "dtype": "object"}}),
        ("episodes", -1),
        ("steps", "12"),
    ]:
        with pytest.raises(FormatError, match="test.vla"):
            Manifest.from_dict(seal({**base, field: bad}), where="test.vla")
        CASES["malicious stores"] += 1
    spec = {"row_shape": [8], "dtype": "float32", "rows_per_shard": 4, "index_name": "../x"}
    with pytest.raises(FormatError, match="index_name"):
        GenerationInfo.from_dict(seal({"generation": 1, "spec": spec, "rows": 1, "capacity": 1}))
    CASES["malicious stores"] += 1


# -------------------------------------------------------------- crash points


def _writer_rank(store_path: str, rank: int, world: int, ready, step_delay: float) -> None:
    """One rank writing its rows of ``fixed`` and ``tokens`` in small batches, reporting each step."""
    store = VLAStore.open(store_path, writable=True)
    values = expected_values(store)
    step = 0
    for family, dtype in (("fixed", "bfloat16"), ("tokens", "float16")):
        with store.writer(family, rank=rank, world_size=world) as writer:
            rows = writer.pending_rows()
            for lo in range(0, len(rows), 3):
                batch = rows[lo : lo + 3]
                writer.write_rows(batch, [as_value(values[family][r], dtype) for r in batch.tolist()])
                step += 1
                ready.send(step)
                time.sleep(step_delay)
    ready.send("done")


def _reference_store(tmp_path: Path) -> Path:
    path = tmp_path / "reference.vla"
    store = plan_writer_store(path)
    values = expected_values(store)
    for family, dtype in (("fixed", "bfloat16"), ("tokens", "float16")):
        with store.writer(family) as writer:
            rows = writer.pending_rows()
            writer.write_rows(rows, [as_value(values[family][r], dtype) for r in rows.tolist()])
    return path


def _shard_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(root).items() if "/values/c/" in k and not k.endswith(".partial")}


@pytest.mark.parametrize(("world", "kill_after"), [(1, 1), (2, 2), (3, 1), (3, 4), (4, 3)])
def test_crash_sigkill_during_multi_rank_writes_then_resume_bit_exactly(
    tmp_path: Path, world: int, kill_after: int
) -> None:
    reference = _reference_store(tmp_path)
    crashed = tmp_path / "crashed.vla"
    plan_writer_store(crashed)
    procs, pipes = [], []
    for rank in range(world):
        parent, child = FORK.Pipe()
        proc = FORK.Process(target=_writer_rank, args=(str(crashed), rank, world, child, 0.02))
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    try:
        for rank, (proc, pipe) in enumerate(zip(procs, pipes, strict=True)):
            steps = kill_after + rank  # ranks die at different points
            for _ in range(steps):
                if not pipe.poll(60) or pipe.recv() == "done":
                    break
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)
    store = VLAStore.open(crashed, writable=True)
    assert not verify_store(crashed).corrupt  # killed writers leave missing rows, never damaged ones
    values = expected_values(store)
    for family, dtype in (("fixed", "bfloat16"), ("tokens", "float16")):
        for rank in range(world):  # the resumed run: each rank writes what is pending
            with store.writer(family, rank=rank, world_size=world) as writer:
                rows = writer.pending_rows()
                writer.write_rows(rows, [as_value(values[family][r], dtype) for r in rows.tolist()])
    assert _shard_files(crashed) == _shard_files(reference)
    assert not list(crashed.rglob("*.partial"))
    assert verify_store(crashed).ok
    CASES["crash points"] += 1


def _hole_filler(store_path: str, ready) -> None:
    """Fills the holes of a store written with holes, one row per call with write-behind off, reporting."""
    store = VLAStore.open(store_path, writable=True)
    values = expected_values(store)
    with store.writer("fixed", write_behind=False) as writer:
        for row in writer.pending_rows().tolist():
            writer.write_rows([row], as_value(values["fixed"][[row]], "bfloat16"))
            writer.finish_shard(int(store.layout("fixed").shard_of(np.asarray([row]))[0]))
            ready.send(row)
    ready.send("done")


@pytest.mark.parametrize("kill_after", [1, 3, 6])
def test_crash_sigkill_while_holes_are_filled_then_resume_bit_exactly(tmp_path: Path, kill_after: int) -> None:
    """Filling holes replaces shard files; a kill at any point leaves the old or the new file, never less."""
    reference = _reference_store(tmp_path)
    path = tmp_path / "holes.vla"
    store = plan_writer_store(path)
    values = expected_values(store)
    with store.writer("fixed") as writer:
        rows = np.arange(store.layout("fixed").rows)
        kept = rows[rows % 3 != 1]  # every shard gets holes
        writer.write_rows(kept, as_value(values["fixed"][kept], "bfloat16"))
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_hole_filler, args=(str(path), child))
    proc.start()
    try:
        for _ in range(kill_after):
            assert parent.poll(60)
            parent.recv()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=30)
    after_kill = VLAStore.open(path)
    reader = after_kill.reader("fixed")
    present = np.flatnonzero(after_kill.coverage("fixed"))
    assert set(kept.tolist()) <= set(present.tolist())  # no row that was there is lost
    np.testing.assert_array_equal(reader.gather(present), values["fixed"][present])
    assert not verify_store(path).corrupt
    with VLAStore.open(path, writable=True).writer("fixed") as writer:  # resume
        rows = writer.pending_rows()
        writer.write_rows(rows, as_value(values["fixed"][rows], "bfloat16"))
    reference_fixed = {k: v for k, v in _shard_files(reference).items() if "/fixed/" in k}
    assert {k: v for k, v in _shard_files(path).items() if "/fixed/" in k} == reference_fixed
    CASES["crash points"] += 1


def _switcher(store_path: str, ready) -> None:
    """Plans, writes and switches generations in a loop (values depend on the generation), reporting each."""
    store = VLAStore.open(store_path, writable=True)
    rows = store.layout("fixed").rows
    while True:
        info = store.new_generation("fixed", store.generation("fixed").producer)
        with store.writer("fixed", generation=info.generation) as writer:
            writer.write_rows(np.arange(rows), random_rows((rows, 8), "bfloat16", seed=info.generation))
        store.switch_generation("fixed", info.generation)
        ready.send(info.generation)


@pytest.mark.parametrize("kill_after", [1, 2, 4])
def test_crash_sigkill_of_generation_switches_under_a_reading_process(tmp_path: Path, kill_after: int) -> None:
    path = tmp_path / "switch.vla"
    store, _ = build_full_store(path)
    rows = store.layout("fixed").rows
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_switcher, args=(str(path), child))
    proc.start()
    reads = 0
    try:
        for _ in range(kill_after):
            assert parent.poll(60)
            parent.recv()
            # a reader in this process: whatever generation it sees, it reads that generation's exact values
            reader_store = VLAStore.open(path)
            gen = reader_store.generation("fixed").generation
            try:
                got = reader_store.reader("fixed").gather(np.arange(rows))
            except StaleGenerationError:
                continue
            if gen > 1:
                np.testing.assert_array_equal(got, random_rows((rows, 8), "bfloat16", seed=gen))
            reads += 1
        time.sleep(0.01 * kill_after)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=30)
    after = VLAStore.open(path, writable=True)
    current = after.generation("fixed").generation
    report = verify_store(path)
    assert not report.corrupt
    # the newest generation may be unfinished (planned, not switched): a rerun finishes it bit-exactly
    newest = max(after.manifest.families["fixed"].generations)
    with after.writer("fixed", generation=newest) as writer:
        pending = writer.pending_rows()
        writer.write_rows(pending, random_rows((rows, 8), "bfloat16", seed=newest)[pending])
    np.testing.assert_array_equal(
        after.reader("fixed", generation=newest).gather(np.arange(rows)),
        random_rows((rows, 8), "bfloat16", seed=newest),
    )
    if current > 1:
        np.testing.assert_array_equal(
            after.reader("fixed").gather(np.arange(rows)), random_rows((rows, 8), "bfloat16", seed=current)
        )
    assert verify_store(path).ok and reads >= 0
    CASES["crash points"] += 1


# --------------------------------------------------------------- concurrency


def _epoch_reader(store_path: str, ready, result) -> None:
    """Opens the store, reads one row, waits for the switch, then finishes its epoch on the old generation."""
    store = VLAStore.open(store_path)
    reader = store.reader("fixed")
    first = reader.row(0).copy()
    ready.send("opened")
    ready.recv()  # the switch happened
    try:
        rest = reader.gather(np.arange(1, store.layout("fixed").rows))
        result.send(("ok", np.concatenate([first[None], rest]).tobytes()))
    except StaleGenerationError as exc:
        result.send(("stale", str(exc)))


@pytest.mark.parametrize("keep_previous", [1, 0])
def test_concurrency_a_reader_finishes_its_epoch_across_a_switch(tmp_path: Path, keep_previous: int) -> None:
    path = tmp_path / "epoch.vla"
    store, values = build_full_store(path)
    rows = store.layout("fixed").rows
    store.new_generation("fixed", store.generation("fixed").producer)
    with store.writer("fixed", generation=2) as writer:
        writer.write_rows(np.arange(rows), random_rows((rows, 8), "bfloat16", seed=2))
    control, child_control = FORK.Pipe()
    result, child_result = FORK.Pipe()
    proc = FORK.Process(target=_epoch_reader, args=(str(path), child_control, child_result))
    proc.start()
    try:
        assert control.poll(60) and control.recv() == "opened"
        if keep_previous == 1:
            store.switch_generation("fixed", 2)  # the default keeps the generation just replaced
        else:
            store.switch_generation("fixed", 2, keep_previous=0)
        control.send("switched")
        assert result.poll(60)
        status, payload = result.recv()
    finally:
        proc.join(timeout=30)
    if keep_previous == 1:
        assert status == "ok"
        assert np.frombuffer(payload, dtype=np.uint16).reshape(rows, 8).tolist() == values["fixed"].tolist()
    else:  # deleted under it: a clear error telling it to refresh, never other values
        assert status == "stale" and "reload()" in payload and "refresh()" in payload
    CASES["concurrency"] += 1


def _slow_writer(store_path: str, ready) -> None:
    """A live writer stuck between writing its temporary file and linking it (holds the shard's .partial)."""
    store = VLAStore.open(store_path, writable=True)
    storage = store.storage
    key = store.shard_key("fixed", 0)
    tmp = storage._write_temp(storage.root / key, np.zeros(10, np.uint8))
    ready.send(str(tmp))
    time.sleep(60)


def test_concurrency_a_new_writer_never_removes_a_live_writers_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "live.vla"
    store = plan_writer_store(path)
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_slow_writer, args=(str(path), child))
    proc.start()
    try:
        assert parent.poll(60)
        live_tmp = Path(parent.recv())
        dead = live_tmp.with_name(live_tmp.name.replace(f".{proc.pid}.", ".999999999."))  # a dead pid's leftover
        dead.write_bytes(b"left by a killed writer")
        store.writer("fixed")  # a second writer opening the same shards
        assert live_tmp.exists(), "the live writer's temporary file was removed"
        assert not dead.exists(), "a dead writer's temporary file was kept"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    CASES["concurrency"] += 1


def test_concurrency_a_writer_whose_temporary_file_vanished_gets_a_clear_error(tmp_path: Path) -> None:
    from vlastore.writer import OwnershipError

    store = plan_writer_store(tmp_path / "vanish.vla")
    values = expected_values(store)
    writer = store.writer("fixed", write_behind=False)
    storage = store.storage
    original = storage._write_temp

    def write_temp_then_lose_it(path, data):  # another process removes it right after it is written
        tmp = original(path, data)
        subprocess.run(["rm", "-f", str(tmp)], check=True)
        return tmp

    storage._write_temp = write_temp_then_lose_it  # type: ignore[method-assign]
    # raw shards on local files are filled in place (Storage.begin_put): that temporary file vanishes too
    begin = storage.begin_put

    def begin_then_lose_it(key):
        started = begin(key)
        subprocess.run(["rm", "-f", str(started.tmp)], check=True)
        return started

    storage.begin_put = begin_then_lose_it  # type: ignore[method-assign]
    with pytest.raises(OwnershipError, match="was removed by another process"):
        writer.write_rows(np.arange(4), as_value(values["fixed"][:4], "bfloat16"))
    assert not list(tmp_path.rglob("*.partial"))
    CASES["concurrency"] += 1


def test_concurrency_a_shard_replaced_behind_a_writers_back_is_not_overwritten(tmp_path: Path) -> None:
    from vlastore.writer import OwnershipError

    path = tmp_path / "race.vla"
    store = plan_writer_store(path)
    values = expected_values(store)
    with store.writer("fixed") as writer:
        writer.write_rows([0, 2], as_value(values["fixed"][[0, 2]], "bfloat16"))
    slow = store.writer("fixed", write_behind=False)  # sees shard 0 with holes at rows 1, 3
    with VLAStore.open(path, writable=True).writer("fixed") as fast:  # another process fills them first
        fast.write_rows([1, 3], as_value(values["fixed"][[1, 3]], "bfloat16"))
    before = (path / store.shard_key("fixed", 0)).read_bytes()
    with pytest.raises(OwnershipError, match="changed on disk"):
        slow.write_rows([1, 3], as_value(values["fixed"][[1, 3]], "bfloat16"))
    assert (path / store.shard_key("fixed", 0)).read_bytes() == before
    CASES["concurrency"] += 1


# ----------------------------------------------------------------- resources


def test_resources_file_size_limit_gives_one_clear_line_and_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "limited.vla"
    code = (
        "import resource, signal, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({8 * 1024}, {8 * 1024}))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from vlastore.cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "EFBIG" in lines[0] and "ulimit -f" in done.stderr, done.stderr
    assert not list(out.rglob("*.partial"))
    CASES["resources"] += 1


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root and mount); skipped where it cannot be made."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full-disk test needs root to mount a small tmpfs")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_resources_full_disk_gives_one_clear_line_and_no_partial_file(tiny_disk: Path) -> None:
    out = tiny_disk / "full.vla"
    code, text = _cli("demo", "--out", str(out))
    assert code == 1 and "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.startswith("vlastore") or line.startswith("  ")]
    assert "ENOSPC" in text and "disk is full" in text and len(lines) <= 3, text
    assert not list(tiny_disk.rglob("*.partial"))
    # finished shards stay: verify reports what is missing, a rerun elsewhere is the fix
    CASES["resources"] += 1


def test_resources_read_only_store_gives_one_clear_line(tmp_path: Path, tiny_disk: Path) -> None:
    path = tiny_disk / "ro.vla"
    store = plan_writer_store(path)
    del store
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    try:
        with (
            pytest.raises(OSError) as err,
            VLAStore.open(path, writable=True).writer("fixed", write_behind=False) as writer,
        ):
            writer.write_rows(np.arange(4), random_rows((4, 8), "bfloat16"))
        from vlastore.cli import _failure

        code, lines = _failure(err.value, "ingest")
        assert code == 1 and "EROFS" in lines[0] and "read-only" in lines[1]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_disk)], check=False)
    CASES["resources"] += 1
