"""A store's zarr nodes over its :class:`~vlastore.storage.Storage`: groups, attributes and small arrays.

zarr-python writes and reads the metadata (``zarr.json``) and the small arrays
(catalog, row tables, robot series) through ``storage.zarr_store()``, so a plain
``zarr.open_group()`` reads what is written here; shard files of the feature
families bypass zarr (see :mod:`vlastore.shardcodec`). Everything read is checked
against what vlastore writes before it is trusted (:mod:`vlastore.integrity`).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, ZstdCodec

from .format import EPISODES_GROUP, FEATURES_GROUP, MANIFEST_KEY, FormatError, meta_key, shard_key
from .integrity import ALL_CHUNKS_KEY, check_array_meta, small_array_meta, small_chunk_rows
from .shardcodec import _zstd, crc32c
from .storage import LocalStorage, Storage, StoreNotFoundError

__all__ = ["ZarrNodes", "MAX_JSON_BYTES", "near_miss"]

MAX_JSON_BYTES = 64 << 20
"""Largest ``zarr.json`` read (the manifest of a store with many series is a few KiB)."""

_DAMAGED = "run `vlastore verify`"


def near_miss(key: object, target: str) -> bool:
    """``key`` is ``target`` or differs from it in one character (a flipped bit in the name)."""
    return isinstance(key, str) and len(key) == len(target) and sum(a != b for a, b in zip(key, target)) <= 1


def _compressors(compression: str | None) -> list[Any]:
    codecs: list[Any] = [ZstdCodec(level=3)] if compression == "zstd" else []
    return [*codecs, Crc32cCodec()]


class ZarrNodes:
    """The zarr v3 group at a Storage's root, with checked access to its nodes.

    Make one with :meth:`create` (a new, empty store root) or :meth:`open` (an
    existing vlastore store: its root metadata is checked first).
    """

    def __init__(self, storage: Storage, writable: bool, group: zarr.Group | None = None) -> None:
        self.storage = storage
        self.writable = writable
        self._group = group

    def __getstate__(self) -> dict[str, Any]:
        return {"storage": self.storage, "writable": self.writable, "_group": None}  # reopened where unpickled

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(store=self._zarr_store(), mode="r+" if self.writable else "r", zarr_format=3)
        return self._group

    def _zarr_store(self) -> Store:
        store = self.storage.zarr_store()
        if not self.writable and not store.read_only:
            store = store.with_read_only(True)
        return store

    # ----------------------------------------------------------------- opening

    @classmethod
    def create(cls, storage: Storage, attributes: dict[str, Any]) -> ZarrNodes:
        """Create the root group of a new store. Refuses a location that holds anything.

        Raises:
            FileExistsError: the location exists and is not empty.
        """
        occupied = next(iter(storage.list("")), None) is not None
        if isinstance(storage, LocalStorage):
            root = storage.root
            occupied = root.exists() and (not root.is_dir() or any(root.iterdir()))
        if occupied:
            raise FileExistsError(
                f"{storage.location} already exists and is not empty; pick a new path or open the store to add to it"
            )
        group = zarr.create_group(store=storage.zarr_store(), zarr_format=3, attributes=attributes)
        return cls(storage, writable=True, group=group)

    @classmethod
    def open(cls, storage: Storage, writable: bool = False) -> ZarrNodes:
        """Open the root group of an existing vlastore store (its root metadata is checked; nothing else is read).

        Raises:
            StoreNotFoundError: nothing there, or something that is not a vlastore store.
            FormatError: a vlastore store whose root metadata is damaged.
        """
        where = storage.location
        _check_local_root(storage)
        if storage.version(meta_key("")) is None:
            if storage.exists(meta_key(EPISODES_GROUP)) and storage.exists(meta_key(FEATURES_GROUP)):
                raise FormatError(
                    f"{storage.where(meta_key(''))} (the root metadata, with the manifest) is missing; "
                    "the store is damaged: restore it from a copy"
                )
            raise StoreNotFoundError(
                f"{where} is not a vlastore store (no zarr.json); make one with `vlastore demo`, "
                "`vlastore ingest ...` or vlastore.VLAStore.create"
            )
        # read the root metadata first: a damaged store (exit 1, "run verify") is told apart from
        # something that is not a vlastore store at all (a usage mistake)
        nodes = cls(storage, writable)
        meta = nodes.read_json(meta_key(""))  # FormatError when not JSON, UnsafeFileError for a FIFO or link
        attrs = meta.get("attributes") if meta is not None else None
        ours = isinstance(attrs, dict) and any(near_miss(k, MANIFEST_KEY) for k in attrs)
        try:
            nodes.group  # noqa: B018 - opens (and so checks) the zarr group
        except FormatError:
            raise
        except Exception as exc:  # zarr's errors for a missing or damaged zarr.json
            if ours:
                raise FormatError(
                    f"{storage.where(meta_key(''))}: unreadable group metadata ({type(exc).__name__}: "
                    f"{exc}); the store is damaged, {_DAMAGED}"
                ) from None
            raise StoreNotFoundError(
                f"{where} is not a vlastore store (no zarr v3 group: {exc}); make one with "
                "`vlastore demo`, `vlastore ingest ...` or vlastore.VLAStore.create"
            ) from None
        if MANIFEST_KEY not in nodes.group.attrs:
            if ours:
                assert isinstance(attrs, dict)
                raise FormatError(
                    f"{storage.where(meta_key(''))}: the '{MANIFEST_KEY}' attribute is damaged (a near "
                    f"miss {sorted(attrs)!r}); {_DAMAGED}"
                )
            raise StoreNotFoundError(
                f"{where} is a zarr group but not a vlastore store (no '{MANIFEST_KEY}' attribute)"
            )
        return nodes

    def refresh(self) -> None:
        """Re-read the root group's metadata (another process may have changed it)."""
        self._group = None

    # -------------------------------------------------------------- attributes

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def set_root_attribute(self, key: str, value: Any) -> None:
        """Replace one root attribute (local stores replace zarr.json atomically)."""
        self.group.attrs[key] = value

    def set_attribute(self, path: str, key: str, value: Any) -> None:
        """Set one attribute of the group at ``path``."""
        self.group[path].attrs[key] = value

    def read_json(self, key: str) -> dict[str, Any] | None:
        """A ``zarr.json`` (or any JSON object) parsed, or None when absent.

        Raises:
            FormatError: not valid UTF-8 JSON, not an object, or larger than :data:`MAX_JSON_BYTES`.
        """
        data = self.storage.get_range(key, 0, MAX_JSON_BYTES + 1)
        if data is None:
            return None
        where = self.storage.where(key)
        if len(data) > MAX_JSON_BYTES:
            raise FormatError(f"{where} is larger than {MAX_JSON_BYTES:,} bytes; not metadata vlastore wrote")
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{where} is not valid JSON ({exc}); the file is damaged ({_DAMAGED})") from None
        if not isinstance(meta, dict):
            raise FormatError(f"{where} is not a JSON object; the file is damaged")
        return meta

    def node_attrs(self, path: str) -> dict[str, Any]:
        """Attributes of the node at ``path`` (read from its ``zarr.json``).

        Raises:
            FormatError: the node's ``zarr.json`` is missing, unreadable or not a zarr v3 node.
        """
        key = meta_key(path)
        meta = self.read_json(key)
        where = self.storage.where(key)
        if meta is None:
            raise FormatError(f"{where} is missing; the store is damaged ({_DAMAGED})")
        attrs = meta.get("attributes", {})
        if not isinstance(attrs, dict):
            raise FormatError(f"{where}: attributes are not a JSON object; the file is damaged")
        return attrs

    # ------------------------------------------------------------------ nodes

    def exists(self, path: str) -> bool:
        """Whether a node (group or array) exists at ``path`` (its ``zarr.json`` is there)."""
        return self.storage.exists(meta_key(path))

    def delete(self, path: str) -> None:
        """Remove a node and everything under it (never the root; local stores: never outside it)."""
        self.storage.delete_prefix(path)

    def create_group(self, path: str, attributes: dict[str, Any] | None = None) -> None:
        group = self.group.require_group(path)
        if attributes:
            group.attrs.update(attributes)

    def write_small_array(self, path: str, data: np.ndarray, compression: str | None = "zstd") -> None:
        """Create ``path`` holding ``data`` whole (catalog, row tables, robot series)."""
        data = np.asarray(data)
        if data.dtype.kind in "fiu" and not data.dtype.isnative:  # zarr records native order; values stay equal
            data = data.astype(data.dtype.newbyteorder("="))
        chunk_rows = small_chunk_rows(data.shape)
        dtype: Any = str if data.dtype.kind in "UO" else data.dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # zarr notes on string dtypes
            arr = zarr.create_array(
                store=self.storage.zarr_store(),
                name=path,
                shape=data.shape,
                chunks=(chunk_rows, *data.shape[1:]) if data.ndim else (),
                dtype=dtype,
                compressors=_compressors(compression),
                fill_value="" if dtype is str else 0,
                overwrite=True,
                zarr_format=3,
                # a file for every chunk, zeros too: then a missing chunk file is damage, not "all zeros"
                config={"write_empty_chunks": True},
                attributes={ALL_CHUNKS_KEY: "all"},
            )
        if data.size:
            arr[...] = data

    def write_small_fast(self, path: str, data: np.ndarray) -> bytes:
        """Write a numeric small array as zarr-python would (same ``zarr.json``, chunk files of bytes -> zstd ->
        crc32c), straight through the storage: a commit of format 2 writes a dozen of them, and zarr's
        per-array overhead dominated. Returns the ``zarr.json`` bytes. Strings go through zarr.
        """
        data = np.asarray(data)
        if data.dtype.kind not in "fiu" or data.ndim == 0:
            self.write_small_array(path, data)
            return self.storage.get(meta_key(path)) or b""
        data = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False))
        shape = data.shape
        rows = small_chunk_rows(shape)
        first: dict[str, Any] = {"name": "bytes"}
        if data.dtype.itemsize > 1:
            first["configuration"] = {"endian": "little"}
        meta = {
            "shape": list(shape),
            "data_type": data.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows, *shape[1:]]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0.0 if data.dtype.kind == "f" else 0,
            "codecs": [first, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}, {"name": "crc32c"}],
            "attributes": {ALL_CHUNKS_KEY: "all"},
            "zarr_format": 3,
            "node_type": "array",
            "storage_transformers": [],
        }
        codec = _zstd()
        for i in range(-(-shape[0] // rows)):
            chunk = data[i * rows : (i + 1) * rows]
            if len(chunk) < rows:  # zarr stores edge chunks whole, padded with the fill value
                chunk = np.concatenate([chunk, np.zeros((rows - len(chunk), *shape[1:]), dtype=data.dtype)])
            blob = bytes(codec.encode(np.ascontiguousarray(chunk).tobytes()))
            self.storage.put(shard_key(path, i, len(shape)), blob + crc32c(blob).to_bytes(4, "little"))
        body = json.dumps(meta, indent=2).encode()
        self.storage.put(meta_key(path), body)
        return body

    def read_small_fast(self, path: str, meta: dict[str, Any]) -> np.ndarray:
        """A numeric small array written by :meth:`write_small_fast` (or zarr, the same bytes), its ``zarr.json``
        already checked: chunks read, crc32c checked and decoded straight from the storage.

        Raises:
            FormatError: a chunk missing or damaged.
        """
        shape = tuple(meta["shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        chunk_nbytes = rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        parts = []
        codec = _zstd()
        for i in range(-(-shape[0] // rows) if shape[0] else 0):
            key = shard_key(path, i, len(shape))
            raw = self.storage.get(key)
            if raw is None or len(raw) < 4 or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise FormatError(
                    f"{self.storage.where(key)}: chunk {'missing' if raw is None else 'damaged'} (crc32c); {_DAMAGED}"
                )
            try:
                body = codec.decode(raw[:-4])
            except Exception as exc:  # zstd's errors for a damaged frame
                raise FormatError(f"{self.storage.where(key)}: chunk damaged ({exc}); {_DAMAGED}") from None
            if len(body) != chunk_nbytes:
                raise FormatError(f"{self.storage.where(key)}: chunk of {len(body)} bytes, expected {chunk_nbytes}")
            parts.append(np.frombuffer(body, dtype=dtype).reshape(rows, *shape[1:]))
        out = np.concatenate(parts)[: shape[0]] if parts else np.zeros(shape, dtype=dtype)
        return out.astype(dtype.newbyteorder("="), copy=False)

    def create_sharded_array(
        self,
        path: str,
        rows: int,
        row_shape: tuple[int, ...],
        dtype: np.dtype[Any],
        rows_per_shard: int,
        compression: str | None,
        attributes: dict[str, Any],
    ) -> None:
        """Metadata of a ``[rows, *row_shape]`` array, one row per inner chunk, sharded on axis 0.

        Only metadata is written; shard files come from the writer.
        """
        zarr.create_array(
            store=self.storage.zarr_store(),
            name=path,
            shape=(rows, *row_shape),
            chunks=(1, *row_shape),
            shards=(rows_per_shard, *row_shape),
            dtype=dtype,
            compressors=_compressors(compression),
            fill_value=0,
            attributes=attributes,
            overwrite=True,
            zarr_format=3,
        )

    def open_array(self, path: str) -> zarr.Array[Any]:
        """The zarr array at ``path``.

        Raises:
            FormatError: missing, not an array, or its ``zarr.json`` is damaged (naming the file).
        """
        where = self.storage.where(path)
        try:
            arr = self.group[path]
        except FormatError:
            raise
        except KeyError:
            raise FormatError(f"{where}: array missing; the store is damaged ({_DAMAGED})") from None
        except Exception as exc:  # zarr's parse errors of a damaged zarr.json
            raise FormatError(
                f"{self.storage.where(meta_key(path))}: unreadable array metadata "
                f"({type(exc).__name__}: {exc}); the store is damaged ({_DAMAGED})"
            ) from None
        if not isinstance(arr, zarr.Array):
            raise FormatError(f"{where} is a group where an array belongs; the store is damaged")
        return arr

    def read_small_array(self, path: str) -> np.ndarray:
        """A whole small array (catalog, row tables, series).

        Raises:
            FormatError: the array is missing, its metadata or a chunk is damaged (naming the file).
        """
        arr = self.open_array(path)
        try:
            return np.asarray(arr[...])
        except FormatError:
            raise
        except Exception as exc:  # zarr raises codec-specific errors for a crc mismatch or a short chunk
            raise FormatError(
                f"{self.storage.where(path)}: a chunk is damaged ({type(exc).__name__}: {exc}); {_DAMAGED}"
            ) from None

    # ----------------------------------------------------------- checked reads

    def check_small_meta(self, path: str, shape: tuple[int, ...], data_type: str) -> None:
        """A small array's ``zarr.json`` is what vlastore writes for ``shape``/``data_type``, and every chunk
        file is there.

        (zarr reads an absent chunk as the fill value: a deleted chunk would read as zeros. Arrays written
        before every chunk got a file, without the ``vlastore_chunks`` attribute, are read as they are.)
        """
        key = meta_key(path)
        meta = self.read_json(key)
        check_array_meta(meta, small_array_meta(shape, data_type), self.storage.where(key))
        assert meta is not None
        if shape and shape[0] and meta.get("attributes", {}).get(ALL_CHUNKS_KEY) == "all":
            for chunk in range(-(-shape[0] // small_chunk_rows(shape))):
                key = shard_key(path, chunk, len(shape))
                if not self.storage.exists(key):
                    raise FormatError(
                        f"{self.storage.where(path)}: chunk file {key[len(path) + 1 :]} is missing; "
                        f"the store is damaged ({_DAMAGED})"
                    )

    def read_checked(self, path: str, shape: tuple[int, ...], data_type: str) -> np.ndarray:
        """A small array whose ``zarr.json`` is first checked against the shape and type expected of it."""
        self.check_small_meta(path, shape, data_type)
        data = self.read_small_array(path)
        if data.shape != shape:
            raise FormatError(f"{self.storage.where(path)}: read shape {data.shape}, expected {shape}")
        return data


def _check_local_root(storage: Storage) -> None:
    """A local store's folder exists and is a folder (StoreNotFoundError naming what is there otherwise)."""
    if not isinstance(storage, LocalStorage):
        return
    if not storage.root.exists():
        raise StoreNotFoundError(f"{storage.location}: no such store (the path does not exist)")
    if not storage.root.is_dir():
        raise StoreNotFoundError(f"{storage.location} is not a folder, so not a vlastore store")
