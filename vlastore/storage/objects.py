"""The storage seam over S3-compatible object storage (``s3://bucket/prefix``).

Why botocore. Measured with ``python tools/bench_remote.py --clients`` (moto on
loopback in its own process, 2-core machine shared with other jobs, medians of
5-50 requests; two runs, as ratios to obstore in the same run)::

    operation              obstore            botocore                  s3fs
    ranged 4 KiB GET       1.0                0.65-1.16                 0.82-1.09
    GET 32 MiB             1.0                0.94-1.45                 1.10-4.36
    PUT 1 MiB              1.0                0.45-1.31                 1.12-1.18
    put-if-absent 1 MiB    1.0                0.31-1.39                 0.90-1.08
    put-if-match (CAS)     1.0                0.50-1.65                 0.47-1.12
    LIST 500 keys          1.0                1.05-1.24                 0.64-0.97
    stale If-Match gives   PreconditionError  412 PreconditionFailed    OSError(EINVAL), as any bad request
    in a forked child      hangs for ever     works (client per pid)    works (a new instance)

On loopback the three move bytes at about the same speed (the differences are
within the 2x run-to-run noise, except s3fs's whole-object GET). What decides is
the last row: obstore's tokio runtime does not survive ``fork()``; once the
parent has made one request, every obstore call in a forked child hangs (its
maintainers: "obstore is not fork safe"). PyTorch DataLoader workers are forked
by default and are exactly the processes that read shards, so obstore would turn
a training run into a silent hang. s3fs survives fork (with a new instance) but
reports a lost compare-and-swap as a bare ``OSError(EINVAL)``. botocore (which
s3fs runs on) is thread-safe, has ``IfNoneMatch``/``IfMatch`` on ``PutObject``
with a 412 and its error code, streams bodies, and works in a forked child with a
client made there: this module keeps one client per process id.

zarr-python gets :class:`vlastore.storage.zarrstore.SeamStore` over this storage
(the same client, retries and checks): zarr has no botocore store, ``ObjectStore``
(obstore) would bring the fork hang back into any process that reads metadata
through zarr, and s3fs's pins of fsspec and aiobotocore made ``pip install
vlastore[dev]`` unresolvable next to the CPU torch wheel.

What this module adds over the raw client:

- one retry policy for every request: 5xx, 408/429, connection errors, timeouts,
  resets and truncated bodies are retried with exponential backoff and jitter;
  other 4xx never are. After the last retry a :class:`StorageError` says what,
  where, and that a rerun retries.
- truncation checks on every read: the body length against Content-Length and
  Content-Range, and against the crc32c that every ``put`` stores in the
  object's metadata (``x-amz-meta-vlastore-crc32c``) for whole-object reads, so
  a short or damaged body is retried, never returned.
- idempotent conditional writes: each ``put_if_absent``/``put_if_version`` tags
  the object with a random write token; when a retried attempt meets a 412, the
  token tells whether the 412 is our own earlier attempt (the answer was lost)
  or another writer.
- ``get_ranges`` coalesces touching/overlapping ranges into one request per run
  and fetches the runs in parallel.
- ``download`` streams an object to a file, resuming after a broken connection
  with ``Range`` + ``If-Match`` (used by the node cache).
"""

from __future__ import annotations

import base64
import builtins
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np
from crc32c import crc32c

from .base import (
    AlreadyExistsError,
    BucketNotFoundError,
    Buffer,
    Storage,
    StorageError,
    VersionMismatchError,
    check_key,
    check_prefix,
    coalesce_ranges,
)
from .settings import STORAGE_OPTIONS, S3Settings, parse_s3_url

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = ["ObjectStorage", "ObjectInfo", "S3Settings", "STORAGE_OPTIONS", "parse_s3_url"]

T = TypeVar("T")
_T = TypeVar("_T")
_R = TypeVar("_R")
log = logging.getLogger(__name__)

_CRC_META = "vlastore-crc32c"  # hex crc32c of the whole object, written by every put of this module
_TOKEN_META = "vlastore-write"  # random token of a conditional write, to recognise our own lost answer
_MAX_PUT = 5 * 1024**3  # S3's limit for one PUT; shards are far smaller (a few to 64 MiB)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SESSIONS: dict[tuple[int, str | None], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _SESSIONS_LOCK
    _SESSIONS_LOCK = threading.Lock()  # a thread of the parent may have held it at fork()
    _SESSIONS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ConditionalRequestConflict",
    "OperationAborted",
    "Throttling",
    "ThrottlingException",
}


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells about an object."""

    size: int
    version: str  # the ETag, quotes included: what If-Match wants back
    crc32c: int | None  # of the whole object, when this module wrote it


class _Truncated(Exception):
    """A body shorter (or longer) than the headers promised, or one whose crc32c does not match."""


@dataclass
class _ProcessState:
    """What must not cross fork(): the client (its connection pool) and the thread pool."""

    pid: int
    client: Any
    executor: ThreadPoolExecutor | None = None
    meta_executor: ThreadPoolExecutor | None = None  # parallel_map's (its calls may use executor's)
    zarr_store: Any = None
    bucket_ok: bool = False  # a HEAD of the bucket said it exists


def _error_status(exc: BaseException) -> tuple[int, str]:
    response = getattr(exc, "response", None) or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status, str(response.get("Error", {}).get("Code") or "")


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    # BotoConnectionError: the endpoint refused or did not answer the connection (EndpointConnectionError,
    # ConnectTimeoutError): retried, and reported with the endpoint to check when it persists
    if isinstance(
        exc, _Truncated | HTTPClientError | IncompleteReadError | ResponseStreamingError | BotoConnectionError
    ):
        return True
    if isinstance(exc, ClientError):
        status, code = _error_status(exc)
        # 408 and 429 are 4xx that mean "try again later"; every other 4xx is final
        return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
    return isinstance(exc, ConnectionError | TimeoutError)


def _body_bytes(data: Buffer) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return bytes(memoryview(data).cast("B"))


class ObjectStorage(Storage):
    """Bytes under ``s3://bucket/prefix`` on S3 or any S3-compatible service.

    Args:
        url: ``s3://bucket/prefix`` (the prefix is the store's root; it may be empty).
        options: see :data:`STORAGE_OPTIONS`; they override the AWS environment variables.

    Safe to share between threads; after ``fork()`` each process makes its own client.
    Picklable (the URL and options travel, not the connections).
    """

    is_local = False

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.options = dict(options or {})
        self.settings = S3Settings.resolve(self.options)
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._state: _ProcessState | None = None
        self._state_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, options: dict[str, Any] | None = None) -> ObjectStorage:
        """Storage at ``url``; no request is made until the first read or write."""
        return cls(url, options)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.location, self.options))

    # ------------------------------------------------------------- plumbing

    def _process(self) -> _ProcessState:
        state = self._state
        pid = os.getpid()
        if state is not None and state.pid == pid:
            return state
        if state is not None:  # forked: the parent's lock and pools are not ours
            self._state_lock = threading.Lock()
        with self._state_lock:
            if self._state is None or self._state.pid != pid:
                self._state = _ProcessState(pid, self._make_client())
            return self._state

    def _make_client(self) -> Any:
        try:
            import botocore.session
            from botocore import UNSIGNED
            from botocore.config import Config
        except ImportError:
            raise ImportError(f"{self.location}: object storage needs botocore; pip install 'vlastore[s3]'") from None
        s = self.settings
        config = Config(
            region_name=s.region,
            signature_version=UNSIGNED if s.anonymous else "s3v4",
            s3={"addressing_style": s.addressing_style},
            connect_timeout=s.connect_timeout_s,
            read_timeout=s.read_timeout_s,
            max_pool_connections=s.max_connections,
            retries={"mode": "standard", "total_max_attempts": 1},  # retries are ours: one policy, one count
            # S3-compatible services reject the trailing checksums newer botocore sends by default
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        with _SESSIONS_LOCK:  # creating clients from one session is not thread-safe
            key = (os.getpid(), s.profile)
            session = _SESSIONS.get(key)
            if session is None:  # a session loads the service models once (about 0.5 s): keep one per process
                session = botocore.session.Session(profile=s.profile) if s.profile else botocore.session.Session()
                _SESSIONS[key] = session
            return session.create_client(
                "s3",
                endpoint_url=s.endpoint,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                aws_session_token=s.session_token,
                config=config,
            )

    @property
    def _client(self) -> Any:
        return self._process().client

    def _executor(self) -> ThreadPoolExecutor:
        state = self._process()
        if state.executor is None:
            state.executor = ThreadPoolExecutor(self.settings.max_connections, thread_name_prefix="vlastore-s3")
        return state.executor

    def _full(self, key: str) -> str:
        return self._root + check_key(key)

    def _where(self, key: str) -> str:
        return f"{self.location}/{key}"

    def _retry(self, what: str, key: str, request: Callable[[], T]) -> T:
        """Run ``request`` with the retry policy; final errors become clear exceptions."""
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            try:
                return request()
            except Exception as exc:
                if not _is_transient(exc):
                    raise self._final_error(what, key, exc) from exc
                if attempt + 1 == attempts:
                    raise StorageError(
                        f"{what} {self._where(key)} failed {attempts} times, last with {_describe(exc)}; the object "
                        "store or the network is failing: check the endpoint, then rerun (writes are atomic, so a "
                        "rerun retries only what is missing)"
                    ) from exc
                backoff = min(10.0, self.settings.retry_backoff_s * 2**attempt)
                time.sleep(backoff * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    def _final_error(self, what: str, key: str, exc: Exception) -> Exception:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, AlreadyExistsError | VersionMismatchError | ValueError | FileNotFoundError):
            return exc
        if isinstance(exc, NoCredentialsError):
            return PermissionError(
                f"{what} {self._where(key)}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile, or the storage options access_key_id/secret_access_key (anonymous=true for public data)"
            )
        if isinstance(exc, ClientError):
            status, code = _error_status(exc)
            if status in (401, 403):
                return PermissionError(
                    f"{what} {self._where(key)}: access denied (HTTP {status} {code}); check the credentials and "
                    "that they may read/write this bucket and prefix"
                )
            if code == "NoSuchBucket":
                return self._no_bucket(what, key)
            return StorageError(
                f"{what} {self._where(key)}: the server refused the request (HTTP {status} {code}: "
                f"{exc}); this is not a transient error, so it was not retried"
            )
        return exc

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> bytes | None:
        found = self._get_whole(key)
        return None if found is None else found[0]

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        return self._get_whole(key)

    def _get_whole(self, key: str) -> tuple[bytes, str] | None:
        full = self._full(key)

        def request() -> tuple[bytes, str] | None:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full)
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise
            body = response["Body"].read()
            if len(body) != int(response["ContentLength"]):
                raise _Truncated(f"body of {len(body)} bytes, Content-Length {response['ContentLength']}")
            _check_crc(response.get("Metadata") or {}, body)
            return body, response["ETag"]

        return self._retry("reading", key, request)

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        if start < 0 and end is not None:
            raise ValueError(f"get_range({key!r}, {start}, {end}): a suffix read (start < 0) takes no end")
        if end is not None and end <= start:
            return b"" if self.size(key) is not None else None
        return self._get_span(key, start, end)

    def _get_span(self, key: str, start: int, end: int | None) -> bytes | None:
        """Bytes ``[start, end)`` clipped to the object (``start < 0``: the last ``-start`` bytes)."""
        full = self._full(key)
        header = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        if start < 0:
            header = f"bytes={start}"

        def request() -> bytes | None:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full, Range=header)
            except Exception as exc:
                if _is_missing(exc):
                    return None
                if _error_status(exc)[0] == 416:  # the range starts past the end (or the object is empty)
                    return b""
                raise
            body = response["Body"].read()
            if len(body) != int(response["ContentLength"]):
                raise _Truncated(f"body of {len(body)} bytes, Content-Length {response['ContentLength']}")
            content_range = response.get("ContentRange")
            if not content_range:  # the server ignored Range and sent the whole object
                _check_crc(response.get("Metadata") or {}, body)
                return body[start:] if end is None else body[start:end] if start >= 0 else body[start:]
            _check_range(content_range, body, start, end)
            return body

        return self._retry("reading a range of", key, request)

    def parallel_map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> builtins.list[_R]:
        """``fn`` over ``items`` in threads of their own (a pool apart from :meth:`get_ranges`'s, so ``fn`` may
        call it): the round trips of many small reads overlap instead of adding up."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        state = self._process()
        with self._state_lock:
            if state.meta_executor is None:
                state.meta_executor = ThreadPoolExecutor(
                    self.settings.max_connections, thread_name_prefix="vlastore-s3-meta"
                )
        return list(state.meta_executor.map(fn, items))

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        ranges = [(int(a), int(b)) for a, b in ranges]
        runs = coalesce_ranges(ranges, self.settings.coalesce_gap)
        if len(runs) == 1:
            fetched = [self._get_span(key, runs[0][0], runs[0][1])]
        else:
            fetched = list(self._executor().map(lambda run: self._get_span(key, run[0], run[1]), runs))
        if any(data is None for data in fetched) or (not runs and self.size(key) is None):
            raise FileNotFoundError(f"{self._where(key)}: no such object")
        out = [b""] * len(ranges)
        for (run_start, _, members), data in zip(runs, fetched):
            view = memoryview(data)  # type: ignore[arg-type]
            for i in members:
                start, end = ranges[i]
                out[i] = bytes(view[start - run_start : end - run_start])
        return out

    def head(self, key: str) -> ObjectInfo | None:
        """Size, version (ETag) and stored crc32c of an object; None if absent."""
        full = self._full(key)

        def request() -> ObjectInfo | None:
            try:
                response = self._client.head_object(Bucket=self.bucket, Key=full)
            except Exception as exc:
                if _is_missing(exc):
                    self._check_bucket()
                    return None
                raise
            crc = (response.get("Metadata") or {}).get(_CRC_META)
            return ObjectInfo(int(response["ContentLength"]), response["ETag"], int(crc, 16) if crc else None)

        return self._retry("looking up", key, request)

    def _no_bucket(self, what: str, key: str) -> BucketNotFoundError:
        endpoint = self.settings.endpoint or "AWS"
        return BucketNotFoundError(
            f"{what} {self._where(key)}: bucket {self.bucket!r} does not exist on {endpoint}; create it, or fix the "
            "URL or the endpoint (--storage-option endpoint=..., AWS_ENDPOINT_URL)"
        )

    def _check_bucket(self) -> None:
        """After a HEAD's 404 (which does not say whether the key or the bucket is missing): once per process,
        one HEAD of the bucket, so a wrong bucket name is reported as such and not as "no store here"."""
        state = self._process()
        if state.bucket_ok:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            status, _ = _error_status(exc)
            if status == 404:
                raise self._no_bucket("looking up", "") from None
            return  # 403 (allowed to read keys, not the bucket) and the like: let the key's answer stand
        state.bucket_ok = True

    def size(self, key: str) -> int | None:
        info = self.head(key)
        return None if info is None else info.size

    def version(self, key: str) -> str | None:
        """The ETag (one HEAD, no body)."""
        info = self.head(key)
        return None if info is None else info.version

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """``(key, size)`` under ``prefix``; objects whose names are not valid keys are skipped with a warning."""
        for full, size in self._list_full(prefix):
            key = full[len(self._root) :]
            try:
                check_key(key)
            except ValueError as exc:  # anything can be uploaded to a bucket; callers get only keys they can use
                log.warning("skipping %s/%s in a listing: %s", self.location, key, exc)
                continue
            yield key, size

    def _list_full(self, prefix: str) -> Iterator[tuple[str, int]]:
        prefix = check_prefix(prefix)
        full_prefix = self._root + (prefix.rstrip("/") + "/" if prefix else "")
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token

            def request(kwargs: dict[str, Any] = kwargs) -> dict[str, Any]:
                return self._client.list_objects_v2(**kwargs)

            page = self._retry("listing", prefix or "(root)", request)
            for item in page.get("Contents", []):
                yield item["Key"], int(item["Size"])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def download(
        self, key: str, out: IO[bytes] | Callable[[ObjectInfo], IO[bytes]], version: str | None = None
    ) -> ObjectInfo:
        """Stream the whole object into a file, resuming after broken connections.

        Args:
            key: the object.
            out: a seekable binary file, written from its current position (truncated and rewritten
                if the object must be read again); or ``out(info)`` returning one, called once when
                the first answer's headers tell the object's size and version (so a cache can
                reserve room and name the file without a HEAD first).
            version: the ETag expected (from :meth:`head`); None takes the current one.

        Returns:
            The object's size, version and stored crc32c (checked against the bytes written).

        Raises:
            FileNotFoundError: the object is absent.
            VersionMismatchError: the object is not (or no longer) ``version``.
            StorageError: retries did not get the bytes.
        """
        return self._retry("downloading", key, _Download(self, key, out, version).request)

    # ----------------------------------------------------------------- writes

    def _put_request(self, full: str, body: bytes, metadata: dict[str, str], **conditions: str) -> str:
        response = self._client.put_object(
            Bucket=self.bucket,
            Key=full,
            Body=body,
            Metadata={_CRC_META: f"{crc32c(body):08x}", **metadata},
            ChecksumCRC32C=base64.b64encode(crc32c(body).to_bytes(4, "big")).decode(),  # S3 checks it on arrival
            **conditions,
        )
        return str(response["ETag"])

    def _body(self, key: str, data: Buffer) -> bytes:
        body = _body_bytes(data)
        if len(body) > _MAX_PUT:
            raise ValueError(f"{self._where(key)}: {len(body)} bytes is over S3's 5 GiB limit for one atomic PUT")
        return body

    def put(self, key: str, data: Buffer) -> None:
        full, body = self._full(key), self._body(key, data)
        self._retry("writing", key, lambda: self._put_request(full, body, {}))

    def put_if_absent(self, key: str, data: Buffer) -> None:
        full, body = self._full(key), self._body(key, data)
        token = uuid.uuid4().hex
        attempts = [0]

        def request() -> None:
            attempts[0] += 1
            try:
                self._put_request(full, body, {_TOKEN_META: token}, IfNoneMatch="*")
            except Exception as exc:
                if _error_status(exc)[0] != 412:
                    raise
                if attempts[0] > 1 and self._written_by(full, token):
                    return  # our earlier attempt landed and its answer was lost
                raise AlreadyExistsError(
                    f"{self._where(key)} already exists: another writer created it first (each object is "
                    "written once; if this is a rerun, the earlier run already wrote it)"
                ) from None

        self._retry("creating", key, request)

    def put_if_version(self, key: str, data: Buffer, version: str) -> str:
        full, body = self._full(key), self._body(key, data)
        token = uuid.uuid4().hex
        attempts = [0]

        def request() -> str:
            attempts[0] += 1
            try:
                return self._put_request(full, body, {_TOKEN_META: token}, IfMatch=version)
            except Exception as exc:
                status = _error_status(exc)[0]
                if status not in (404, 412):
                    raise
                if status == 412 and attempts[0] > 1:
                    mine = self._head_raw(full)
                    if mine is not None and (mine.get("Metadata") or {}).get(_TOKEN_META) == token:
                        return str(mine["ETag"])  # our earlier attempt landed and its answer was lost
                raise VersionMismatchError(
                    f"{self._where(key)} changed since version {version} was read "
                    f"({'it is gone' if status == 404 else 'another writer replaced it'}); read it again and "
                    "reapply the change"
                ) from None

        return self._retry("updating", key, request)

    def _head_raw(self, full: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise

    def _written_by(self, full: str, token: str) -> bool:
        head = self._head_raw(full)
        return head is not None and (head.get("Metadata") or {}).get(_TOKEN_META) == token

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._retry("deleting", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> None:
        batch: list[str] = []
        for full, _ in self._list_full(prefix):
            batch.append(full)
            if len(batch) == 1000:  # DeleteObjects takes at most 1000 keys
                self._delete_batch(prefix, batch)
                batch = []
        if batch:
            self._delete_batch(prefix, batch)

    def _delete_batch(self, prefix: str, keys: Sequence[str]) -> None:
        def request() -> None:
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"deleting under {self._where(prefix)}: {len(errors)} objects were not deleted, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}; rerun to retry"
                )

        self._retry("deleting under", prefix or "(root)", request)

    # ------------------------------------------------------------------- zarr

    def zarr_store(self) -> Store:
        """A zarr store over the same root that moves its bytes through this storage (one per process)."""
        state = self._process()
        if state.zarr_store is None:
            from .zarrstore import SeamStore

            state.zarr_store = SeamStore(self)
        return state.zarr_store


class _Download:
    """One :meth:`ObjectStorage.download`: the state its retried requests share (bytes written, crc, size)."""

    def __init__(
        self, storage: ObjectStorage, key: str, out: IO[bytes] | Callable[[ObjectInfo], IO[bytes]], version: str | None
    ) -> None:
        self.storage = storage
        self.key = key
        self.full = storage._full(key)
        self.out = out
        self.file: IO[bytes] | None = None if callable(out) else out
        self.base = 0 if callable(out) else out.tell()
        self.written = 0
        self.crc = 0
        self.info: ObjectInfo | None = None
        self.version = version

    def restart(self) -> None:
        if self.file is not None:
            self.file.seek(self.base)
            self.file.truncate()
        self.written, self.crc, self.info = 0, 0, None  # learn size (and crc) again from the next answer

    def sink_for(self, info: ObjectInfo, response: dict[str, Any] | None) -> IO[bytes]:
        if self.file is None:
            try:
                self.file = self.out(info)  # type: ignore[operator]
            except BaseException:
                if response is not None:
                    response["Body"].close()  # drop the connection rather than read a body nobody wants
                raise
        assert self.file is not None
        return self.file

    def _get(self) -> dict[str, Any] | None:
        """The ranged GET from the first byte not written yet; None for ``bytes=0-`` of an empty object."""
        where = self.storage._where(self.key)
        # always a Range: the answer's Content-Range then states the object's size apart from the
        # Content-Length of the body, so a body cut short with a matching Content-Length is caught
        kwargs: dict[str, Any] = {"Bucket": self.storage.bucket, "Key": self.full, "Range": f"bytes={self.written}-"}
        if self.version:
            kwargs["IfMatch"] = self.version
        try:
            response: dict[str, Any] = self.storage._client.get_object(**kwargs)
            return response
        except Exception as exc:
            status = _error_status(exc)[0]
            if _is_missing(exc):
                raise FileNotFoundError(f"{where}: no such object") from None
            if status == 412:
                raise VersionMismatchError(
                    f"{where} changed while it was being read (ETag no longer {self.version})"
                ) from None
            if status == 416 and self.written == 0:  # bytes=0- of an empty object
                return None
            raise

    def request(self) -> ObjectInfo:
        response = self._get()
        if response is None:
            return self.empty_object()
        total, first = _span_of(response, self.written)
        if first != self.written:  # the server ignored Range: take the whole body from the start
            self.restart()
        crc_text = (response.get("Metadata") or {}).get(_CRC_META)
        if self.info is None:
            self.info = ObjectInfo(total, response["ETag"], int(crc_text, 16) if crc_text else None)
            self.version = response["ETag"]
        info = self.info
        target = self.sink_for(info, response)
        try:
            for chunk in response["Body"].iter_chunks(1 << 20):
                target.write(chunk)
                self.crc = crc32c(chunk, self.crc)
                self.written += len(chunk)
        finally:
            target.flush()
        if total != info.size or self.written != info.size or (info.crc32c is not None and self.crc != info.crc32c):
            self.restart()  # a lying or damaged answer: nothing of it can be trusted
            raise _Truncated(f"downloaded bytes do not match the object's size {info.size} or crc32c")
        return info

    def empty_object(self) -> ObjectInfo:
        head = self.storage._head_raw(self.full)
        if head is None:
            raise FileNotFoundError(f"{self.storage._where(self.key)}: no such object")
        if int(head["ContentLength"]) != 0:
            raise _Truncated("416 for bytes=0- of a non-empty object")
        info = ObjectInfo(0, head["ETag"], None)
        self.sink_for(info, None)
        return info


def _is_missing(exc: BaseException) -> bool:
    status, code = _error_status(exc)
    return status == 404 and code in ("NoSuchKey", "404", "NotFound", "")


def _check_crc(metadata: dict[str, str], body: bytes) -> None:
    stored = metadata.get(_CRC_META)
    if stored is not None and int(stored, 16) != crc32c(body):
        raise _Truncated(f"crc32c of the body is {crc32c(body):08x}, the object's is {stored}")


def _check_range(content_range: str, body: bytes, start: int, end: int | None) -> None:
    """The answer must be exactly the bytes asked for (clipped to the object), all of them."""
    match = _CONTENT_RANGE.match(content_range)
    if match is None:
        raise _Truncated(f"unreadable Content-Range {content_range!r}")
    first, last = int(match.group(1)), int(match.group(2))
    total = int(match.group(3)) if match.group(3) != "*" else None
    if len(body) != last - first + 1:
        raise _Truncated(f"Content-Range {content_range} but {len(body)} bytes")
    if total is not None:
        want_first = max(0, total + start) if start < 0 else start
        want_last = total - 1 if end is None or start < 0 else min(end, total) - 1
        if (first, last) != (want_first, want_last):
            raise _Truncated(f"asked bytes {want_first}-{want_last}, got {content_range}")


def _span_of(response: dict[str, Any], asked_from: int) -> tuple[int, int]:
    """(object size, first byte) of a ranged GET's answer; a 200 without Content-Range is the whole object."""
    content_range = response.get("ContentRange")
    if not content_range:
        return int(response["ContentLength"]), 0
    match = _CONTENT_RANGE.match(content_range)
    if match is None or match.group(3) == "*":
        raise _Truncated(f"unreadable Content-Range {content_range!r}")
    first, last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
    if last + 1 != total or int(response["ContentLength"]) != last - first + 1 or first != asked_from:
        raise _Truncated(
            f"asked bytes {asked_from}- of the object, got {content_range} in {response['ContentLength']} bytes"
        )
    return total, first


def _describe(exc: BaseException) -> str:
    status, code = _error_status(exc)
    if status:
        return f"HTTP {status} {code}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
