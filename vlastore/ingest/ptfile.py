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
from dataclasses import dataclass, field
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
    origin: tuple[str, int] | None = field(default=None, repr=False, compare=False)
    """``(storage record, element offset)`` of a contiguous tensor; lets a file layout be reused."""

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


def _zip_records(buf: bytes, where: str, layout: list[tuple[str, int, int, int]] | None = None
                 ) -> dict[str, memoryview] | None:
    """Record name (without the archive folder) -> its bytes; None for zips this parser leaves to zipfile."""
    if len(buf) < 22:
        reason = "truncated" if buf[:4] == _LOCAL else "not-zip"
        raise PtFileError(reason, f"{where}: {len(buf)} bytes, not a zip archive")
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
        entry_pos = pos
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
        if method != 0:  # torch.save stores records uncompressed; never inflate untrusted data
            raise PtFileError("corrupt", f"{where}: record {name!r} is compressed, which torch.save never does")
        data: Any = view[start : start + usize]
        if zlib.crc32(data) != crc:
            raise PtFileError("corrupt", f"{where}: record {name!r} fails its CRC-32 check (damaged file)")
        records[short] = data
        if layout is not None and method == 0:
            layout.append((short, entry_pos, local, start))
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
    record: str = ""


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> RawTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    flat = np.frombuffer(storage.data, dtype=storage.np_dtype)
    # every number comes from the (untrusted) pickle: check them before numpy sees them
    if not (isinstance(offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise pickle.UnpicklingError("tensor size, stride and offset must be integers")
    if offset < 0 or min((*size, *stride), default=0) < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError("negative tensor size, stride or offset")
    size, stride = tuple(size), tuple(stride)
    numel = math.prod(size)
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= flat.size:
        raise pickle.UnpicklingError("tensor view reaches past its storage")
    if stride == _contiguous_strides(size):
        return RawTensor(flat[offset : offset + numel].reshape(size), storage.dtype, (storage.record, offset))
    if numel > flat.size:  # an expanded view: copying it could take any amount of memory
        raise pickle.UnpicklingError("tensor view has more elements than its storage (expanded tensor)")
    array = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride])
    return RawTensor(array.copy(), storage.dtype)


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
        return _Storage(data, storage_type.dtype, storage_type.np_dtype, f"data/{key}")


def parse_pt(buf: bytes, where: str = "<bytes>") -> Any:
    """The object in the bytes of a ``.pt`` file, tensors as :class:`RawTensor`.

    Raises:
        PtFileError: with ``reason`` set (see the class).
    """
    if buf[:1] == b"\x80":  # a bare pickle: the pre-1.6 format
        return _torch_fallback(buf, where, "a pre-torch-1.6 (not zip) file")
    tkey = _template_key(buf)
    template = _TEMPLATES.get(tkey) if tkey else None
    if template is not None:
        obj = template.apply(buf)
        if obj is not None:
            return obj
    layout: list[tuple[str, int, int, int]] = []
    records = _zip_records(buf, where, layout)
    if records is None:
        records = _zipfile_records(buf, where)
    pkl = records.get("data.pkl")
    if pkl is None:
        raise PtFileError("not-zip", f"{where}: a zip archive without data.pkl, not written by torch.save")
    swap = bytes(records.get("byteorder", b"little")).strip() == b"big" and sys.byteorder == "little"
    try:
        obj = _SafeUnpickler(pkl, records, swap).load()
        if tkey and not swap:
            _remember(tkey, buf, layout, records, obj)
        return obj
    except _UnsafeGlobal as exc:
        return _torch_fallback(buf, where, f"global {exc}")
    except PtFileError as exc:
        raise PtFileError(exc.reason, f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a bad file, never a crash
        raise PtFileError("corrupt", f"{where}: data.pkl does not unpickle ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------ layout templates
#
# Files of one cache share their layout: same size, same records at the same
# offsets, the same data.pkl (a bare tensor or a dict of tensors). The first
# such file is parsed in full; later ones are checked against its layout
# (signatures, record sizes, name lengths, data.pkl bytes, CRC-32 of every
# record used) and rebuilt without walking the zip or running the unpickler.


class _Template:
    __slots__ = ("records", "pkl", "byteorder", "recipe")

    def __init__(self, records: list[tuple[str, int, int, int, int, int]], pkl: bytes, byteorder: bytes | None,
                 recipe: Any) -> None:
        self.records = records  # (short name, central entry pos, local pos, data start, size, name length)
        self.pkl = pkl
        self.byteorder = byteorder
        self.recipe = recipe

    def apply(self, buf: bytes) -> Any:
        view = memoryview(buf)
        data: dict[str, memoryview] = {}
        for short, entry_pos, local, start, size, nlen in self.records:
            (sig, method, crc, csize, usize, n, _, _, loc) = _CDIR_ENTRY.unpack_from(buf, entry_pos)
            if sig != _CDIR or method or csize != size or usize != size or n != nlen or loc != local:
                return None
            if buf[local : local + 4] != _LOCAL or not buf.endswith(short.encode(), 0, entry_pos + 46 + nlen):
                return None
            (_, lnlen, lxlen) = _LOCAL_HEADER.unpack_from(buf, local)
            if local + 30 + lnlen + lxlen != start:
                return None
            record = view[start : start + size]
            if zlib.crc32(record) != crc:
                return None  # the full parse reports it
            data[short] = record
        if data.get("data.pkl") != self.pkl or (self.byteorder is not None and data.get("byteorder") != self.byteorder):
            return None
        return _build(self.recipe, data)


_TEMPLATES: dict[tuple[int, int, int], _Template] = {}


def _template_key(buf: bytes) -> tuple[int, int, int] | None:
    if len(buf) < 22 or buf[-22:-18] != _EOCD:
        return None
    (_, _, _, count, _, cd_offset, _) = struct.unpack_from("<HHHHIIH", buf, len(buf) - 18)
    return (len(buf), cd_offset, count)


def _recipe(obj: Any) -> Any:
    """The object with each tensor replaced by how to rebuild it; None when it has other things in it."""
    if isinstance(obj, RawTensor):
        if obj.origin is None:
            return None
        return ("tensor", obj.origin[0], obj.origin[1], obj.array.shape, obj.array.dtype, obj.dtype)
    if isinstance(obj, dict):
        parts = {k: _recipe(v) if isinstance(v, RawTensor) else ("value", v) for k, v in obj.items()}
        if any(p is None or (p[0] == "value" and not isinstance(p[1], (str, int, float, bool, type(None))))
               for p in parts.values()):
            return None
        return ("dict", type(obj), parts)
    return None


def _build(recipe: Any, data: dict[str, memoryview]) -> Any:
    kind = recipe[0]
    if kind == "tensor":
        _, record, offset, shape, np_dtype, dtype = recipe
        count = math.prod(shape)
        flat = np.frombuffer(data[record], dtype=np_dtype, count=count, offset=offset * np_dtype.itemsize)
        return RawTensor(flat.reshape(shape), dtype, (record, offset))
    if kind == "dict":
        return recipe[1]((k, _build(v, data) if v[0] != "value" else v[1]) for k, v in recipe[2].items())
    return recipe[1]


def _remember(tkey: tuple[int, int, int], buf: bytes, layout: list[tuple[str, int, int, int]],
              records: dict[str, memoryview], obj: Any) -> None:
    recipe = _recipe(obj)
    if recipe is None:
        return
    used = {"data.pkl", "byteorder"} | _records_of(recipe)
    rows = []
    for short, entry_pos, local, start in layout:
        if short in used:
            nlen = struct.unpack_from("<H", buf, entry_pos + 28)[0]
            rows.append((short, entry_pos, local, start, len(records[short]), nlen))
    if {r[0] for r in rows} != used & set(records):
        return
    if len(_TEMPLATES) >= 256:
        _TEMPLATES.clear()
    byteorder = bytes(records["byteorder"]) if "byteorder" in records else None
    _TEMPLATES[tkey] = _Template(rows, bytes(records["data.pkl"]), byteorder, recipe)


def _records_of(recipe: Any) -> set[str]:
    if recipe[0] == "tensor":
        return {recipe[1]}
    if recipe[0] == "dict":
        return set().union(*(_records_of(v) for v in recipe[2].values() if v[0] != "value"))
    return set()


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
