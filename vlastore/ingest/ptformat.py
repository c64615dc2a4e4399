"""The two on-disk forms of a ``torch.save`` file, parsed without trusting any size or running any code.

* torch >= 1.6 writes a zip archive: ``<name>/data.pkl`` (a pickle that describes
  the object) and one stored record ``<name>/data/<key>`` of raw bytes per tensor
  storage. :func:`zip_directory` reads the central directory (zip64 included) and
  refuses compressed, encrypted, duplicated or inconsistent records, so nothing is
  ever inflated and every record lies inside the file.
* older torch wrote a bare pickle followed by each storage's bytes
  (:func:`legacy_object`).

``data.pkl`` is run by :class:`SafeUnpickler`, which resolves a short allow-list
of globals (torch's tensor rebuild functions, storage types, ``OrderedDict``,
dtypes) to functions of this module that build :class:`RawTensor` objects with
numpy; anything else raises :class:`UnsafeGlobal`. Sizes are checked before any
allocation: each storage's declared element count against its record, each
tensor view against its storage, memo indexes against the pickle's length
(:func:`check_memo`). A storage's bytes are read (and CRC-checked) when a tensor
needs them, so a caller can check declared shapes first.
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

from .source import SourceError, pread_exact

__all__ = [
    "FEATURE_DTYPES",
    "STORAGES",
    "TORCH_DTYPES",
    "ALLOWED",
    "TORCH_ONLY",
    "EOCD",
    "CDIR",
    "LOCAL",
    "CDIR_ENTRY",
    "LOCAL_HEADER",
    "PtFileError",
    "RawTensor",
    "Entry",
    "Reader",
    "zip_directory",
    "zip_object",
    "legacy_object",
    "UnsafeGlobal",
    "SafeUnpickler",
    "check_memo",
    "pickle_globals",
]

FEATURE_DTYPES = ("float32", "float16", "bfloat16")
"""Tensor dtypes that can be stored as features."""


STORAGES: dict[str, tuple[str, np.dtype]] = {
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
TORCH_DTYPES = {name: name for name, _ in STORAGES.values()} | {
    "float": "float32",
    "half": "float16",
    "long": "int64",
    "int": "int32",
}

EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
CDIR = b"PK\x01\x02"
LOCAL = b"PK\x03\x04"
_EOCD_STRUCT = struct.Struct("<4s4xHHIIH")  # signature, entries on disk, entries, cd size, cd offset, comment len
_EOCD64_STRUCT = struct.Struct("<4sQ4x8xQQQQ")  # signature, record size, entries on disk, entries, cd size, offset
_LOCATOR_STRUCT = struct.Struct("<4sIQI")
CDIR_ENTRY = struct.Struct("<4s4xHH4xIIIHHH8xI")  # sig, flags, method, crc, sizes, name/extra/comment len, offset
LOCAL_HEADER = struct.Struct("<4s2xHH8x8xHH")  # signature, flags, method, name/extra lengths
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

    def __init__(
        self,
        array: np.ndarray | None,
        dtype: str,
        origin: tuple[str, int] | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        load: Callable[[], np.ndarray] | None = None,
    ) -> None:
        self._array = array
        self.dtype = dtype
        self._shape = None if array is not None else tuple(shape or ())  # an array knows its own
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
        return self._array.shape if self._shape is None else self._shape  # type: ignore[union-attr]

    @property
    def numel(self) -> int:
        return self._array.size if self._shape is None else math.prod(self._shape)  # type: ignore[union-attr]

    def item(self) -> Any:
        return self.array.reshape(-1)[0].item()

    def __repr__(self) -> str:
        return f"RawTensor(shape={list(self.shape)}, dtype={self.dtype})"


# ------------------------------------------------------------------ zip parsing


class Entry(NamedTuple):
    short: str  # name without the archive folder
    crc: int
    size: int
    start: int  # first byte of the record's data
    entry_pos: int  # of the central directory entry
    local: int  # of the local header


class Reader:
    """Bytes of a file at offsets: a whole buffer (small files) or ``pread`` on an open descriptor."""

    def __init__(self, where: str, size: int, buf: bytes | None = None, fd: int | None = None) -> None:
        self.where = where
        self.size = size
        self.buf = buf
        self.view = memoryview(buf) if buf is not None else None
        self.fd = fd

    def read(self, offset: int, length: int) -> Any:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PtFileError(
                "truncated",
                f"{self.where}: needs bytes {offset:,}..{offset + length:,} but the file "
                f"has {self.size:,} (truncated copy?)",
            )
        if self.view is not None:
            return self.view[offset : offset + length]
        assert self.fd is not None
        return pread_exact(self.fd, offset, length, self.where)

    def record(self, entry: Entry) -> Any:
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


def zip_directory(reader: Reader) -> dict[str, Entry]:
    """Records needed to rebuild the object (``data.pkl``, ``data/*``, ``byteorder``), each checked to lie in the file.

    Raises:
        PtFileError: not a zip archive, truncated, or a damaged, compressed or inconsistent entry.
    """
    count, cd_size, cd_offset = _central_directory(reader)
    directory = bytes(reader.read(cd_offset, cd_size))
    entries: dict[str, Entry] = {}
    pos = 0
    for _ in range(count):
        fields, name, extra, entry_pos, pos = _directory_entry(directory, pos, cd_offset, reader.where)
        short = name.split("/", 1)[1] if "/" in name else name
        if not (short == "data.pkl" or short.startswith("data/") or short == "byteorder"):
            continue  # version records and the like: not needed to rebuild the object
        if short in entries:
            raise PtFileError("corrupt", f"{reader.where}: record {name!r} appears twice in the archive")
        entries[short] = _stored_record(reader, fields, name, short, extra, entry_pos)
    return entries


def _central_directory(reader: Reader) -> tuple[int, int, int]:
    """``(entries, size, offset)`` of the central directory, from the end record (zip64 too), checked to fit."""
    where, size = reader.where, reader.size
    if size < 22:
        head = reader.read(0, min(size, 4))
        raise PtFileError(
            "truncated" if bytes(head) == LOCAL else "not-zip", f"{where}: {size} bytes, not a zip archive"
        )
    tail_start = max(0, size - 22 - _MAX_COMMENT)
    tail = bytes(reader.read(tail_start, size - tail_start))
    end = tail.rfind(EOCD)
    while end >= 0 and end + 22 > len(tail):  # a signature too close to the end: the file lost its last bytes
        end = tail.rfind(EOCD, 0, end)
    if end < 0:
        if bytes(reader.read(0, 4)) == LOCAL:
            raise PtFileError("truncated", f"{where}: zip archive without its central directory (truncated copy?)")
        raise PtFileError("not-zip", f"{where}: not a zip archive (not written by torch.save >= 1.6)")
    (_, count_disk, count, cd_size, cd_offset, comment) = _EOCD_STRUCT.unpack_from(tail, end)
    if end + 22 + comment != len(tail):
        raise PtFileError(
            "truncated" if end + 22 + comment > len(tail) else "corrupt",
            f"{where}: the zip end record does not end the file (truncated or appended to?)",
        )
    if 0xFFFF in (count_disk, count) or 0xFFFFFFFF in (cd_size, cd_offset):
        count, cd_size, cd_offset = _zip64_end(reader, tail_start + end)
    if cd_offset + cd_size > tail_start + end or count * 46 > cd_size:
        raise PtFileError(
            "truncated",
            f"{where}: central directory ({count} entries at byte {cd_offset:,}) does not "
            "fit in the file (truncated copy?)",
        )
    return count, cd_size, cd_offset


def _directory_entry(
    directory: bytes, pos: int, cd_offset: int, where: str
) -> tuple[tuple[int, ...], str, bytes, int, int]:
    """``(fields, name, extra, position in the file, position of the next entry)`` of the entry at ``pos``."""
    if pos + 46 > len(directory):
        raise PtFileError("corrupt", f"{where}: central directory ends inside an entry")
    fields = CDIR_ENTRY.unpack_from(directory, pos)
    nlen, xlen, clen = fields[6:9]
    if fields[0] != CDIR or pos + 46 + nlen + xlen + clen > len(directory):
        raise PtFileError("corrupt", f"{where}: bad zip central directory entry at byte {cd_offset + pos:,}")
    name = directory[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
    extra = directory[pos + 46 + nlen : pos + 46 + nlen + xlen]
    return fields, name, extra, cd_offset + pos, pos + 46 + nlen + xlen + clen


def _stored_record(
    reader: Reader, fields: tuple[int, ...], name: str, short: str, extra: bytes, entry_pos: int
) -> Entry:
    """The record of a central directory entry, refused unless stored plainly, whole and inside the file."""
    where = reader.where
    (_, flags, method, crc, csize, usize, _, _, _, local) = fields
    if 0xFFFFFFFF in (csize, usize, local):
        usize, csize, local = _zip64_extra(extra, usize, csize, local, where, name)
    if flags & 1:
        raise PtFileError("corrupt", f"{where}: record {name!r} is encrypted, which torch.save never does")
    if method != 0:  # never inflate: a few compressed bytes can claim gigabytes
        raise PtFileError(
            "corrupt",
            f"{where}: record {name!r} is compressed (method {method}), which torch.save "
            "never does; refused without inflating it",
        )
    if csize != usize:
        raise PtFileError("corrupt", f"{where}: stored record {name!r} declares {usize:,} bytes but holds {csize:,}")
    header = reader.read(local, 30)
    (lsig, _, lmethod, lnlen, lxlen) = LOCAL_HEADER.unpack_from(header, 0)
    if lsig != LOCAL or lmethod != method:
        raise PtFileError("corrupt", f"{where}: record {name!r} has no matching local header at byte {local:,}")
    start = local + 30 + lnlen + lxlen
    if start + csize > reader.size:
        raise PtFileError("truncated", f"{where}: record {name!r} ends past the end of the file (truncated copy?)")
    return Entry(short, crc, usize, start, entry_pos, local)


def _zip64_end(reader: Reader, eocd_pos: int) -> tuple[int, int, int]:
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


class UnsafeGlobal(pickle.UnpicklingError):
    pass


class _StorageType(NamedTuple):
    dtype: str
    np_dtype: np.dtype


class _Storage:
    """A storage record: declared size known at once, bytes fetched (and CRC-checked) when a tensor needs them."""

    __slots__ = ("dtype", "np_dtype", "numel", "record", "_data", "_fetch")

    def __init__(
        self,
        dtype: str,
        np_dtype: np.dtype,
        numel: int,
        record: str,
        data: Any = None,
        fetch: Callable[[], Any] | None = None,
    ) -> None:
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


def _rebuild_tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> RawTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    # every number comes from the (untrusted) pickle: check them before numpy sees them
    if not (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and all(isinstance(v, int) for v in (*size, *stride))
    ):
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


ALLOWED: dict[tuple[str, str], Any] = {
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

TORCH_ONLY = frozenset(
    {
        # rebuilt by torch.load(weights_only=True), not by this module: tensor subclasses, newer dtypes, devices
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "device"),
        ("torch", "UntypedStorage"),
        ("_codecs", "encode"),
    }
)


class SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, each to a function of this module."""

    def __init__(self, stream: io.BytesIO, storage: Callable[[_StorageType, str, Any], _Storage]) -> None:
        super().__init__(stream)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in STORAGES:
            return _StorageType(*STORAGES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        raise UnsafeGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise UnsafeGlobal(f"persistent id {pid!r:.80}")
        return self._storage(pid[1], str(pid[2]), pid)


_NO_ARG, _TO_NEWLINE, _LEN1, _LEN4S, _LEN4, _LEN8 = 0, -1, -2, -3, -4, -5  # pickletools' argument kinds
_PICKLE_ARGS: list[int | None] = [None] * 256  # opcode -> fixed argument bytes, or one of the kinds above
for _op in pickletools.opcodes:
    _PICKLE_ARGS[ord(_op.code)] = _NO_ARG if _op.arg is None else _op.arg.n
del _op
_STOP, _PUT, _LONG_BINPUT, _GLOBAL, _INST = 0x2E, 0x70, 0x72, 0x63, 0x69


def check_memo(pkl: bytes, start: int = 0) -> None:
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
                raise PtFileError(
                    "corrupt",
                    f"pickle memo index {int.from_bytes(pkl[i : i + 4], 'little'):,} in a pickle of {n:,} bytes",
                )
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


def pickle_globals(pkl: bytes) -> set[tuple[str, str]]:
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


def _unpickle(
    pkl: Any, where: str, storage: Callable[[_StorageType, str, Any], _Storage], stream: io.BytesIO | None = None
) -> Any:
    """Run the restricted unpickler; malformed pickles become ``corrupt``, unknown globals raise ``UnsafeGlobal``."""
    try:
        if stream is None:
            check_memo(bytes(pkl))
            stream = io.BytesIO(pkl)
        return SafeUnpickler(stream, storage).load()
    except (UnsafeGlobal, PtFileError):
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a bad file, never a crash
        raise PtFileError(
            "corrupt", f"{where}: data.pkl does not unpickle ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def zip_object(reader: Reader, entries: dict[str, Entry], eager: bool) -> Any:
    """The object of a zip-format file; storages are read now (``eager``) or when their tensors are used."""
    where = reader.where
    pkl_entry = entries.get("data.pkl")
    if pkl_entry is None:
        raise PtFileError("not-zip", f"{where}: a zip archive without data.pkl, not written by torch.save")
    if pkl_entry.size > _MAX_PICKLE_BYTES:
        raise PtFileError(
            "too-large", f"{where}: data.pkl of {pkl_entry.size:,} bytes; a tensor file's is a few hundred"
        )
    pkl = reader.record(pkl_entry)
    byteorder = entries.get("byteorder")
    swap = byteorder is not None and bytes(reader.record(byteorder)).strip() == b"big" and sys.byteorder == "little"

    def storage(kind: _StorageType, key: str, pid: Any) -> _Storage:
        entry = entries.get(f"data/{key}")
        if entry is None:
            raise PtFileError("corrupt", f"{where}: the file has no storage record data/{key}")
        numel = pid[4]
        if numel * kind.np_dtype.itemsize != entry.size:
            raise PtFileError(
                "corrupt",
                f"{where}: storage data/{key} declares {numel:,} {kind.dtype} elements but "
                f"its record holds {entry.size:,} bytes",
            )

        def fetch() -> Any:
            data = reader.record(entry)
            return np.frombuffer(data, kind.np_dtype).byteswap().tobytes() if swap else data

        return _Storage(kind.dtype, kind.np_dtype, numel, f"data/{key}", fetch() if eager else None, fetch)

    return _unpickle(pkl, where, storage)


# ------------------------------------------------------------------ legacy (pre-1.6) files

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeGlobal(f"{module}.{name}")


def legacy_object(buf: bytes, where: str) -> Any:
    """A file of ``torch.save(..., _use_new_zipfile_serialization=False)``: pickles, then each storage's bytes."""
    stream = io.BytesIO(buf)

    def load() -> Any:
        check_memo(buf, stream.tell())
        return _PlainUnpickler(stream).load()

    big = _legacy_header(load, where)
    storages: dict[str, _Storage] = {}

    def storage(kind: _StorageType, key: str, pid: Any) -> _Storage:
        if len(pid) != 6 or pid[5] is not None:
            raise PtFileError("corrupt", f"{where}: storage views of pre-1.0 torch files are not supported")
        if key not in storages:
            storages[key] = _Storage(kind.dtype, kind.np_dtype, pid[4], key)
        return storages[key]

    try:
        check_memo(buf, stream.tell())
        obj = _unpickle(buf, where, storage, stream)
        keys = load()
    except UnsafeGlobal as exc:
        raise PtFileError(
            "unsafe-pickle", f"{where}: loading it would run pickled code (global {exc}); not loaded"
        ) from None
    except PtFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PtFileError("corrupt", f"{where}: storage list does not unpickle ({type(exc).__name__})") from None
    if not isinstance(keys, list):
        raise PtFileError("corrupt", f"{where}: storage list is not a list")
    _legacy_storages(buf, stream.tell(), keys, storages, big, where)
    return obj


def _legacy_header(load: Callable[[], Any], where: str) -> bool:
    """Check the three pickles that open a pre-1.6 file (magic, protocol, system info); True when big-endian."""
    try:
        magic = load()
        load()  # protocol version
        sys_info = load()
    except UnsafeGlobal as exc:
        raise PtFileError(
            "unsafe-pickle", f"{where}: loading it would run pickled code (global {exc}); not loaded"
        ) from None
    except PtFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PtFileError(
            "not-zip", f"{where}: neither a zip archive nor a pre-1.6 torch file ({type(exc).__name__})"
        ) from None
    if magic != _LEGACY_MAGIC or not isinstance(sys_info, dict):
        raise PtFileError("not-zip", f"{where}: a pickle, but not a torch.save file")
    return sys_info.get("little_endian") is False


def _legacy_storages(
    buf: bytes, pos: int, keys: list[Any], storages: dict[str, _Storage], big: bool, where: str
) -> None:
    """Attach to each storage its bytes, which follow the pickles as ``(element count, bytes)`` in ``keys`` order."""
    view = memoryview(buf)
    for key in keys:
        st = storages.get(str(key))
        if st is None or pos + 8 > len(buf):
            raise PtFileError("corrupt" if st is None else "truncated", f"{where}: storage {key!r} missing")
        numel = int.from_bytes(buf[pos : pos + 8], "big" if big else "little", signed=True)
        nbytes = numel * st.np_dtype.itemsize
        if numel != st.numel or pos + 8 + nbytes > len(buf):
            raise PtFileError(
                "truncated" if numel == st.numel else "corrupt",
                f"{where}: storage {key!r} declares {numel:,} elements; {st.numel:,} expected and "
                f"{len(buf) - pos - 8:,} bytes left",
            )
        data: Any = view[pos + 8 : pos + 8 + nbytes]
        if big and sys.byteorder == "little":
            data = np.frombuffer(data, st.np_dtype.newbyteorder(">")).astype(st.np_dtype).tobytes()
        st._data = data
        pos += 8 + nbytes
