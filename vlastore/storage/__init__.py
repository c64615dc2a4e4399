"""Where a store's bytes live: the storage seam and its implementations.

- :class:`Storage` (:mod:`.base`): the one interface readers, writers and the
  store move bytes through (whole objects, ranges, maps, put-if-absent,
  compare-and-swap, list, delete).
- :class:`LocalStorage` (:mod:`.local`): a folder of files.
- :class:`ZarrStoreStorage` (:mod:`.zarrstore`): any zarr ``Store`` (e.g.
  ``MemoryStore``); :class:`SeamStore` is the other way round, zarr-python over
  any Storage.
- :class:`ObjectStorage` (:mod:`.objects`): ``s3://bucket/prefix`` (needs the
  ``[s3]`` extra only when one is made); :class:`CachedStorage` (:mod:`.cache`):
  a node-local cache of whole shard files in front of it.

:func:`open_storage` turns what a user gives (a path, an ``s3://`` URL, a zarr
``Store`` or a Storage) into a Storage.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from zarr.abc.store import Store
from zarr.storage import LocalStore

from .base import (
    AlreadyExistsError,
    BucketNotFoundError,
    Storage,
    StorageError,
    StoreNotFoundError,
    TemporaryFileLost,
    VersionMismatchError,
    coalesce_ranges,
)
from .cache import CachedStorage, CacheFullError
from .local import LocalStorage, SafeLocalStore, UnsafeFileError
from .objects import ObjectStorage
from .settings import (
    CACHE_OPTIONS,
    STORAGE_OPTIONS,
    CacheSettings,
    S3Settings,
    check_options,
    options_from_env,
    parse_s3_url,
    split_options,
)
from .zarrstore import SeamStore, ZarrStoreStorage

__all__ = [
    "Storage",
    "StorageError",
    "AlreadyExistsError",
    "BucketNotFoundError",
    "VersionMismatchError",
    "TemporaryFileLost",
    "StoreNotFoundError",
    "UnsafeFileError",
    "LocalStorage",
    "SafeLocalStore",
    "ZarrStoreStorage",
    "SeamStore",
    "ObjectStorage",
    "STORAGE_OPTIONS",
    "CACHE_OPTIONS",
    "S3Settings",
    "CacheSettings",
    "check_options",
    "parse_s3_url",
    "CachedStorage",
    "CacheFullError",
    "coalesce_ranges",
    "open_storage",
    "Location",
]

Location = str | os.PathLike[str] | Store | Storage
"""What a store can be opened from: a path, an ``s3://`` URL, a zarr ``Store`` or a :class:`Storage`."""


def open_storage(location: Location, storage_options: dict[str, Any] | None = None) -> Storage:
    """The Storage for a location.

    Args:
        location: a folder (``str``/``PathLike``, or ``file://`` URL), an
            ``s3://bucket/prefix`` URL, a zarr ``Store`` (a ``LocalStore`` becomes
            the safe :class:`LocalStorage` of its folder), or a Storage (returned as is).
        storage_options: for ``s3://`` URLs: endpoint, credentials, retries
            (:data:`STORAGE_OPTIONS`), and the node cache (:data:`CACHE_OPTIONS`: ``cache_dir``,
            ``cache_max_bytes``, ...); refused for the other kinds. They override the options of the
            ``VLASTORE_STORAGE_OPTIONS`` environment variable (JSON; the CLI sets it from
            ``--storage-option``), which override the AWS variables. With a cache folder (the option, or
            ``VLASTORE_CACHE``) the result is a :class:`CachedStorage`.

    Raises:
        ValueError: a URL scheme vlastore cannot reach, or options for a location that takes none.
    """
    if storage_options and not (isinstance(location, str) and location.startswith("s3://")):
        raise ValueError(
            f"storage_options are for s3:// locations; {location!r} takes none (open the Storage "
            "yourself and pass it instead)"
        )
    if isinstance(location, Storage):
        return location
    if isinstance(location, SeamStore):
        return location.storage
    if isinstance(location, LocalStore):  # zarr reads a local store only through the checks of LocalStorage
        return LocalStorage(location.root)
    if isinstance(location, Store):
        return ZarrStoreStorage(location)
    text = os.fspath(location)
    if text.startswith("s3://"):
        return _object_storage(text, {**options_from_env(), **(storage_options or {})})
    if "://" in text and not text.startswith("file://"):
        raise ValueError(
            f"{text}: vlastore reaches local folders, file:// and s3:// URLs; for another kind of "
            "location, open a zarr Store (or a vlastore Storage) for it and pass that"
        )
    return LocalStorage(text.removeprefix("file://"))


def _object_storage(url: str, options: dict[str, Any]) -> Storage:
    remote_options, cache_options = split_options(options)
    cache = CacheSettings.resolve(cache_options)
    remote = ObjectStorage(url, remote_options)
    if cache.cache_dir is None:
        return remote
    max_bytes = cache.max_bytes
    if max_bytes is None:
        folder = os.path.expanduser(cache.cache_dir)
        os.makedirs(folder, exist_ok=True)
        max_bytes = max(1 << 20, int(shutil.disk_usage(folder).free * 0.8))
    return CachedStorage(
        remote, cache.cache_dir, max_bytes, on_full=cache.on_full, prefetch_threads=cache.prefetch_threads
    )
