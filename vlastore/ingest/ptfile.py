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
    CDIR,
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
    except (
        struct.error,
        ValueError,
        IndexError,
        OverflowError,
        UnicodeDecodeError,
        RecursionError,
        MemoryError,
        TypeError,
        KeyError,
    ) as exc:
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
        raise PtFileError(
            "too-large",
            f"{path}: {size:,} bytes, more than the {max_bytes:,}-byte limit for one "
            "source file; raise it with --max-file-size if the file is genuine",
        )
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
    unknown = sorted(
        f"{m}.{n}"
        for m, n in names - set(ALLOWED) - TORCH_ONLY
        if not (m == "torch" and (n in STORAGES or n in TORCH_DTYPES))
    )
    if unknown:
        raise PtFileError(
            "unsafe-pickle",
            f"{where}: loading it would run pickled code ({', '.join(unknown[:3])}); "
            "not loaded. Re-save it with torch.save of plain tensors/dicts if you "
            "trust it",
        )
    import torch

    try:
        obj = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PtFileError(
            "unsafe-pickle",
            f"{where}: loading it would run pickled code ({why}; torch weights_only "
            f"refused: {first[:200]}); not loaded",
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise PtFileError(
            "corrupt",
            f"{where}: unreadable by torch.load(weights_only=True) either ({type(exc).__name__}: {str(exc)[:200]})",
        ) from None
    return _from_torch(obj, len(buf), where)


def _from_torch(obj: Any, limit: int, where: str, depth: int = 0) -> Any:
    import torch

    if depth > 32:
        raise PtFileError("corrupt", f"{where}: objects nested more than 32 deep")
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise PtFileError("no-tensor", f"{where}: a {obj.layout} tensor; only dense tensors are features")
        if obj.numel() * obj.element_size() > limit:  # an expanded view would be copied without bound
            raise PtFileError(
                "corrupt",
                f"{where}: a tensor view of {obj.numel():,} elements in a file of {limit:,} bytes (expanded tensor)",
            )
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


_CRC = struct.Struct("<I")

# The bytes of those fields, as (start, stop) from the start of a central entry / local header:
_LOCAL_SPANS = ((0, 4), (8, 10), (26, 30))  # signature; method; name and extra lengths
_CDIR_CRC = 16
"""Offset of the CRC-32 in a central entry."""
_CDIR_LENGTHS = struct.Struct("<HHH")  # name, extra and comment lengths, at byte 28 of a central entry


class _Template:
    """The layout of a file read in full, to check later files against (see the section comment above).

    A later file passes when the full parse would find the same records and the same
    ``data.pkl``: its central directory and end record are byte for byte the
    template's except for the CRC-32 of records rebuilt from their bytes (checked
    against those bytes instead), the CRC-32 of records the parse does not use, and
    the archive folder that starts every record name (``{stem}/data.pkl``: it differs
    from file to file; it must be one name, without ``/``, in every record); the local
    headers of the records used match the template's (signature, method, name and
    extra lengths); ``data.pkl`` and ``byteorder`` equal the template's.

    All the bytes that must equal the template's are compared at once: one
    precompiled struct picks them out of a file (``_same``) and its tuple is compared
    with the template's; a million files pass here, so this is a few C calls, not one per field.
    """

    __slots__ = ("names", "recipe", "_picks", "_same", "_expected", "_prefixes", "_crcs", "_ranges")

    def __init__(
        self, buf: bytes, entries: dict[str, Entry], used: list[str], recipe: Any, directory: list[tuple[int, int, int]]
    ) -> None:
        self.names = used
        spans = [(directory[0][0], len(buf))]  # the central directory and the end record ...
        holes = []  # ... but for these
        prefixes = []
        self._crcs: list[tuple[int, int, int]] = []  # (CRC field, start, stop) of records whose CRC is computed
        self._ranges: list[tuple[int, int]] = []  # (start, stop) of each used record, in ``names`` order
        fixed = {entries[short].entry_pos for short in ("data.pkl", "byteorder") if short in entries}
        for entry_pos, name_start, prefix_len in directory:
            if entry_pos not in fixed:
                holes.append((entry_pos + _CDIR_CRC, entry_pos + _CDIR_CRC + 4))
            if prefix_len:
                holes.append((name_start, name_start + prefix_len))
                prefixes.append((name_start, name_start + prefix_len))
        for short in used:
            e = entries[short]
            spans += [(e.local + a, e.local + b) for a, b in _LOCAL_SPANS]
            if e.entry_pos in fixed:
                spans.append((e.start, e.start + e.size))
            else:
                self._crcs.append((e.entry_pos + _CDIR_CRC, e.start, e.start + e.size))
            self._ranges.append((e.start, e.start + e.size))
        self._same = _picker(_minus(_merged(spans), holes))
        self._expected = self._same.unpack_from(buf, 0)
        self._prefixes = _picker(prefixes) if prefixes else None
        self.recipe = recipe
        self._picks: dict[str | None, Any] = {}

    def _matches(self, buf: bytes) -> bool:
        """``buf`` (of the template's size: the template key says so) is laid out like the template."""
        if self._same.unpack_from(buf, 0) != self._expected:
            return False
        if self._prefixes is not None:
            names = self._prefixes.unpack_from(buf, 0)
            if names.count(names[0]) != len(names) or b"/" in names[0]:
                return False
        for at, start, stop in self._crcs:
            if zlib.crc32(memoryview(buf)[start:stop]) != _CRC.unpack_from(buf, at)[0]:
                return False  # the full parse reports it
        return True

    def records(self, buf: bytes) -> list[memoryview] | None:
        """The used records of ``buf`` (in ``names`` order) when it is laid out like the template; else None."""
        if not self._matches(buf):
            return None
        view = memoryview(buf)
        return [view[start:stop] for start, stop in self._ranges]

    def apply(self, buf: bytes) -> Any:
        data = self.records(buf)
        return None if data is None else _build(self.recipe, dict(zip(self.names, data, strict=True)))

    def tensor(self, buf: bytes, entry: str | None) -> tuple[memoryview, tuple[int, ...], str] | None:
        """``(bytes, shape, dtype)`` of one feature tensor of ``buf`` (see :func:`template_tensor`), or None."""
        pick = self._picks.get(entry, False)
        if pick is False:
            found = _pick(self.recipe, entry)
            pick = self._picks[entry] = (
                None if found is None else (self._ranges[self.names.index(found[0])][0], *found[1:])
            )
        if pick is None or not self._matches(buf):
            return None
        record, start, stop, shape, dtype = pick
        return memoryview(buf)[record + start : record + stop], shape, dtype


def _directory(buf: bytes, cd_offset: int, count: int) -> list[tuple[int, int, int]] | None:
    """``(entry position, name start, archive folder length)`` of every central entry; None past the file."""
    out = []
    pos = cd_offset
    for _ in range(count):
        if pos + 46 > len(buf) or buf[pos : pos + 4] != CDIR:
            return None
        nlen, xlen, clen = _CDIR_LENGTHS.unpack_from(buf, pos + 28)
        name = buf[pos + 46 : pos + 46 + nlen]
        out.append((pos, pos + 46, max(name.find(b"/"), 0)))
        pos += 46 + nlen + xlen + clen
    return out if pos <= len(buf) else None


def _picker(spans: list[tuple[int, int]]) -> struct.Struct:
    """A struct that unpacks the bytes of ``spans`` (sorted, apart) from a buffer, one ``bytes`` each."""
    fmt, pos = ["<"], 0
    for a, b in spans:
        fmt.append(f"{a - pos}x{b - a}s" if a > pos else f"{b - a}s")
        pos = b
    return struct.Struct("".join(fmt))


def _minus(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` (sorted, apart) without the bytes of ``holes``."""
    out = []
    holes = _merged(holes)
    for a, b in spans:
        for ha, hb in holes:
            if hb <= a or ha >= b:
                continue
            if ha > a:
                out.append((a, ha))
            a = max(a, hb)
        if a < b:
            out.append((a, b))
    return out


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start, stop)`` spans sorted, overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _pick(recipe: Any, entry: str | None) -> tuple[str, int, int, tuple[int, ...], str] | None:
    """Where the feature tensor ``entry`` of a recipe lies (record, byte range), as :func:`tensor_entries` sees it.

    ``entry`` None: the only feature tensor. None when there is no such tensor (or several).
    """
    if recipe[0] == "tensor":
        found = recipe if entry in (None, "") else None
    else:
        features = {
            k: v for k, v in recipe[2].items() if v[0] == "tensor" and v[5] in FEATURE_DTYPES and math.prod(v[3]) > 1
        }
        found = (
            (next(iter(features.values())) if len(features) == 1 else None) if entry is None else features.get(entry)
        )
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
        if any(
            p is None or (p[0] == "value" and not isinstance(p[1], (str, int, float, bool, type(None))))
            for p in parts.values()
        ):
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
    directory = _directory(buf, tkey[1], tkey[2])
    if directory is None:
        return
    if len(_TEMPLATES) >= 256:
        _TEMPLATES.clear()
    _TEMPLATES[tkey] = _Template(buf, entries, used, recipe, directory)


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
