"""The one place that opens storage.

Everything else goes through :class:`Storage`: zarr groups and array metadata,
small arrays read and written whole, and shard files moved as bytes. A local
store also exposes file paths so the reader can memory-map shards.

A store may come from someone else, so for local stores every file is opened
only if it is a regular file inside the store's root (no symlink, no FIFO, no
device: :func:`open_regular`), zarr-python itself reads through
:class:`SafeLocalStore`, and nothing is written or deleted outside the root.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .format import MANIFEST_KEY, FormatError
from .integrity import ALL_CHUNKS_KEY, small_chunk_rows
from .localfiles import (
    O_CLOEXEC,
    O_NOFOLLOW,
    PARTIAL_NAME,
    SafeLocalStore,
    UnsafeFileError,
    check_inside,
    fsync_dir,
    host_tag,
    is_store_file,
    near_miss,
    open_regular,
    pid_alive,
    read_fd,
)

__all__ = ["Storage", "StoreNotFoundError", "UnsafeFileError", "SafeLocalStore", "open_regular",
           "ShardChangedError", "TemporaryFileLost", "remove_store", "PARTIAL_MAX_AGE_S", "MAX_JSON_BYTES"]

PARTIAL_MAX_AGE_S = 7 * 24 * 3600
"""A temporary ``.partial`` file of another host (or of unknown origin) is removed only when older than this."""

MAX_JSON_BYTES = 64 << 20
"""Largest ``zarr.json`` read (the manifest of a store with many series is a few KiB)."""

class StoreNotFoundError(FileNotFoundError):
    """The location holds no vlastore store."""


class ShardChangedError(RuntimeError):
    """A shard file changed between being read and being replaced (another writer touched it)."""


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
        self.root_real: str | None = os.path.realpath(self.local_root) if self.local_root is not None else None

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
        if isinstance(store, LocalStore):
            root = Path(store.root)
            if not root.exists():
                raise StoreNotFoundError(f"{where}: no such store (the path does not exist)")
            if not root.is_dir():
                raise StoreNotFoundError(f"{where} is not a folder, so not a vlastore store")
            if not (root / "zarr.json").exists() and not (root / "zarr.json").is_symlink():
                if (root / "episodes" / "zarr.json").is_file() and (root / "features" / "zarr.json").is_file():
                    raise FormatError(f"{where}/zarr.json (the root metadata, with the manifest) is missing; the "
                                      "store is damaged: restore it from a copy")
                raise StoreNotFoundError(
                    f"{where} is not a vlastore store (no zarr.json); make one with `vlastore demo`, "
                    "`vlastore ingest ...` or vlastore.VLAStore.create"
                )
        # read the root metadata first: a damaged store (exit 1, "run verify") is told apart from
        # something that is not a vlastore store at all (a usage mistake)
        probe = cls(store, None, where)  # type: ignore[arg-type]
        meta = probe.read_json("zarr.json")  # FormatError when not JSON, UnsafeFileError for a FIFO or link
        attrs = meta.get("attributes") if meta is not None else None
        ours = isinstance(attrs, dict) and any(near_miss(k, MANIFEST_KEY) for k in attrs)
        try:
            group = zarr.open_group(store=store, mode="r+" if writable else "r", zarr_format=3)
        except FormatError:
            raise
        except Exception as exc:  # zarr's errors for a missing or damaged zarr.json
            if ours:
                raise FormatError(f"{where}/zarr.json: unreadable group metadata ({type(exc).__name__}: {exc}); "
                                  "the store is damaged, run `vlastore verify`") from None
            raise StoreNotFoundError(
                f"{where} is not a vlastore store (no zarr v3 group: {exc}); make one with "
                "`vlastore demo`, `vlastore ingest ...` or vlastore.VLAStore.create"
            ) from None
        if MANIFEST_KEY not in group.attrs:
            if ours:
                raise FormatError(f"{where}/zarr.json: the '{MANIFEST_KEY}' attribute is damaged (a near miss "
                                  f"{sorted(attrs)!r}); run `vlastore verify`")  # type: ignore[arg-type]
            raise StoreNotFoundError(
                f"{where} is a zarr group but not a vlastore store (no '{MANIFEST_KEY}' attribute)"
            )
        return cls(store, group, where)

    @staticmethod
    def _store(location: str | os.PathLike[str] | Store, read_only: bool) -> tuple[Store, str]:
        if isinstance(location, LocalStore):  # zarr reads a local store only through the checks of SafeLocalStore
            safe = location if isinstance(location, SafeLocalStore) else SafeLocalStore(
                location.root, read_only=location.read_only)
            return safe, str(Path(location.root).absolute())
        if isinstance(location, Store):
            return location, repr(location)
        text = os.fspath(location)
        if "://" in text and not text.startswith("file://"):
            from zarr.storage import FsspecStore

            return FsspecStore.from_url(text, read_only=read_only), text
        path = Path(text.removeprefix("file://")).expanduser().absolute()
        return SafeLocalStore(path, read_only=read_only), str(path)

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
        """Attributes of the node at ``path`` (read from its ``zarr.json``).

        Raises:
            FormatError: the node's ``zarr.json`` is missing, unreadable or not a zarr v3 node.
        """
        meta = self.read_json(f"{path}/zarr.json")
        if meta is None:
            raise FormatError(f"{self.where(path)}/zarr.json is missing; the store is damaged (run `vlastore verify`)")
        attrs = meta.get("attributes", {})
        if not isinstance(attrs, dict):
            raise FormatError(f"{self.where(path)}/zarr.json: attributes are not a JSON object; the file is damaged")
        return attrs

    def where(self, key: str) -> str:
        """How to name ``key`` in a message: a file path for local stores."""
        path = self.file_path(key)
        return str(path) if path is not None else f"{self.location}/{key}"

    def read_json(self, key: str) -> dict[str, Any] | None:
        """A ``zarr.json`` (or any JSON object) parsed, or None when absent.

        Raises:
            FormatError: not valid UTF-8 JSON, not an object, or larger than :data:`MAX_JSON_BYTES`.
        """
        data = self.read_range(key, 0, MAX_JSON_BYTES + 1)
        if data is None:
            return None
        if len(data) > MAX_JSON_BYTES:
            raise FormatError(f"{self.where(key)} is larger than {MAX_JSON_BYTES:,} bytes; not metadata vlastore wrote")
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{self.where(key)} is not valid JSON ({exc}); the file is damaged "
                              "(run `vlastore verify`)") from None
        if not isinstance(meta, dict):
            raise FormatError(f"{self.where(key)} is not a JSON object; the file is damaged")
        return meta

    # ------------------------------------------------------------------ arrays

    def create_group(self, path: str, attributes: dict[str, Any] | None = None) -> None:
        self._check_writable_path(path)
        group = self.group.require_group(path)
        if attributes:
            group.attrs.update(attributes)

    def write_small_array(self, path: str, data: np.ndarray, compression: str | None = "zstd") -> None:
        """Create ``path`` holding ``data`` whole (catalog, row tables, robot series)."""
        self._check_writable_path(path)
        data = np.asarray(data)
        if data.dtype.kind in "fiu" and not data.dtype.isnative:  # zarr records native order; values stay equal
            data = data.astype(data.dtype.newbyteorder("="))
        chunk_rows = small_chunk_rows(data.shape)
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
                # a file for every chunk, zeros too: then a missing chunk file is damage, not "all zeros"
                config={"write_empty_chunks": True},
                attributes={ALL_CHUNKS_KEY: "all"},
            )
        if data.size:
            arr[...] = data

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
            raise FormatError(f"{self.where(path)}: a chunk is damaged ({type(exc).__name__}: {exc}); "
                              "run `vlastore verify`") from None

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
        self._check_writable_path(path)
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
        """The zarr array at ``path``.

        Raises:
            FormatError: missing, not an array, or its ``zarr.json`` is damaged (naming the file).
        """
        try:
            arr = self.group[path]
        except FormatError:
            raise
        except KeyError:
            raise FormatError(f"{self.where(path)}: array missing; the store is damaged (run `vlastore verify`)") \
                from None
        except Exception as exc:  # zarr's parse errors of a damaged zarr.json
            raise FormatError(f"{self.where(path)}/zarr.json: unreadable array metadata ({type(exc).__name__}: "
                              f"{exc}); the store is damaged (run `vlastore verify`)") from None
        if not isinstance(arr, zarr.Array):
            raise FormatError(f"{self.where(path)} is a group where an array belongs; the store is damaged")
        return arr

    def exists(self, path: str) -> bool:
        """Whether a node (group or array) exists at ``path`` (its ``zarr.json`` is there)."""
        return self.key_exists(f"{path}/zarr.json")

    def delete(self, path: str) -> None:
        """Remove a node and everything under it (local stores: only inside the store's root).

        Raises:
            UnsafeFileError: the node is, or lies under, a symbolic link leading out of the store.
        """
        local = self.file_path(path)
        if local is not None:
            assert self.root_real is not None
            if not path.strip("/") or os.path.realpath(local) == self.root_real:
                raise UnsafeFileError(f"refusing to delete the store's root {self.location} through delete()")
            check_inside(local, self.root_real)
            if local.is_symlink():
                raise UnsafeFileError(f"{local} is a symbolic link; vlastore deletes only the store's own folders")
            if local.is_dir():
                shutil.rmtree(local)
            return
        sync(self.store.delete_dir(self._name(path)))

    def _check_writable_path(self, path: str) -> None:
        local = self.file_path(path)
        if local is not None:
            assert self.root_real is not None
            check_inside(local, self.root_real)

    def _name(self, path: str) -> str:
        base = self.group.path if self.group is not None else ""
        return f"{base}/{path}" if base else path

    # ------------------------------------------------------------ shard files

    def file_path(self, key: str) -> Path | None:
        """Filesystem path of a key, for local stores only."""
        return None if self.local_root is None else self.local_root / self._name(key)

    def open_file(self, key: str) -> int | None:
        """A read-only descriptor of a local store's file (regular files inside the root only), None if absent.

        Raises:
            UnsafeFileError: a symlink, FIFO, device or directory, or a path leading out of the store.
        """
        path = self.file_path(key)
        assert path is not None and self.root_real is not None, "open_file is for local stores"
        return open_regular(path, self.root_real)

    def read_bytes(self, key: str) -> bytes | None:
        """The whole object at ``key``, or None when absent."""
        return self.read_range(key, 0)

    def read_range(self, key: str, start: int, length: int | None = None) -> bytes | None:
        """``length`` bytes of ``key`` from ``start`` (``start < 0``: the last ``-start`` bytes).

        Remote stores fetch only those bytes (one ranged GET). Returns None when absent.
        """
        path = self.file_path(key)
        if path is not None:
            fd = self.open_file(key)
            return None if fd is None else read_fd(fd, start, length)
        request: Any
        if start < 0:
            request = SuffixByteRequest(-start)
        elif length is not None:
            request = RangeByteRequest(start, start + length)
        else:
            request = OffsetByteRequest(start) if start else None
        buf = sync(self.store.get(self._name(key), prototype=default_buffer_prototype(), byte_range=request))
        return None if buf is None else buf.to_bytes()

    def read_versioned(self, key: str) -> tuple[bytes, Any] | None:
        """The whole object and a token that :meth:`replace` compares to see whether it changed since."""
        path = self.file_path(key)
        if path is None:
            data = self.read_bytes(key)
            return None if data is None else (data, data)
        fd = self.open_file(key)
        if fd is None:
            return None
        st = os.fstat(fd)
        return read_fd(fd), (st.st_ino, st.st_size, st.st_mtime_ns)

    def entry_token(self, key: str) -> Any:
        """What :meth:`replace` compares: (inode, size, mtime) of a local file (None if absent); None remotely."""
        path = self.file_path(key)
        if path is None:
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def key_exists(self, key: str) -> bool:
        path = self.file_path(key)
        if path is not None:
            try:
                return stat.S_ISREG(os.lstat(path).st_mode)
            except OSError:
                return False
        return bool(sync(self.store.exists(self._name(key))))

    def _temp_path(self, path: Path) -> Path:
        # host and pid in the name: a resuming writer removes only temporaries of dead processes
        return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.{uuid.uuid4().hex}.partial")

    def _write_temp(self, path: Path, data: np.ndarray, fsync: bool) -> Path:
        assert self.root_real is not None
        check_inside(path.parent, self.root_real)
        path.parent.mkdir(parents=True, exist_ok=True)
        check_inside(path.parent, self.root_real)
        tmp = self._temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(np.ascontiguousarray(data).data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # disk full, file size limit, ...: no partial file stays behind
            raise
        return tmp

    def write_once(self, key: str, data: np.ndarray, fsync: bool = False) -> None:
        """Write a whole object that must not exist yet; it appears complete or not at all.

        Local stores write a temporary file and hard-link it into place, which
        fails atomically if another writer got there first.

        Raises:
            FileExistsError: ``key`` was already written (by another writer).
            TemporaryFileLost: the temporary file was removed by another process meanwhile.
        """
        path = self.file_path(key)
        if path is None:
            if self.key_exists(key):
                raise FileExistsError(key)
            from zarr.core.buffer import cpu

            sync(self.store.set(self._name(key), cpu.Buffer.from_bytes(data.tobytes())))
            return
        tmp = self._write_temp(path, data, fsync)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except FileNotFoundError:
                raise TemporaryFileLost(
                    f"the temporary file {tmp} of {path} was removed by another process while this one wrote "
                    "it (a second writer for the same shards, or a cleanup of the folder)"
                ) from None
            except OSError:  # filesystems without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
            if fsync:
                fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def replace(self, key: str, data: np.ndarray, version: Any, fsync: bool = False) -> None:
        """Replace an object read with :meth:`read_versioned`, atomically, if it is still the one read.

        Local stores write a temporary file, check the target still has the inode,
        size and mtime read before, and ``os.replace`` it; readers see the old or the
        new file, never a mix.

        Raises:
            ShardChangedError: the object changed (or vanished) since it was read.
        """
        path = self.file_path(key)
        if path is None:
            current = self.read_bytes(key)
            if current != version:
                raise ShardChangedError(f"{self.where(key)} changed since it was read")
            from zarr.core.buffer import cpu

            sync(self.store.set(self._name(key), cpu.Buffer.from_bytes(data.tobytes())))
            return
        tmp = self._write_temp(path, data, fsync)
        try:
            try:
                st = os.lstat(path)
                now = (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                now = None
            if now != version:
                raise ShardChangedError(f"{path} changed since it was read (another writer replaced it)")
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                raise TemporaryFileLost(f"the temporary file {tmp} of {path} was removed by another process "
                                        "while this one wrote it") from None
            if fsync:
                fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def remove_partials(self, key: str, max_age_s: float = PARTIAL_MAX_AGE_S) -> int:
        """Delete temporary files that killed writers of ``key`` left behind (local stores); returns how many.

        Only temporaries of dead processes of this host are removed, and those of
        other hosts (or of older vlastore versions) once older than ``max_age_s``:
        a live writer's temporary file is never touched.
        """
        path = self.file_path(key)
        if path is None or not path.parent.is_dir():
            return 0
        assert self.root_real is not None
        check_inside(path.parent, self.root_real)
        host, now, removed = host_tag(), time.time(), 0
        with os.scandir(path.parent) as entries:
            for entry in entries:
                match = PARTIAL_NAME.match(entry.name)
                if match is None or match.group("name") != path.name or not entry.is_file(follow_symlinks=False):
                    continue
                pid = match.group("pid")
                if match.group("host") == host and pid is not None:
                    stale = int(pid) != os.getpid() and not pid_alive(int(pid))
                else:
                    try:
                        stale = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
                    except FileNotFoundError:
                        continue
                if stale:
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``, relative to the group (temporary files skipped)."""
        root = self.file_path(prefix)
        if root is not None:
            if not root.exists():
                return
            base = self.local_root / self.group.path if self.group.path else self.local_root
            assert base is not None
            if root.is_symlink():  # never list (or later open) what a link out of the store points to
                return
            for dirpath, _dirs, files in os.walk(root):  # os.walk does not descend into symlinked folders
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
                try:
                    total += os.lstat(path).st_size
                except FileNotFoundError:  # removed since listed (a generation switched meanwhile)
                    files -= 1
            else:
                total += int(sync(self.store.getsize(self._name(key))))
        return total, files



def remove_store(location: str | os.PathLike[str]) -> int:
    """Delete a local vlastore store: its files only, and only if it holds nothing else.

    Returns the number of files removed.

    Raises:
        StoreNotFoundError: ``location`` is not a vlastore store (nothing is deleted).
        UnsafeFileError: the folder holds anything a store does not (another file,
            a symlink, a FIFO): nothing is deleted, the message names a few.
    """
    root = Path(location).absolute()
    if root.is_symlink():
        raise UnsafeFileError(f"{root} is a symbolic link; refusing to delete what it points to")
    Storage.open(root)  # raises StoreNotFoundError unless it is a vlastore store
    files: list[Path] = []
    dirs: list[Path] = []
    foreign: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath) / name
            (foreign.append(str(path.relative_to(root))) if path.is_symlink() else dirs.append(path))
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if stat.S_ISREG(os.lstat(path).st_mode) and is_store_file(root, list(rel.parts)):
                files.append(path)
            else:
                foreign.append(str(rel))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UnsafeFileError(f"{root} holds files that are not part of a vlastore store ({shown}); nothing was "
                              "deleted. Move them away, or choose another path")
    for path in files:
        path.unlink()
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        path.rmdir()  # empty by now; a file added meanwhile makes this fail instead of deleting it
    root.rmdir()
    return len(files)


class TemporaryFileLost(RuntimeError):
    """A writer's temporary file vanished before it was linked into place (another process removed it)."""

