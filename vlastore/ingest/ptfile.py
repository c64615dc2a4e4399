"""A fast reader for ``torch.save`` files that never runs pickled code.

A ``.pt`` file written by ``torch.save`` (torch >= 1.6) is a zip archive:
``<name>/data.pkl`` (a pickle that describes the object) plus one record
``<name>/data/<key>`` of raw bytes per tensor storage, stored uncompressed.

:func:`read_pt` parses the zip from its central directory with ``struct``,
checks every record's CRC-32, and unpickles ``data.pkl`` with an unpickler
that resolves only a short allow-list of globals (torch's tensor rebuild
functions, storage types, ``OrderedDict``, dtypes) to *our own* functions,
which build :class:`RawTensor` objects from the storage bytes with numpy. No
global outside the list is ever imported or called, and torch is not
imported at all on this path.

Files the fast path does not understand (a tensor subclass, a zip64
archive, a pre-1.6 file) go to ``torch.load(weights_only=True)``, torch's own
restricted unpickler. A file that needs arbitrary code (a ``__reduce__``
calling ``os.system``, a pickled class) is refused by both and reported as
:class:`PtFileError` with reason ``unsafe-pickle``.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RawTensor", "PtFileError", "read_pt", "read_bytes", "parse_pt", "tensor_entries", "FEATURE_DTYPES"]

FEATURE_DTYPES = ("float32", "float16", "bfloat16")
"""Tensor dtypes that can be stored as features."""

_STORAGES: dict[str, tuple[str, np.dtype]] = {
    "FloatStorage": ("float32", np.dtype("<f4")),
    "HalfStorage": ("float16", np.dtype("<f2")),
    "BFloat16Storage": ("bfloat16", np.dtype("<u2")),
    "DoubleStorage": ("float64", np.dtype("<f8")),
    "LongStorage": ("int64", np.dtype("<i8")),
    "IntStorage": ("int32", np.dtype("<i4")),
    "ShortStorage": ("int16", np.dtype("<i2")),
    "CharStorage": ("int8", np.dtype("i1")),
    "ByteStorage": ("uint8", np.dtype("u1")),
    "BoolStorage": ("bool", np.dtype("?")),
}
_TORCH_DTYPES = {name: name for name, _ in _STORAGES.values()} | {"float": "float32", "half": "float16",
                                                                  "long": "int64", "int": "int32"}

_EOCD = b"PK\x05\x06"
_CDIR = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_CDIR_ENTRY = struct.Struct("<4s6xH4xIIIHHH8xI")  # signature, method, crc, sizes, name/extra/comment lengths, offset
_LOCAL_HEADER = struct.Struct("<4s22xHH")


class PtFileError(ValueError):
    """A ``.pt`` file that cannot be read safely.

    Attributes:
        reason: a short code (``not-zip``, ``truncated``, ``corrupt``,
            ``unsafe-pickle``, ``unreadable``) used to group skipped files.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RawTensor:
    """A tensor read from a ``.pt`` file, as numpy.

    ``array`` holds the values in the storage dtype: ``uint16`` bits for
    bfloat16, the numpy dtype of the same name otherwise. ``dtype`` is torch's
    name for the true dtype (``"bfloat16"``, ``"float32"``, ...).
    """

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def item(self) -> Any:
        return self.array.reshape(-1)[0].item()


# ------------------------------------------------------------------ zip parsing


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file, read with one ``os.read`` (faster than ``open().read()`` for small files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size:  # very large files come in pieces
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _zip_records(buf: bytes, where: str) -> dict[str, memoryview] | None:
    """Record name (without the archive folder) -> its bytes; None for zips this parser leaves to zipfile."""
    if len(buf) < 22:
        raise PtFileError("truncated" if buf[:4] == _LOCAL else "not-zip", f"{where}: {len(buf)} bytes, not a zip archive")
    end = buf.rfind(_EOCD, max(0, len(buf) - 65557))
    if end < 0:
        if buf[:4] == _LOCAL:
            raise PtFileError("truncated", f"{where}: zip archive without its central directory (truncated copy?)")
        raise PtFileError("not-zip", f"{where}: not a zip archive (not written by torch.save >= 1.6)")
    (_, _, _, count, cd_size, cd_offset, _) = struct.unpack_from("<HHHHIIH", buf, end + 4)
    if count == 0xFFFF or cd_offset == 0xFFFFFFFF:
        return None  # zip64
    if cd_offset + cd_size > end:
        raise PtFileError("truncated", f"{where}: central directory points past the end of the file")
    view = memoryview(buf)
    records: dict[str, memoryview] = {}
    pos = cd_offset
    for _ in range(count):
        (sig, method, crc, csize, usize, nlen, xlen, clen, local) = _CDIR_ENTRY.unpack_from(buf, pos)
        if sig != _CDIR:
            raise PtFileError("corrupt", f"{where}: bad zip central directory entry at byte {pos}")
        name = buf[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        pos += 46 + nlen + xlen + clen
        short = name.split("/", 1)[1] if "/" in name else name
        if not (short == "data.pkl" or short.startswith("data/") or short == "byteorder"):
            continue  # version records and the like: not needed to rebuild the object
        (lsig, lnlen, lxlen) = _LOCAL_HEADER.unpack_from(buf, local)
        if lsig != _LOCAL:
            raise PtFileError("corrupt", f"{where}: record {name!r} has no local header at byte {local}")
        start = local + 30 + lnlen + lxlen
        if start + csize > len(buf):
            raise PtFileError("truncated", f"{where}: record {name!r} ends past the end of the file (truncated copy?)")
        if method == 0:
            data: Any = view[start : start + usize]
        elif method == 8:
            data = memoryview(zlib.decompress(view[start : start + csize], -15))
        else:
            return None
        if zlib.crc32(data) != crc:
            raise PtFileError("corrupt", f"{where}: record {name!r} fails its CRC-32 check (damaged file)")
        records[short] = data
    return records


def _zipfile_records(buf: bytes, where: str) -> dict[str, memoryview]:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(buf)) as archive:
            return {
                (n.split("/", 1)[1] if "/" in n else n): memoryview(archive.read(n)) for n in archive.namelist()
            }
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise PtFileError("corrupt", f"{where}: damaged zip archive ({exc})") from None


# ------------------------------------------------------------------ restricted unpickling


class _UnsafeGlobal(pickle.UnpicklingError):
    pass


@dataclass(frozen=True)
class _StorageType:
    dtype: str
    np_dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    data: memoryview
    dtype: str
    np_dtype: np.dtype


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any) -> RawTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    flat = np.frombuffer(storage.data, dtype=storage.np_dtype)
    size = tuple(int(s) for s in size)
    numel = math.prod(size)
    contiguous = tuple(stride) == _contiguous_strides(size)
    if contiguous and offset + numel <= flat.size:
        array = flat[offset : offset + numel].reshape(size)
    else:
        if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= flat.size:
            raise pickle.UnpicklingError("tensor view reaches past its storage")
        array = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]
        ).copy()
    return RawTensor(array, storage.dtype)


@functools.lru_cache(maxsize=256)
def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _np_dtype(name: Any, *_: Any) -> np.dtype:
    dtype = np.dtype(name)
    if dtype.kind not in "biufcSU?":
        raise pickle.UnpicklingError(f"numpy dtype {dtype} is not plain data")
    return dtype


def _np_scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcSU?":
        raise pickle.UnpicklingError("numpy scalar of a non-plain dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, each to a function of this module."""

    def __init__(self, data: memoryview, records: dict[str, memoryview], swap: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._records = records
        self._swap = swap

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGES:
            true_dtype, np_dtype = _STORAGES[name]
            return _StorageType(true_dtype, np_dtype)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise _UnsafeGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _UnsafeGlobal(f"persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        data = self._records.get(f"data/{key}")
        if data is None:
            raise PtFileError("corrupt", f"the file has no storage record data/{key}")
        if self._swap:
            data = memoryview(np.frombuffer(data, storage_type.np_dtype).byteswap().tobytes())
        return _Storage(data, storage_type.dtype, storage_type.np_dtype)


def parse_pt(buf: bytes, where: str = "<bytes>") -> Any:
    """The object in the bytes of a ``.pt`` file, tensors as :class:`RawTensor`.

    Raises:
        PtFileError: with ``reason`` set (see the class).
    """
    if buf[:1] == b"\x80":  # a bare pickle: the pre-1.6 format
        return _torch_fallback(buf, where, "a pre-torch-1.6 (not zip) file")
    records = _zip_records(buf, where)
    if records is None:
        records = _zipfile_records(buf, where)
    pkl = records.get("data.pkl")
    if pkl is None:
        raise PtFileError("not-zip", f"{where}: a zip archive without data.pkl, not written by torch.save")
    swap = bytes(records.get("byteorder", b"little")).strip() == b"big" and sys.byteorder == "little"
    try:
        return _SafeUnpickler(pkl, records, swap).load()
    except _UnsafeGlobal as exc:
        return _torch_fallback(buf, where, f"global {exc}")
    except PtFileError as exc:
        raise PtFileError(exc.reason, f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a bad file, never a crash
        raise PtFileError("corrupt", f"{where}: data.pkl does not unpickle ({type(exc).__name__}: {exc})") from None


def read_pt(path: str | os.PathLike[str]) -> Any:
    """Read one ``.pt`` file safely (see the module docstring)."""
    try:
        buf = read_bytes(path)
    except OSError as exc:
        raise PtFileError("unreadable", f"{path}: {exc.strerror or exc}") from None
    return parse_pt(buf, str(path))


def _torch_fallback(buf: bytes, where: str, why: str) -> Any:
    """``torch.load(weights_only=True)``: torch's own restricted unpickler, for unusual files."""
    import torch

    try:
        obj = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PtFileError(
            "unsafe-pickle",
            f"{where}: loading it would run pickled code ({why}; torch weights_only refused: {first[:200]}); "
            "not loaded. Re-save it with torch.save of plain tensors/dicts if you trust it",
        ) from None
    except Exception as exc:  # noqa: BLE001
        reason = "not-zip" if "zip" in why or buf[:2] != b"PK" else "corrupt"
        raise PtFileError(reason, f"{where}: unreadable by torch.load(weights_only=True) either "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return _from_torch(obj)


def _from_torch(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        name = str(tensor.dtype).removeprefix("torch.")
        if name == "bfloat16":
            return RawTensor(tensor.view(torch.int16).numpy().view(np.uint16), name)
        return RawTensor(tensor.numpy(), name)
    if isinstance(obj, dict):
        return type(obj)((k, _from_torch(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: _from_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_torch(v) for v in obj)
    return obj


# ------------------------------------------------------------------ payload


def tensor_entries(obj: Any) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """Split a payload into feature tensors and small metadata.

    A bare tensor is entry ``""``. In a dict, float tensors of more than one
    element are features; strings, numbers and one-element tensors are
    metadata (tensors given as Python scalars).
    """
    if isinstance(obj, RawTensor):
        return {"": obj}, {}
    tensors: dict[str, RawTensor] = {}
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            key = str(key)
            if isinstance(value, RawTensor):
                if value.dtype in FEATURE_DTYPES and value.array.size > 1:
                    tensors[key] = value
                elif value.array.size == 1:
                    meta[key] = value.item()
            elif isinstance(value, (str, int, float, bool, np.generic)):
                meta[key] = value.item() if isinstance(value, np.generic) else value
    return tensors, meta
