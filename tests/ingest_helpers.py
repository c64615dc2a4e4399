"""Builders of real source data for the ingestion tests: .pt caches made with torch.save, CSV/NPZ/HDF5 files."""

from __future__ import annotations

import hashlib
import io
import os
import resource
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_pt_cache(
    folder: Path,
    episodes: dict[str, int],
    shape: tuple[int, ...] = (1, 16),
    dtype: str = "bfloat16",
    ragged: bool = False,
    seed: int = 0,
    payload: str = "tensor",
) -> dict[tuple[str, int], torch.Tensor]:
    """``{dataset}_vlm{idx}.pt`` files; returns the saved tensors by (dataset, vlm_idx)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, n in episodes.items():
        for idx in range(n):
            this = (1, 1 + (idx * 7 + len(name)) % 5, *shape[2:]) if ragged else shape
            t = torch.randn(this, generator=gen).to(DTYPES[dtype])
            obj = t if payload == "tensor" else {"features": t, "dataset": name, "vlm_idx": idx}
            torch.save(obj, folder / f"{name}_vlm{idx}.pt")
            values[(name, idx)] = t
    return values


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 and mtime of every file under ``root`` (to prove sources are untouched)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() + f"@{path.stat().st_mtime_ns}"
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor as numpy (bfloat16 has no numpy dtype)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def robot_csvs(folder: Path, episodes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """One CSV per episode: a text column, 3 joint columns, a gripper and 2 action columns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, steps in episodes.items():
        table = rng.normal(size=(steps, 6))
        out[name] = table
        lines = ["time_str,joint_0,joint_1,joint_2,gripper,action_0,action_1"]
        lines += [f"t{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(table)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return out


class RunsCode:
    """Pickles as a call to ``os.system``: what a malicious (or careless) .pt file holds."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------- hostile inputs and real subprocesses

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with its content hash (regular files), link target or type; never opens a FIFO."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                out[str(path)] = f"link->{os.readlink(path)}"
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    if info.st_size <= 64 << 20:
                        digest = hashlib.sha256(f.read()).hexdigest()
                    else:  # a sparse multi-GiB test file: its ends, size and mtime say whether it changed
                        head = f.read(1 << 20)
                        f.seek(-(1 << 20), os.SEEK_END)
                        digest = hashlib.sha256(head + f.read()).hexdigest() + f"/{info.st_size}"
                out[str(path)] = digest + f"@{info.st_mtime_ns}"
            else:
                out[str(path)] = f"mode {stat.S_IFMT(info.st_mode):o}@{info.st_mtime_ns}"
    return out


def raw_zip(
    entries: list[tuple[str, bytes]], zip64: bool = False, method: int = 0, declared: dict[str, int] | None = None
) -> bytes:
    """A zip archive written byte by byte: stored (or ``method``) records, optionally in zip64 form, and
    optionally declaring other uncompressed sizes than the data holds (``declared``)."""
    declared = declared or {}
    body, central = bytearray(), bytearray()
    big = 0xFFFFFFFF
    for name, data in entries:
        raw_name = name.encode()
        usize = declared.get(name, len(data))
        crc = zlib.crc32(data) if method == 0 else 0
        offset = len(body)
        if zip64:
            local_extra = struct.pack("<HHQQ", 1, 16, usize, len(data))
            body += (
                struct.pack(
                    "<4sHHHHHIIIHH",
                    b"PK\x03\x04",
                    45,
                    0,
                    method,
                    0,
                    0x21,
                    crc,
                    big,
                    big,
                    len(raw_name),
                    len(local_extra),
                )
                + raw_name
                + local_extra
                + data
            )
            extra = struct.pack("<HHQQQ", 1, 24, usize, len(data), offset)
            central += (
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    45,
                    45,
                    0,
                    method,
                    0,
                    0x21,
                    crc,
                    big,
                    big,
                    len(raw_name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    big,
                )
                + raw_name
                + extra
            )
        else:
            body += (
                struct.pack(
                    "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), usize, len(raw_name), 0
                )
                + raw_name
                + data
            )
            central += (
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    20,
                    20,
                    0,
                    method,
                    0,
                    0x21,
                    crc,
                    len(data),
                    usize,
                    len(raw_name),
                    0,
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + raw_name
            )
    cd_offset, n = len(body), len(entries)
    out = body + central
    if zip64:
        eocd64 = len(out)
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1)
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, big, big, 0)
    else:
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central), cd_offset, 0)
    return bytes(out)


def pt_records(obj: object) -> list[tuple[str, bytes]]:
    """The zip records ``torch.save(obj)`` writes, in order."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def deflate_bomb(gib: int) -> bytes:
    """A raw deflate stream that inflates to ``gib`` GiB of zeros, made in a fraction of a second."""
    chunk_compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = chunk_compressor.compress(bytes(64 << 20)) + chunk_compressor.flush(zlib.Z_FULL_FLUSH)
    return chunk * (16 * gib) + b"\x03\x00"  # byte-aligned blocks repeat; an empty final block ends the stream


@dataclass
class Run:
    code: int
    out: str
    err: str
    peak_rss: int
    """Peak resident memory of the command and its workers, in bytes."""


_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
with open(os.environ["VLASTORE_TEST_PEAK"], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_cli(
    args: list[str],
    *,
    limit_as: int | None = None,
    limit_fsize: int | None = None,
    drop_file_caps: bool = False,
    timeout: float = 120,
    cwd: Path | None = None,
) -> Run:
    """``python -m vlastore ARGS`` in a real subprocess, optionally under rlimits or without root's file access.

    A small Python parent starts the command and reports its peak memory: a child forked straight
    from pytest would count pytest's own memory in its peak.
    """

    def limits() -> None:
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
        if limit_fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    command = [sys.executable, "-m", "vlastore", *args]
    if drop_file_caps:  # root reads any file: without these two capabilities chmod 000 means EACCES again
        caps = "-dac_override,-dac_read_search"
        command = ["/usr/bin/setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        with open(Path(tmp) / "out", "w+b") as out, open(Path(tmp) / "err", "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _MEASURE, *command],
                stdout=out,
                stderr=err,
                preexec_fn=limits,
                cwd=cwd or ROOT,
                start_new_session=True,
                env={**os.environ, "VLASTORE_TEST_PEAK": str(peak)},
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                raise AssertionError(f"vlastore {' '.join(args)} did not finish in {timeout} s (a hang)") from None
            out.seek(0)
            err.seek(0)
            rss = int(peak.read_text()) * 1024 if peak.exists() else 0
            return Run(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"), rss)


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and 'File "' not in text
