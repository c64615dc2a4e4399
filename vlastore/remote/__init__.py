"""Stores on S3-compatible object storage and the node-local shard cache.

- :class:`ObjectStorage`: the storage seam over an ``s3://bucket/prefix`` (botocore;
  see :mod:`vlastore.remote.objects` for why, with measurements).
- :class:`CachedStorage`: wraps it with a node-local cache folder of whole shard
  files, shared by every process on the node, verified on arrival and memory-mapped
  like a local store.

Needs the ``[s3]`` extra (``pip install 'vlastore[s3]'``); importing this package
without it fails only when an :class:`ObjectStorage` is made.
"""

from __future__ import annotations

from .base import AlreadyExistsError, Storage, StorageError, VersionMismatchError
from .cache import CachedStorage, CacheFullError
from .objects import ObjectStorage
from .settings import STORAGE_OPTIONS, S3Settings, parse_s3_url

__all__ = [
    "Storage",
    "StorageError",
    "AlreadyExistsError",
    "VersionMismatchError",
    "ObjectStorage",
    "STORAGE_OPTIONS",
    "S3Settings",
    "parse_s3_url",
    "CachedStorage",
    "CacheFullError",
]
