"""A fast reader for ``torch.save`` files that never runs pickled code and never trusts a size.

:func:`read_pt` opens only a regular file (a FIFO is refused, never waited on),
refuses one over a size limit unread, and parses it with
:mod:`vlastore.ingest.ptformat` (zip archive or pre-1.6 pickle, restricted
unpickler, every declared size checked). Small files are read with one
``os.read``; a file over :data:`SMALL_FILE_BYTES` is read piecewise: its
directory and pickle first, a storage only when its tensor is used
(:attr:`RawTensor.array`), so a caller can check a tensor's declared shape
(``RawTensor.shape``) without reading its bytes. torch is not imported.

Files of one cache share their layout; after the first, a file with the same
layout is checked against it and rebuilt without walking the zip or running
the unpickler (the layout templates below), which makes the reader ~20x faster
than ``torch.load(weights_only=True)``.

Files with other tensor-rebuilding globals that torch's own restricted
unpickler accepts (a tensor subclass, a new dtype) go to
``torch.load(weights_only=True)``, after the checks above; a file that needs
any other global (a ``__reduce__`` calling ``os.system``, a pickled class) is
refused unread, as :class:`PtFileError` with reason ``unsafe-pickle``.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zlib
from typing import Any

import numpy as np

from .ptformat import (
    ALLOWED,
    EOCD,
    FEATURE_DTYPES,
    STORAGES,
    TORCH_DTYPES,
    TORCH_ONLY,
    Entry,
    PtFileError,
    RawTensor,
    Reader,
    UnsafeGlobal,
    legacy_object,
    pickle_globals,
    zip_directory,
    zip_object,
)
from .source import MAX_FILE_BYTES, SourceError, classify_os_error, open_regular, pread_exact

__all__ = [
    "RawTensor",
    "PtFileError",
    "read_pt",
    "read_small",
    "parse_pt",
    "template_tensor",
    "tensor_entries",
    "FEATURE_DTYPES",
    "SMALL_FILE_BYTES",
]

SMALL_FILE_BYTES = 1 << 20
"""Files up to this size are read whole at once; bigger ones record by record, as their tensors are used."""


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
    return _parse(Reader(where, len(buf), buf=buf), eager=True, tkey=tkey)


def _parse(reader: Reader, eager: bool, tkey: tuple[int, int, int] | None = None) -> Any:
    where = reader.where
    try:
        if bytes(reader.read(0, min(reader.size, 1))) == b"\x80":  # a bare pickle: the pre-1.6 format
            return legacy_object(_whole(reader), where)
        entries = zip_directory(reader)
        try:
            obj = zip_object(reader, entries, eager)
        except UnsafeGlobal as exc:
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


def _whole(reader: Reader) -> bytes:
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
        return parse_pt(_read_fd(fd, size, path), str(path))
    # the reader owns the descriptor from here and closes it once no tensor needs it
    return _parse(Reader(str(path), size, fd=fd), eager=False)


def read_small(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of a regular file of at most ``min(max_bytes, SMALL_FILE_BYTES)``; None for a bigger one.

    Raises:
        SourceError: the file cannot be opened or read (see :func:`read_pt`).
    """
    fd, size = open_regular(path)
    if size > max_bytes or size > SMALL_FILE_BYTES:
        os.close(fd)
        return None
    return _read_fd(fd, size, path)


def _read_fd(fd: int, size: int, path: str | os.PathLike[str]) -> bytes:
    """``size`` bytes of an open file, closing it."""
    try:
        buf = os.read(fd, size) if size else b""
        if len(buf) < size:  # a file shrinking under us: what is there is parsed (and found truncated)
            buf += pread_exact(fd, len(buf), size - len(buf), str(path))
    except OSError as exc:
        raise classify_os_error(path, exc) from None
    finally:
        os.close(fd)
    return buf


def template_tensor(buf: bytes, entry: str | None = None) -> tuple[memoryview, tuple[int, ...], str] | None:
    """Bytes, shape and dtype of a feature tensor of a file laid out like one :func:`parse_pt` read before.

    The file is checked against that layout as :func:`parse_pt` checks it (records in
    place, CRC-32 of every record used, the same ``data.pkl``), and nothing is built:
    the fast path of a worker filling a batch of rows. ``entry`` is the dict key of the
    tensor, None for the only feature tensor (as :func:`tensor_entries` sees them).

    Returns:
        None when no layout is known for ``buf`` or ``buf`` differs from it: read it
        with :func:`parse_pt` then (which learns its layout).
    """
    tkey = _template_key(buf)
    template = _TEMPLATES.get(tkey) if tkey is not None else None
    return None if template is None else template.tensor(buf, entry)


# ------------------------------------------------------------------ torch fallback


def _torch_fallback(buf: bytes, entries: dict[str, Entry], where: str, why: str) -> Any:
    """``torch.load(weights_only=True)`` for the few tensor-rebuilding globals this module leaves to torch.

    Only after the archive passed every check above (records stored, sizes
    consistent) and only when every global of the pickle is one torch's
    restricted unpickler would use to rebuild tensors; anything else is
    refused without loading.
    """
    pkl = bytes(buf[entries["data.pkl"].start : entries["data.pkl"].start + entries["data.pkl"].size])
    try:
        names = pickle_globals(pkl)
    except Exception:  # noqa: BLE001
        raise PtFileError("corrupt", f"{where}: data.pkl is not a valid pickle") from None
    unknown = sorted(f"{m}.{n}" for m, n in names - set(ALLOWED) - TORCH_ONLY
                     if not (m == "torch" and (n in STORAGES or n in TORCH_DTYPES)))
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


_CDIR_FIXED = struct.Struct("<4s4xHH8xIIH12xI")  # central entry without its CRC: sig, flags, method, sizes, name, local
_LOCAL_FIXED = struct.Struct("<4s4xH16xHH")  # local header: signature, method, name and extra lengths
_CRC = struct.Struct("<I")


class _Template:
    """The layout of a file read in full, to check later files against (see the section comment above).

    Each record used (``data.pkl``, ``byteorder``, tensor storages) must sit where the
    template's does, with the same central entry (flags, method, sizes, name length,
    local offset), the same local header lengths, a name ending like the template's,
    and a CRC-32 that matches its bytes. ``data.pkl`` and ``byteorder`` must equal the
    template's bytes (then their CRC field must equal the template's too: no CRC to compute).
    """

    __slots__ = ("names", "checks", "recipe", "_picks")

    def __init__(self, buf: bytes, entries: dict[str, Entry], used: list[str], recipe: Any) -> None:
        self.names = used
        self.checks = []
        for short in used:
            e = entries[short]
            fields = _CDIR_FIXED.unpack_from(buf, e.entry_pos)
            fixed = bytes(buf[e.start : e.start + e.size]) if short in ("data.pkl", "byteorder") else None
            self.checks.append((e.entry_pos, fields, e.local, _LOCAL_FIXED.unpack_from(buf, e.local), short.encode(),
                                e.entry_pos + 46 + fields[5], e.start, e.start + e.size, fixed, e.crc))
        self.recipe = recipe
        self._picks: dict[str | None, Any] = {}

    def records(self, buf: bytes) -> list[memoryview] | None:
        """The used records of ``buf`` (in ``names`` order) when it is laid out like the template; else None."""
        view = memoryview(buf)
        data = []
        for entry_pos, fields, local, local_fields, name, name_end, start, stop, fixed, crc in self.checks:
            if _CDIR_FIXED.unpack_from(buf, entry_pos) != fields or _LOCAL_FIXED.unpack_from(buf, local) != \
                    local_fields or not buf.endswith(name, 0, name_end):
                return None
            found = _CRC.unpack_from(buf, entry_pos + 16)[0]
            record = view[start:stop]
            if fixed is not None:
                if found != crc or buf[start:stop] != fixed:
                    return None
            elif zlib.crc32(record) != found:
                return None  # the full parse reports it
            data.append(record)
        return data

    def apply(self, buf: bytes) -> Any:
        data = self.records(buf)
        return None if data is None else _build(self.recipe, dict(zip(self.names, data, strict=True)))

    def tensor(self, buf: bytes, entry: str | None) -> tuple[memoryview, tuple[int, ...], str] | None:
        """``(bytes, shape, dtype)`` of one feature tensor of ``buf`` (see :func:`template_tensor`), or None."""
        pick = self._picks.get(entry, False)
        if pick is False:
            found = _pick(self.recipe, entry)
            pick = self._picks[entry] = None if found is None else (self.names.index(found[0]), *found[1:])
        if pick is None:
            return None
        data = self.records(buf)
        if data is None:
            return None
        record, start, stop, shape, dtype = pick
        return data[record][start:stop], shape, dtype


def _pick(recipe: Any, entry: str | None) -> tuple[str, int, int, tuple[int, ...], str] | None:
    """Where the feature tensor ``entry`` of a recipe lies (record, byte range), as :func:`tensor_entries` sees it.

    ``entry`` None: the only feature tensor. None when there is no such tensor (or several).
    """
    if recipe[0] == "tensor":
        found = recipe if entry in (None, "") else None
    else:
        features = {k: v for k, v in recipe[2].items() if v[0] == "tensor" and v[5] in FEATURE_DTYPES
                    and math.prod(v[3]) > 1}
        found = (next(iter(features.values())) if len(features) == 1 else None) if entry is None else \
            features.get(entry)
    if found is None:
        return None
    _, record, offset, shape, np_dtype, dtype = found
    start = offset * np_dtype.itemsize
    return record, start, start + math.prod(shape) * np_dtype.itemsize, tuple(shape), dtype


_TEMPLATES: dict[tuple[int, int, int], _Template] = {}


_EOCD_KEY = struct.Struct("<4s6xH4xI2x")  # end record: signature, entries, central directory offset


def _template_key(buf: bytes) -> tuple[int, int, int] | None:
    if len(buf) < 22:
        return None
    (signature, count, cd_offset) = _EOCD_KEY.unpack_from(buf, len(buf) - 22)
    return (len(buf), cd_offset, count) if signature == EOCD else None


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


def _remember(tkey: tuple[int, int, int], buf: bytes, entries: dict[str, Entry], obj: Any) -> None:
    recipe = _recipe(obj)
    if recipe is None or not _records_of(recipe) <= set(entries):
        return
    used = sorted(({"data.pkl", "byteorder"} | _records_of(recipe)) & set(entries))
    if len(_TEMPLATES) >= 256:
        _TEMPLATES.clear()
    _TEMPLATES[tkey] = _Template(buf, entries, used, recipe)


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
