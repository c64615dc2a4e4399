"""A fast reader for ``torch.save`` files that never runs pickled code and never trusts a size.

A ``.pt`` file written by ``torch.save`` (torch >= 1.6) is a zip archive:
``<name>/data.pkl`` (a pickle that describes the object) plus one record
``<name>/data/<key>`` of raw bytes per tensor storage, stored uncompressed.

:func:`read_pt` parses the zip from its central directory (zip64 included),
refuses compressed records (``torch.save`` never compresses, so nothing is
ever inflated), checks the CRC-32 of every record it uses, and unpickles
``data.pkl`` with an unpickler that resolves only a short allow-list of globals
(torch's tensor rebuild functions, storage types, ``OrderedDict``, dtypes) to
*our own* functions, which build :class:`RawTensor` objects from the storage
bytes with numpy. No global outside the list is ever imported or called, and
torch is not imported on this path. Pre-1.6 files (a bare pickle followed by
the storages) are parsed the same way.

Every size written in the file is checked against what is really there
before anything is allocated: records against the file size, each storage's
declared element count against its record, each tensor view against its
storage, memo indexes of the pickle against the pickle's length. Small files
are read with one ``os.read``; a file over :data:`SMALL_FILE_BYTES` is read
piecewise: its directory and pickle first, a storage only when its tensor is
used (:attr:`RawTensor.array`), so a caller can check a tensor's declared
shape (``RawTensor.shape``) without reading its bytes. A file over the
``max_bytes`` limit is refused unread (``too-large``).

Files with other tensor-rebuilding globals that torch's own restricted
unpickler accepts (a tensor subclass, a new dtype) go to
``torch.load(weights_only=True)``, after the checks above; a file that needs
any other global (a ``__reduce__`` calling ``os.system``, a pickled class) is
refused unread, as :class:`PtFileError` with reason ``unsafe-pickle``.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .source import MAX_FILE_BYTES, SourceError, classify_os_error, open_regular, pread_exact

__all__ = [
    "RawTensor",
    "PtFileError",
    "read_pt",
    "parse_pt",
    "tensor_entries",
    "FEATURE_DTYPES",
    "SMALL_FILE_BYTES",
]

FEATURE_DTYPES = ("float32", "float16", "bfloat16")
"""Tensor dtypes that can be stored as features."""

SMALL_FILE_BYTES = 1 << 20
"""Files up to this size are read whole at once; bigger ones record by record, as their tensors are used."""

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
_EOCD64 = b"PK\x06\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CDIR = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_EOCD_STRUCT = struct.Struct("<4s4xHHIIH")  # signature, entries on disk, entries, cd size, cd offset, comment len
_EOCD64_STRUCT = struct.Struct("<4sQ4x8xQQQQ")  # signature, record size, entries on disk, entries, cd size, offset
_LOCATOR_STRUCT = struct.Struct("<4sIQI")
_CDIR_ENTRY = struct.Struct("<4s4xHH4xIIIHHH8xI")  # sig, flags, method, crc, sizes, name/extra/comment len, offset
_LOCAL_HEADER = struct.Struct("<4s2xHH8x8xHH")  # signature, flags, method, name/extra lengths
_MAX_COMMENT = 65535
_MAX_PICKLE_BYTES = 64 << 20  # a data.pkl describes tensors; megabytes of it are not a feature file


class PtFileError(SourceError):
    """A ``.pt`` file that cannot be read safely.

    Attributes:
        reason: a short code (``not-zip``, ``truncated``, ``corrupt``, ``unsafe-pickle``,
            ``unreadable``, ``too-large``, ...) used to group skipped files.
    """


class RawTensor:
    """A tensor read from a ``.pt`` file, as numpy.

    ``array`` holds the values in the storage dtype: ``uint16`` bits for
    bfloat16, the numpy dtype of the same name otherwise. ``dtype`` is torch's
    name for the true dtype (``"bfloat16"``, ``"float32"``, ...). ``shape`` is
    known before ``array`` is read: for a big file the bytes are read (and their
    CRC-32 checked) on first access to ``array``, which may then raise
    :class:`PtFileError`.
    """

    __slots__ = ("_array", "dtype", "_shape", "_load", "origin")

    def __init__(self, array: np.ndarray | None, dtype: str, origin: tuple[str, int] | None = None, *,
                 shape: tuple[int, ...] | None = None, load: Callable[[], np.ndarray] | None = None) -> None:
        self._array = array
        self.dtype = dtype
        self._shape = tuple(array.shape) if array is not None else tuple(shape or ())
        self._load = load
        self.origin = origin
        """``(storage record, element offset)`` of a contiguous tensor; lets a file layout be reused."""

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            assert self._load is not None
            self._array = self._load()
            self._load = None
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def numel(self) -> int:
        return math.prod(self._shape)

    def item(self) -> Any:
        return self.array.reshape(-1)[0].item()

    def __repr__(self) -> str:
        return f"RawTensor(shape={list(self._shape)}, dtype={self.dtype})"


# ------------------------------------------------------------------ zip parsing


class _Entry(NamedTuple):
    short: str  # name without the archive folder
    crc: int
    size: int
    start: int  # first byte of the record's data
    entry_pos: int  # of the central directory entry
    local: int  # of the local header


class _Reader:
    """Bytes of a file at offsets: a whole buffer (small files) or ``pread`` on an open descriptor."""

    def __init__(self, where: str, size: int, buf: bytes | None = None, fd: int | None = None) -> None:
        self.where = where
        self.size = size
        self.buf = buf
        self.view = memoryview(buf) if buf is not None else None
        self.fd = fd

    def read(self, offset: int, length: int) -> Any:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PtFileError("truncated", f"{self.where}: needs bytes {offset:,}..{offset + length:,} but the file "
                                           f"has {self.size:,} (truncated copy?)")
        if self.view is not None:
            return self.view[offset : offset + length]
        assert self.fd is not None
        return pread_exact(self.fd, offset, length, self.where)

    def record(self, entry: _Entry) -> Any:
        data = self.read(entry.start, entry.size)
        if zlib.crc32(data) != entry.crc:
            raise PtFileError("corrupt", f"{self.where}: record {entry.short!r} fails its CRC-32 check (damaged file)")
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # lazy tensors keep the reader (and its descriptor) until they are read or dropped
        self.close()


def _u16(data: Any, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "little")


def _zip_directory(reader: _Reader) -> dict[str, _Entry]:
    """Records needed to rebuild the object (``data.pkl``, ``data/*``, ``byteorder``), each checked to lie in the file.

    Raises:
        PtFileError: not a zip archive, truncated, or a damaged, compressed or inconsistent entry.
    """
    where, size = reader.where, reader.size
    if size < 22:
        head = reader.read(0, min(size, 4))
        raise PtFileError("truncated" if bytes(head) == _LOCAL else "not-zip",
                          f"{where}: {size} bytes, not a zip archive")
    tail_start = max(0, size - 22 - _MAX_COMMENT)
    tail = bytes(reader.read(tail_start, size - tail_start))
    end = tail.rfind(_EOCD)
    while end >= 0 and end + 22 > len(tail):  # a signature too close to the end: the file lost its last bytes
        end = tail.rfind(_EOCD, 0, end)
    if end < 0:
        if bytes(reader.read(0, 4)) == _LOCAL:
            raise PtFileError("truncated", f"{where}: zip archive without its central directory (truncated copy?)")
        raise PtFileError("not-zip", f"{where}: not a zip archive (not written by torch.save >= 1.6)")
    (_, count_disk, count, cd_size, cd_offset, comment) = _EOCD_STRUCT.unpack_from(tail, end)
    if end + 22 + comment != len(tail):
        raise PtFileError("truncated" if end + 22 + comment > len(tail) else "corrupt",
                          f"{where}: the zip end record does not end the file (truncated or appended to?)")
    if 0xFFFF in (count_disk, count) or 0xFFFFFFFF in (cd_size, cd_offset):
        count, cd_size, cd_offset = _zip64_end(reader, tail_start + end)
    if cd_offset + cd_size > tail_start + end or count * 46 > cd_size:
        raise PtFileError("truncated", f"{where}: central directory ({count} entries at byte {cd_offset:,}) does not "
                                       "fit in the file (truncated copy?)")
    directory = bytes(reader.read(cd_offset, cd_size))
    entries: dict[str, _Entry] = {}
    pos = 0
    for _ in range(count):
        if pos + 46 > len(directory):
            raise PtFileError("corrupt", f"{where}: central directory ends inside an entry")
        (sig, flags, method, crc, csize, usize, nlen, xlen, clen, local) = _CDIR_ENTRY.unpack_from(directory, pos)
        if sig != _CDIR or pos + 46 + nlen + xlen + clen > len(directory):
            raise PtFileError("corrupt", f"{where}: bad zip central directory entry at byte {cd_offset + pos:,}")
        name = directory[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra = directory[pos + 46 + nlen : pos + 46 + nlen + xlen]
        entry_pos = cd_offset + pos
        pos += 46 + nlen + xlen + clen
        short = name.split("/", 1)[1] if "/" in name else name
        if not (short == "data.pkl" or short.startswith("data/") or short == "byteorder"):
            continue  # version records and the like: not needed to rebuild the object
        if 0xFFFFFFFF in (csize, usize, local):
            usize, csize, local = _zip64_extra(extra, usize, csize, local, where, name)
        if flags & 1:
            raise PtFileError("corrupt", f"{where}: record {name!r} is encrypted, which torch.save never does")
        if method != 0:  # never inflate: a few compressed bytes can claim gigabytes
            raise PtFileError("corrupt", f"{where}: record {name!r} is compressed (method {method}), which torch.save "
                                         "never does; refused without inflating it")
        if csize != usize:
            raise PtFileError("corrupt", f"{where}: stored record {name!r} declares {usize:,} bytes but holds "
                                         f"{csize:,}")
        header = reader.read(local, 30)
        (lsig, lflags, lmethod, lnlen, lxlen) = _LOCAL_HEADER.unpack_from(header, 0)
        if lsig != _LOCAL or lmethod != method:
            raise PtFileError("corrupt", f"{where}: record {name!r} has no matching local header at byte {local:,}")
        start = local + 30 + lnlen + lxlen
        if start + csize > size:
            raise PtFileError("truncated", f"{where}: record {name!r} ends past the end of the file (truncated copy?)")
        if short in entries:
            raise PtFileError("corrupt", f"{where}: record {name!r} appears twice in the archive")
        entries[short] = _Entry(short, crc, usize, start, entry_pos, local)
    return entries


def _zip64_end(reader: _Reader, eocd_pos: int) -> tuple[int, int, int]:
    where = reader.where
    if eocd_pos < 20:
        raise PtFileError("corrupt", f"{where}: zip64 archive without its end-record locator")
    (sig, _, offset, _) = _LOCATOR_STRUCT.unpack_from(bytes(reader.read(eocd_pos - 20, 20)), 0)
    if sig != _EOCD64_LOCATOR or offset + 56 > eocd_pos - 20:
        raise PtFileError("corrupt", f"{where}: zip64 archive with a bad end-record locator")
    (sig, _, _, count, cd_size, cd_offset) = _EOCD64_STRUCT.unpack_from(bytes(reader.read(offset, 56)), 0)
    if sig != _EOCD64:
        raise PtFileError("corrupt", f"{where}: zip64 archive without its zip64 end record")
    return count, cd_size, cd_offset


def _zip64_extra(extra: bytes, usize: int, csize: int, local: int, where: str, name: str) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = _u16(extra, pos), _u16(extra, pos + 2)
        body = extra[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if tag != 1:
            continue
        values = [int.from_bytes(body[i : i + 8], "little") for i in range(0, len(body) - 7, 8)]
        out = []
        for value in (usize, csize, local):
            if value == 0xFFFFFFFF:
                if not values:
                    break
                value = values.pop(0)
            out.append(value)
        if len(out) == 3:
            return out[0], out[1], out[2]
    raise PtFileError("corrupt", f"{where}: record {name!r} lacks the zip64 sizes its entry announces")


# ------------------------------------------------------------------ restricted unpickling


class _UnsafeGlobal(pickle.UnpicklingError):
    pass


class _StorageType(NamedTuple):
    dtype: str
    np_dtype: np.dtype


class _Storage:
    """A storage record: declared size known at once, bytes fetched (and CRC-checked) when a tensor needs them."""

    __slots__ = ("dtype", "np_dtype", "numel", "record", "_data", "_fetch")

    def __init__(self, dtype: str, np_dtype: np.dtype, numel: int, record: str,
                 data: Any = None, fetch: Callable[[], Any] | None = None) -> None:
        self.dtype = dtype
        self.np_dtype = np_dtype
        self.numel = numel
        self.record = record
        self._data = data
        self._fetch = fetch

    @property
    def eager(self) -> bool:
        return self._data is not None

    def data(self) -> Any:
        if self._data is None:
            if self._fetch is None:
                raise PtFileError("corrupt", f"the file has no bytes for storage {self.record}")
            self._data = self._fetch()
            self._fetch = None
        return self._data


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> RawTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    # every number comes from the (untrusted) pickle: check them before numpy sees them
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(v, int) for v in (*size, *stride))):
        raise pickle.UnpicklingError("tensor size, stride and offset must be integers")
    if offset < 0 or min((*size, *stride), default=0) < 0 or len(size) != len(stride) or len(size) > 32:
        raise pickle.UnpicklingError("negative tensor size, stride or offset, or too many dimensions")
    numel = math.prod(size)
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= storage.numel:
        raise pickle.UnpicklingError("tensor view reaches past its storage")
    contiguous = stride == _contiguous_strides(size)
    if not contiguous and numel > storage.numel:  # an expanded view: copying it could take any amount of memory
        raise pickle.UnpicklingError("tensor view has more elements than its storage (expanded tensor)")

    def load() -> np.ndarray:
        flat = np.frombuffer(storage.data(), dtype=storage.np_dtype, count=storage.numel)
        if contiguous:
            return flat[offset : offset + numel].reshape(size)
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride])
        return view.copy()

    origin = (storage.record, offset) if contiguous else None
    if storage.eager:
        return RawTensor(load(), storage.dtype, origin)
    return RawTensor(None, storage.dtype, origin, shape=size, load=load)


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
    if dtype.kind not in "biufcSU?" or dtype.itemsize > 1024:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} is not plain data")
    return dtype


def _np_scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcSU?" or not isinstance(data, bytes):
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

_TORCH_ONLY = frozenset({
    # rebuilt by torch.load(weights_only=True), not by this module: tensor subclasses, newer dtypes, devices
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "device"),
    ("torch", "UntypedStorage"),
    ("_codecs", "encode"),
})


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, each to a function of this module."""

    def __init__(self, stream: io.BytesIO, storage: Callable[[_StorageType, str, Any], _Storage]) -> None:
        super().__init__(stream)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGES:
            return _StorageType(*_STORAGES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise _UnsafeGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
            raise _UnsafeGlobal(f"persistent id {pid!r:.80}")
        return self._storage(pid[1], str(pid[2]), pid)


_NO_ARG, _TO_NEWLINE, _LEN1, _LEN4S, _LEN4, _LEN8 = 0, -1, -2, -3, -4, -5  # pickletools' argument kinds
_PICKLE_ARGS: list[int | None] = [None] * 256  # opcode -> fixed argument bytes, or one of the kinds above
for _code, _op in pickletools.code2op.items():
    _PICKLE_ARGS[ord(_code)] = _NO_ARG if _op.arg is None else _op.arg.n
del _code, _op
_STOP, _PUT, _LONG_BINPUT, _GLOBAL, _INST = 0x2E, 0x70, 0x72, 0x63, 0x69


def _check_memo(pkl: bytes, start: int = 0) -> None:
    """Refuse memo indexes beyond the pickle's length before the C unpickler sizes its memo table by them.

    ``LONG_BINPUT 2**31`` makes CPython allocate (and zero) a table of 2**32 pointers.
    """
    i, n, args = start, len(pkl), _PICKLE_ARGS
    while i < n:
        code = pkl[i]
        kind = args[code]
        i += 1
        if kind is None or code == _STOP:  # an unknown opcode (the unpickler reports it), or the end
            return
        if kind > 0:
            if code == _LONG_BINPUT and int.from_bytes(pkl[i : i + 4], "little") > n:
                raise PtFileError("corrupt", f"pickle memo index {int.from_bytes(pkl[i : i + 4], 'little'):,} in a "
                                             f"pickle of {n:,} bytes")
            i += kind
        elif kind == _LEN1:
            i += 1 + (pkl[i] if i < n else 0)
        elif kind == _TO_NEWLINE:  # GLOBAL and INST: two lines
            j = pkl.find(b"\n", i)
            if j < 0:
                return
            if code == _PUT:
                digits = pkl[i:j].strip()
                if not digits.isdigit() or len(digits) > 12 or int(digits) > n:
                    raise PtFileError("corrupt", f"pickle memo index {digits[:20]!r} in a pickle of {n:,} bytes")
            elif code in (_GLOBAL, _INST):
                j = pkl.find(b"\n", j + 1)
                if j < 0:
                    return
            i = j + 1
        elif kind in (_LEN4, _LEN4S):
            i += 4 + int.from_bytes(pkl[i : i + 4], "little", signed=kind == _LEN4S)
        elif kind == _LEN8:
            i += 8 + int.from_bytes(pkl[i : i + 8], "little")


def _globals(pkl: bytes) -> set[tuple[str, str]]:
    """Globals a pickle names (GLOBAL, and STACK_GLOBAL after two strings), without running it."""
    found: set[tuple[str, str]] = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(pkl):
        if op.name in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found.add((module, name))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
        elif isinstance(arg, str) and (op.name.endswith("UNICODE") or op.name.endswith("STRING")):
            strings.append(str(arg))
    return found


def _unpickle(pkl: Any, where: str, storage: Callable[[_StorageType, str, Any], _Storage],
              stream: io.BytesIO | None = None) -> Any:
    """Run the restricted unpickler; malformed pickles become ``corrupt``, unknown globals raise ``_UnsafeGlobal``."""
    try:
        if stream is None:
            _check_memo(bytes(pkl))
            stream = io.BytesIO(pkl)
        return _SafeUnpickler(stream, storage).load()
    except (_UnsafeGlobal, PtFileError):
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a bad file, never a crash
        raise PtFileError("corrupt", f"{where}: data.pkl does not unpickle ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None


def _zip_object(reader: _Reader, entries: dict[str, _Entry], eager: bool) -> Any:
    """The object of a zip-format file; storages are read now (``eager``) or when their tensors are used."""
    where = reader.where
    pkl_entry = entries.get("data.pkl")
    if pkl_entry is None:
        raise PtFileError("not-zip", f"{where}: a zip archive without data.pkl, not written by torch.save")
    if pkl_entry.size > _MAX_PICKLE_BYTES:
        raise PtFileError("too-large", f"{where}: data.pkl of {pkl_entry.size:,} bytes; a tensor file's is a few "
                                       "hundred")
    pkl = reader.record(pkl_entry)
    byteorder = entries.get("byteorder")
    swap = byteorder is not None and bytes(reader.record(byteorder)).strip() == b"big" and sys.byteorder == "little"

    def storage(kind: _StorageType, key: str, pid: Any) -> _Storage:
        entry = entries.get(f"data/{key}")
        if entry is None:
            raise PtFileError("corrupt", f"{where}: the file has no storage record data/{key}")
        numel = pid[4]
        if numel * kind.np_dtype.itemsize != entry.size:
            raise PtFileError("corrupt", f"{where}: storage data/{key} declares {numel:,} {kind.dtype} elements but "
                                         f"its record holds {entry.size:,} bytes")

        def fetch() -> Any:
            data = reader.record(entry)
            return np.frombuffer(data, kind.np_dtype).byteswap().tobytes() if swap else data

        return _Storage(kind.dtype, kind.np_dtype, numel, f"data/{key}", fetch() if eager else None, fetch)

    return _unpickle(pkl, where, storage)


# ------------------------------------------------------------------ legacy (pre-1.6) files

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _UnsafeGlobal(f"{module}.{name}")


def _legacy_object(buf: bytes, where: str) -> Any:
    """A file of ``torch.save(..., _use_new_zipfile_serialization=False)``: pickles, then each storage's bytes."""
    stream = io.BytesIO(buf)

    def load() -> Any:
        _check_memo(buf, stream.tell())
        return _PlainUnpickler(stream).load()

    try:
        magic = load()
        load()  # protocol version
        sys_info = load()
    except _UnsafeGlobal as exc:
        raise PtFileError("unsafe-pickle", f"{where}: loading it would run pickled code (global {exc}); not loaded"
                          ) from None
    except PtFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PtFileError("not-zip", f"{where}: neither a zip archive nor a pre-1.6 torch file "
                                     f"({type(exc).__name__})") from None
    if magic != _LEGACY_MAGIC or not isinstance(sys_info, dict):
        raise PtFileError("not-zip", f"{where}: a pickle, but not a torch.save file")
    big = sys_info.get("little_endian") is False
    storages: dict[str, _Storage] = {}

    def storage(kind: _StorageType, key: str, pid: Any) -> _Storage:
        if len(pid) != 6 or pid[5] is not None:
            raise PtFileError("corrupt", f"{where}: storage views of pre-1.0 torch files are not supported")
        if key not in storages:
            storages[key] = _Storage(kind.dtype, kind.np_dtype, pid[4], key)
        return storages[key]

    try:
        _check_memo(buf, stream.tell())
        obj = _unpickle(buf, where, storage, stream)
        keys = load()
    except _UnsafeGlobal as exc:
        raise PtFileError("unsafe-pickle", f"{where}: loading it would run pickled code (global {exc}); not loaded"
                          ) from None
    except PtFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PtFileError("corrupt", f"{where}: storage list does not unpickle ({type(exc).__name__})") from None
    if not isinstance(keys, list):
        raise PtFileError("corrupt", f"{where}: storage list is not a list")
    pos = stream.tell()
    view = memoryview(buf)
    for key in keys:
        st = storages.get(str(key))
        if st is None or pos + 8 > len(buf):
            raise PtFileError("corrupt" if st is None else "truncated", f"{where}: storage {key!r} missing")
        numel = int.from_bytes(buf[pos : pos + 8], "big" if big else "little", signed=True)
        nbytes = numel * st.np_dtype.itemsize
        if numel != st.numel or pos + 8 + nbytes > len(buf):
            raise PtFileError("truncated" if numel == st.numel else "corrupt",
                              f"{where}: storage {key!r} declares {numel:,} elements; {st.numel:,} expected and "
                              f"{len(buf) - pos - 8:,} bytes left")
        data: Any = view[pos + 8 : pos + 8 + nbytes]
        if big and sys.byteorder == "little":
            data = np.frombuffer(data, st.np_dtype.newbyteorder(">")).astype(st.np_dtype).tobytes()
        st._data = data
        pos += 8 + nbytes
    return obj


# ------------------------------------------------------------------ entry points


def parse_pt(buf: bytes, where: str = "<bytes>") -> Any:
    """The object in the bytes of a ``.pt`` file, tensors as :class:`RawTensor`.

    Raises:
        PtFileError: with ``reason`` set (see the class).
    """
    tkey = _template_key(buf)
    if tkey is not None:  # the common case first: a file laid out like one read before
        template = _TEMPLATES.get(tkey)
        if template is not None:
            obj = template.apply(buf)
            if obj is not None:
                return obj
    return _parse(_Reader(where, len(buf), buf=buf), eager=True, tkey=tkey)


def _parse(reader: _Reader, eager: bool, tkey: tuple[int, int, int] | None = None) -> Any:
    where = reader.where
    try:
        if bytes(reader.read(0, min(reader.size, 1))) == b"\x80":  # a bare pickle: the pre-1.6 format
            return _legacy_object(_whole(reader), where)
        entries = _zip_directory(reader)
        try:
            obj = _zip_object(reader, entries, eager)
        except _UnsafeGlobal as exc:
            return _torch_fallback(_whole(reader), entries, where, f"global {exc}")
        if tkey is not None and eager and reader.buf is not None:
            _remember(tkey, reader.buf, entries, obj)
        return obj
    except PtFileError as exc:
        if not str(exc).startswith(where):
            raise PtFileError(exc.reason, f"{where}: {exc}") from None
        raise
    except SourceError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError, UnicodeDecodeError, RecursionError, MemoryError,
            TypeError, KeyError) as exc:
        raise PtFileError("corrupt", f"{where}: malformed file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _whole(reader: _Reader) -> bytes:
    return reader.buf if reader.buf is not None else bytes(reader.read(0, reader.size))


def read_pt(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Read one ``.pt`` file safely (see the module docstring).

    Only a regular file is opened (a FIFO or device is refused, never waited
    on); a file over ``max_bytes`` is refused unread. Tensors of a file over
    :data:`SMALL_FILE_BYTES` are read when their ``array`` is first used.

    Raises:
        PtFileError / SourceError: with ``reason`` set; ``transient-error`` for
            an I/O error worth retrying (see :func:`vlastore.ingest.source.retrying`).
    """
    fd, size = open_regular(path)
    if size > max_bytes:
        os.close(fd)
        raise PtFileError("too-large", f"{path}: {size:,} bytes, more than the {max_bytes:,}-byte limit for one "
                                       "source file; raise it with --max-file-size if the file is genuine")
    if size <= SMALL_FILE_BYTES:
        try:
            buf = os.read(fd, size) if size else b""
            if len(buf) < size:  # a file shrinking under us: what is there is parsed (and found truncated)
                buf += pread_exact(fd, len(buf), size - len(buf), str(path))
        except OSError as exc:
            raise classify_os_error(path, exc) from None
        finally:
            os.close(fd)
        return parse_pt(buf, str(path))
    # the reader owns the descriptor from here and closes it once no tensor needs it
    return _parse(_Reader(str(path), size, fd=fd), eager=False)


# ------------------------------------------------------------------ torch fallback


def _torch_fallback(buf: bytes, entries: dict[str, _Entry], where: str, why: str) -> Any:
    """``torch.load(weights_only=True)`` for the few tensor-rebuilding globals this module leaves to torch.

    Only after the archive passed every check above (records stored, sizes
    consistent) and only when every global of the pickle is one torch's
    restricted unpickler would use to rebuild tensors; anything else is
    refused without loading.
    """
    pkl = bytes(buf[entries["data.pkl"].start : entries["data.pkl"].start + entries["data.pkl"].size])
    try:
        names = _globals(pkl)
    except Exception:  # noqa: BLE001
        raise PtFileError("corrupt", f"{where}: data.pkl is not a valid pickle") from None
    unknown = sorted(f"{m}.{n}" for m, n in names - set(_ALLOWED) - _TORCH_ONLY
                     if not (m == "torch" and (n in _STORAGES or n in _TORCH_DTYPES)))
    if unknown:
        raise PtFileError("unsafe-pickle", f"{where}: loading it would run pickled code ({', '.join(unknown[:3])}); "
                                           "not loaded. Re-save it with torch.save of plain tensors/dicts if you "
                                           "trust it")
    import torch

    try:
        obj = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PtFileError("unsafe-pickle", f"{where}: loading it would run pickled code ({why}; torch weights_only "
                                           f"refused: {first[:200]}); not loaded") from None
    except Exception as exc:  # noqa: BLE001
        raise PtFileError("corrupt", f"{where}: unreadable by torch.load(weights_only=True) either "
                                     f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return _from_torch(obj, len(buf), where)


def _from_torch(obj: Any, limit: int, where: str, depth: int = 0) -> Any:
    import torch

    if depth > 32:
        raise PtFileError("corrupt", f"{where}: objects nested more than 32 deep")
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise PtFileError("no-tensor", f"{where}: a {obj.layout} tensor; only dense tensors are features")
        if obj.numel() * obj.element_size() > limit:  # an expanded view would be copied without bound
            raise PtFileError("corrupt", f"{where}: a tensor view of {obj.numel():,} elements in a file of "
                                         f"{limit:,} bytes (expanded tensor)")
        tensor = obj.detach().cpu().contiguous()
        name = str(tensor.dtype).removeprefix("torch.")
        if name == "bfloat16":
            return RawTensor(tensor.view(torch.int16).numpy().view(np.uint16), name)
        return RawTensor(tensor.numpy(), name)
    if isinstance(obj, dict):
        items = [(k, _from_torch(v, limit, where, depth + 1)) for k, v in obj.items()]
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_torch(v, limit, where, depth + 1) for v in obj)
    return obj


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
            (sig, flags, method, crc, csize, usize, n, _, _, loc) = _CDIR_ENTRY.unpack_from(buf, entry_pos)
            if sig != _CDIR or method or flags & 1 or csize != size or usize != size or n != nlen or loc != local:
                return None
            if buf[local : local + 4] != _LOCAL or not buf.endswith(short.encode(), 0, entry_pos + 46 + nlen):
                return None
            (_, _, lmethod, lnlen, lxlen) = _LOCAL_HEADER.unpack_from(buf, local)
            if lmethod or local + 30 + lnlen + lxlen != start:
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


def _remember(tkey: tuple[int, int, int], buf: bytes, entries: dict[str, _Entry], obj: Any) -> None:
    recipe = _recipe(obj)
    if recipe is None:
        return
    used = {"data.pkl", "byteorder"} | _records_of(recipe)
    rows = []
    for short in sorted(used & set(entries)):
        e = entries[short]
        nlen = struct.unpack_from("<H", buf, e.entry_pos + 28)[0]
        rows.append((short, e.entry_pos, e.local, e.start, e.size, nlen))
    if not _records_of(recipe) <= set(entries):
        return
    if len(_TEMPLATES) >= 256:
        _TEMPLATES.clear()
    byteorder = bytes(buf[entries["byteorder"].start : entries["byteorder"].start + entries["byteorder"].size]) \
        if "byteorder" in entries else None
    pkl = entries["data.pkl"]
    _TEMPLATES[tkey] = _Template(rows, bytes(buf[pkl.start : pkl.start + pkl.size]), byteorder, recipe)


def _records_of(recipe: Any) -> set[str]:
    if recipe[0] == "tensor":
        return {recipe[1]}
    if recipe[0] == "dict":
        return set().union(*(_records_of(v) for v in recipe[2].values() if v[0] != "value"))
    return set()


# ------------------------------------------------------------------ payload


def tensor_entries(obj: Any) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """Split a payload into feature tensors and small metadata.

    A bare tensor is entry ``""``. In a dict, float tensors of more than one
    element are features; strings, numbers and one-element tensors are
    metadata (tensors given as Python scalars). Reading a feature's bytes is
    left to the caller (``RawTensor.array``), after it checked the shape.
    """
    if isinstance(obj, RawTensor):
        return {"": obj}, {}
    tensors: dict[str, RawTensor] = {}
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            key = str(key)
            if isinstance(value, RawTensor):
                if value.dtype in FEATURE_DTYPES and value.numel > 1:
                    tensors[key] = value
                elif value.numel == 1:
                    meta[key] = value.item()
            elif isinstance(value, (str, int, float, bool, np.generic)):
                meta[key] = value.item() if isinstance(value, np.generic) else value
    return tensors, meta
