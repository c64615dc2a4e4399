"""The one place that opens storage.

Everything else goes through :class:`Storage`: zarr groups and array metadata,
small arrays read and written whole, and shard files moved as bytes. A local
store also exposes file paths so the reader can memory-map shards.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .format import MANIFEST_KEY

__all__ = ["Storage", "StoreNotFoundError"]

SMALL_CHUNK_ELEMENTS = 1 << 20


class StoreNotFoundError(FileNotFoundError):
    """The location holds no vlastore store."""


def _compressors(compression: str | None) -> list[Any]:
    codecs: list[Any] = [ZstdCodec(level=3)] if compression == "zstd" else []
    return [*codecs, Crc32cCodec()]


class Storage:
    """A zarr v3 group plus byte-level access to its files."""

    def __init__(self, store: Store, group: zarr.Group, location: str) -> None:
        self.store = store
        self.group = group
        self.location = location
        self.local_root: Path | None = Path(store.root) if isinstance(store, LocalStore) else None

    # ----------------------------------------------------------------- opening

    @classmethod
    def create(cls, location: str | os.PathLike[str] | Store, attributes: dict[str, Any]) -> Storage:
        """Create a new, empty group. Refuses to touch an existing non-empty folder."""
        store, where = cls._store(location, read_only=False)
        if isinstance(store, LocalStore):
            path = Path(store.root)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise FileExistsError(
                    f"{where} already exists and is not empty; pick a new path or open the store "
                    "to add to it"
                )
        group = zarr.create_group(store=store, zarr_format=3, attributes=attributes)
        return cls(store, group, where)

    @classmethod
    def open(cls, location: str | os.PathLike[str] | Store, writable: bool = False) -> Storage:
        """Open an existing vlastore group.

        Raises:
            StoreNotFoundError: nothing there, or a folder that is not a vlastore store.
        """
        store, where = cls._store(location, read_only=not writable)
        if isinstance(store, LocalStore) and not Path(store.root).exists():
            raise StoreNotFoundError(f"{where}: no such store (the path does not exist)")
        try:
            group = zarr.open_group(store=store, mode="r+" if writable else "r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
            raise StoreNotFoundError(
                f"{where} is not a vlastore store (no zarr v3 group: {exc}); make one with "
                "`vlastore demo`, `vlastore ingest ...` or vlastore.VLAStore.create"
            ) from None
        if MANIFEST_KEY not in group.attrs:
            raise StoreNotFoundError(
                f"{where} is a zarr group but not a vlastore store (no '{MANIFEST_KEY}' attribute)"
            )
        return cls(store, group, where)

    @staticmethod
    def _store(location: str | os.PathLike[str] | Store, read_only: bool) -> tuple[Store, str]:
        if isinstance(location, Store):
            return location, repr(location)
        text = os.fspath(location)
        if "://" in text and not text.startswith("file://"):
            from zarr.storage import FsspecStore

            return FsspecStore.from_url(text, read_only=read_only), text
        path = Path(text.removeprefix("file://")).expanduser().absolute()
        return LocalStore(path, read_only=read_only), str(path)

    # -------------------------------------------------------------- attributes

    def refresh(self) -> None:
        """Re-read the root group's metadata (another process may have changed it)."""
        self.group = zarr.open_group(store=self.store, mode="r" if self.store.read_only else "r+", zarr_format=3)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def set_root_attribute(self, key: str, value: Any) -> None:
        """Replace one root attribute; local stores replace zarr.json atomically."""
        self.group.attrs[key] = value

    def node_attrs(self, path: str) -> dict[str, Any]:
        return dict(self.group[path].attrs)

    # ------------------------------------------------------------------ arrays

    def create_group(self, path: str, attributes: dict[str, Any] | None = None) -> None:
        group = self.group.require_group(path)
        if attributes:
            group.attrs.update(attributes)

    def write_small_array(self, path: str, data: np.ndarray, compression: str | None = "zstd") -> None:
        """Create ``path`` holding ``data`` whole (catalog, row tables, robot series)."""
        data = np.asarray(data)
        rows = max(1, data.shape[0]) if data.ndim else 1
        per_row = int(np.prod(data.shape[1:])) if data.ndim > 1 else 1
        chunk_rows = max(1, min(rows, SMALL_CHUNK_ELEMENTS // max(1, per_row)))
        dtype: Any = str if data.dtype.kind in "UO" else data.dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # zarr notes on string dtypes
            arr = zarr.create_array(
                store=self.store,
                name=self._name(path),
                shape=data.shape,
                chunks=(chunk_rows, *data.shape[1:]) if data.ndim else (),
                dtype=dtype,
                compressors=_compressors(compression),
                fill_value="" if dtype is str else 0,
                overwrite=True,
                zarr_format=3,
            )
        if data.size:
            arr[...] = data

    def read_small_array(self, path: str) -> np.ndarray:
        arr = self.group[path]
        assert isinstance(arr, zarr.Array)
        return np.asarray(arr[...])

    def create_sharded_array(
        self,
        path: str,
        rows: int,
        row_shape: tuple[int, ...],
        dtype: np.dtype,
        rows_per_shard: int,
        compression: str | None,
        attributes: dict[str, Any],
    ) -> None:
        """Metadata of a ``[rows, *row_shape]`` array, one row per inner chunk, sharded on axis 0.

        Only metadata is written; shard files come from :meth:`write_shard`.
        """
        zarr.create_array(
            store=self.store,
            name=self._name(path),
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

    def open_array(self, path: str) -> zarr.Array:
        arr = self.group[path]
        assert isinstance(arr, zarr.Array)
        return arr

    def exists(self, path: str) -> bool:
        return path in self.group

    def delete(self, path: str) -> None:
        """Remove a node and everything under it."""
        sync(self.store.delete_dir(self._name(path)))

    def _name(self, path: str) -> str:
        base = self.group.path
        return f"{base}/{path}" if base else path

    # ------------------------------------------------------------ shard files

    def file_path(self, key: str) -> Path | None:
        """Filesystem path of a key, for local stores only."""
        return None if self.local_root is None else self.local_root / self._name(key)

    def read_bytes(self, key: str) -> bytes | None:
        """The whole object at ``key``, or None when absent."""
        path = self.file_path(key)
        if path is not None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None
        buf = sync(self.store.get(self._name(key), prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def read_range(self, key: str, start: int, length: int | None = None) -> bytes | None:
        """``length`` bytes of ``key`` from ``start`` (``start < 0``: the last ``-start`` bytes).

        Remote stores fetch only those bytes (one ranged GET). Returns None when absent.
        """
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        path = self.file_path(key)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    if start < 0:
                        size = f.seek(0, os.SEEK_END)
                        f.seek(max(0, size + start))
                        return f.read()
                    f.seek(start)
                    return f.read(-1 if length is None else length)
            except FileNotFoundError:
                return None
        request: Any
        if start < 0:
            request = SuffixByteRequest(-start)
        else:
            request = RangeByteRequest(start, start + length) if length is not None else None
            if request is None and start:
                from zarr.abc.store import OffsetByteRequest

                request = OffsetByteRequest(start)
        buf = sync(self.store.get(self._name(key), prototype=default_buffer_prototype(), byte_range=request))
        return None if buf is None else buf.to_bytes()

    def key_exists(self, key: str) -> bool:
        path = self.file_path(key)
        if path is not None:
            return path.exists()
        return bool(sync(self.store.exists(self._name(key))))

    def write_once(self, key: str, data: np.ndarray, fsync: bool = False) -> None:
        """Write a whole object that must not exist yet; it appears complete or not at all.

        Local stores write a temporary file and hard-link it into place, which
        fails atomically if another writer got there first.

        Raises:
            FileExistsError: ``key`` was already written (by another writer).
        """
        path = self.file_path(key)
        if path is None:
            if self.key_exists(key):
                raise FileExistsError(key)
            from zarr.core.buffer import cpu

            sync(self.store.set(self._name(key), cpu.Buffer.from_bytes(data.tobytes())))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # filesystems without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def remove_partials(self, key: str) -> None:
        """Delete temporary files a killed :meth:`write_once` of ``key`` left behind (local stores)."""
        path = self.file_path(key)
        if path is None or not path.parent.is_dir():
            return
        for stale in path.parent.glob(f".{path.name}.*.partial"):
            stale.unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``, relative to the group (temporary files skipped)."""
        root = self.file_path(prefix)
        if root is not None:
            if not root.exists():
                return
            base = self.local_root / self.group.path if self.group.path else self.local_root
            assert base is not None
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    if not name.endswith(".partial"):
                        yield os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
            return

        async def collect() -> list[str]:
            return [k async for k in self.store.list_prefix(self._name(prefix))]

        base = self.group.path
        for key in sync(collect()):
            yield key[len(base) + 1 :] if base else key

    def disk_usage(self, prefix: str = "") -> tuple[int, int]:
        """``(bytes, files)`` under ``prefix`` (whole store by default)."""
        total = files = 0
        for key in self.list_keys(prefix):
            files += 1
            path = self.file_path(key)
            if path is not None:
                total += path.stat().st_size
            else:
                total += int(sync(self.store.getsize(self._name(key))))
        return total, files

