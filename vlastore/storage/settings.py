"""Where an object store is and how to reach it: ``s3://`` URLs and storage options.

Options (the CLI's ``--storage-option KEY=VALUE``, all values may be strings)
override the usual AWS environment variables, which override the defaults.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .base import check_key

__all__ = [
    "STORAGE_OPTIONS",
    "CACHE_OPTIONS",
    "OPTIONS_ENV",
    "S3Settings",
    "CacheSettings",
    "parse_s3_url",
    "parse_size",
    "split_options",
    "check_options",
    "options_from_env",
]

OPTIONS_ENV = "VLASTORE_STORAGE_OPTIONS"
"""Environment variable holding storage options as a JSON object: the defaults of every ``s3://`` location
opened without options. The CLI sets it from ``--storage-option`` for the command's lifetime, so processes it
starts (ingest workers, DataLoader workers, spawn) reach the same bucket."""

CACHE_ENV = "VLASTORE_CACHE"
CACHE_BYTES_ENV = "VLASTORE_CACHE_BYTES"

CACHE_OPTIONS: dict[str, str] = {
    "cache_dir": f"node-local cache folder for whole shard files (env {CACHE_ENV}; default: none, ranged reads)",
    "cache_max_bytes": f"size limit of the cache folder, e.g. 200G (env {CACHE_BYTES_ENV}; default 80% of the "
    "free disk there when opened)",
    "cache_on_full": "ranged (read from the object store when the cache has no room, default) | error",
    "cache_prefetch_threads": "background download threads per process (default 2)",
}
"""Keys of the storage options that configure the node-local shard cache (:class:`~vlastore.storage.CachedStorage`)."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)

_BUCKET_OK = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")

STORAGE_OPTIONS: dict[str, str] = {
    "endpoint": "endpoint URL, e.g. http://127.0.0.1:9000 (env AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL; "
    "default: AWS)",
    "region": "region (env AWS_REGION, then AWS_DEFAULT_REGION; default us-east-1)",
    "access_key_id": "access key (env AWS_ACCESS_KEY_ID; default: botocore's chain: env, profile, instance role)",
    "secret_access_key": "secret key (env AWS_SECRET_ACCESS_KEY)",
    "session_token": "session token of temporary credentials (env AWS_SESSION_TOKEN)",
    "profile": "profile of ~/.aws/config (env AWS_PROFILE)",
    "anonymous": "true: unsigned requests (public buckets)",
    "allow_http": "true/false: allow a plain-HTTP endpoint (env AWS_ALLOW_HTTP; an http:// endpoint allows it "
    "unless this is false)",
    "addressing_style": "path | virtual | auto (default: path with a custom endpoint, else auto)",
    "max_retries": "retries of a failed request (default 5)",
    "retry_backoff_s": "first backoff in seconds, doubled per retry with jitter, capped at 10 s (default 0.2)",
    "connect_timeout_s": "seconds to connect (default 10)",
    "read_timeout_s": "seconds without a byte before a read is retried (default 60)",
    "max_connections": "parallel requests of one process (default 16)",
    "coalesce_gap": "bytes: ranges of one get_ranges call this close share a request (default 0: only touching "
    "or overlapping ranges)",
}
"""Keys of the ``options`` argument (the CLI's ``--storage-option KEY=VALUE``): all values may be strings."""

_ALIASES = {
    "endpoint_url": "endpoint",
    "aws_endpoint_url": "endpoint",
    "aws_endpoint_url_s3": "endpoint",
    "aws_region": "region",
    "aws_default_region": "region",
    "region_name": "region",
    "aws_access_key_id": "access_key_id",
    "key": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "secret": "secret_access_key",
    "aws_session_token": "session_token",
    "token": "session_token",
    "aws_profile": "profile",
    "aws_allow_http": "allow_http",
    "anon": "anonymous",
}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)`` with the prefix validated as a storage key ('' for the root).

    Raises:
        ValueError: not an s3:// URL, or a bucket or prefix that S3 would not accept.
    """
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an object storage URL; write s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET_OK.match(bucket):
        raise ValueError(
            f"{url!r}: bucket name {bucket!r} is not valid (3-63 characters: lower-case letters, digits, '.', '-')"
        )
    prefix = prefix.strip("/")
    if prefix:
        check_key(prefix)
    return bucket, prefix


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"storage option {name}={value!r} must be true or false")


def _as_number(name: str, value: object, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"storage option {name}={value!r} must be a {kind.__name__}") from None
    if number < minimum:
        raise ValueError(f"storage option {name}={value!r} must be at least {minimum}")
    return number


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the bucket: options over environment variables over defaults."""

    endpoint: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    profile: str | None = None
    anonymous: bool = False
    addressing_style: str = "auto"
    max_retries: int = 5
    retry_backoff_s: float = 0.2
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_connections: int = 16
    coalesce_gap: int = 0

    @classmethod
    def resolve(cls, options: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> S3Settings:
        """Build settings from ``options`` (any case, aliases such as ``AWS_ENDPOINT_URL`` accepted) and ``env``.

        Raises:
            ValueError: an unknown option (the message lists the known ones) or a bad value.
        """
        env = dict(os.environ if env is None else env)
        given: dict[str, Any] = {}
        for raw_key, value in (options or {}).items():
            key = _ALIASES.get(str(raw_key).lower(), str(raw_key).lower())
            if key not in STORAGE_OPTIONS:
                known = ", ".join(sorted(STORAGE_OPTIONS))
                raise ValueError(f"unknown storage option {raw_key!r}; known options: {known}")
            given[key] = value

        def pick(key: str, *env_names: str) -> Any:
            if given.get(key) not in (None, ""):
                return given[key]
            for name in env_names:
                if env.get(name):
                    return env[name]
            return None

        endpoint = pick("endpoint", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        allow_http = pick("allow_http", "AWS_ALLOW_HTTP")
        if endpoint is not None:
            endpoint = str(endpoint).rstrip("/")
            if not re.match(r"^https?://[^/\s]+$", endpoint):
                raise ValueError(f"storage endpoint {endpoint!r} must look like http(s)://host[:port]")
            if endpoint.startswith("http://") and allow_http is not None and not _as_bool("allow_http", allow_http):
                raise ValueError(
                    f"endpoint {endpoint} is plain HTTP but allow_http is false; use an https:// endpoint or "
                    "set allow_http=true"
                )
        style = str(given.get("addressing_style") or ("path" if endpoint else "auto")).lower()
        if style not in ("path", "virtual", "auto"):
            raise ValueError(f"storage option addressing_style={style!r} must be path, virtual or auto")
        key_id = pick("access_key_id", "AWS_ACCESS_KEY_ID")
        secret = pick("secret_access_key", "AWS_SECRET_ACCESS_KEY")
        if (key_id is None) != (secret is None):
            raise ValueError("storage credentials need both access_key_id and secret_access_key (or neither)")
        return cls(
            endpoint=endpoint,
            region=str(pick("region", "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"),
            access_key_id=key_id,
            secret_access_key=secret,
            session_token=pick("session_token", "AWS_SESSION_TOKEN") if key_id else None,
            profile=given.get("profile") or None,
            anonymous=_as_bool("anonymous", given.get("anonymous", False)),
            addressing_style=style,
            max_retries=_as_number("max_retries", given.get("max_retries", 5), int, 0),
            retry_backoff_s=_as_number("retry_backoff_s", given.get("retry_backoff_s", 0.2), float, 0.0),
            connect_timeout_s=_as_number("connect_timeout_s", given.get("connect_timeout_s", 10), float, 0.1),
            read_timeout_s=_as_number("read_timeout_s", given.get("read_timeout_s", 60), float, 0.1),
            max_connections=_as_number("max_connections", given.get("max_connections", 16), int, 1),
            coalesce_gap=_as_number("coalesce_gap", given.get("coalesce_gap", 0), int, 0),
        )


def parse_size(name: str, value: object) -> int:
    """``"200G"``, ``"1.5T"``, ``"4096"`` (bytes; K/M/G/T/P are powers of 1024) -> bytes.

    Raises:
        ValueError: not a size, or not positive.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{name}={value!r} is not a size; write bytes or a number with K, M, G or T (e.g. 200G)")
        number = int(float(match.group(1)) * 1024 ** " KMGTP".index((match.group(2) or " ").upper()))
    if number <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return number


@dataclass(frozen=True)
class CacheSettings:
    """The node cache of an ``s3://`` store: options over ``VLASTORE_CACHE``/``VLASTORE_CACHE_BYTES``."""

    cache_dir: str | None = None
    max_bytes: int | None = None  # None: 80% of the free disk at the folder when opened
    on_full: str = "ranged"
    prefetch_threads: int = 2

    @classmethod
    def resolve(cls, options: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> CacheSettings:
        """Build cache settings from the ``cache_*`` options and the environment.

        Raises:
            ValueError: a bad value (the message says which and what is accepted).
        """
        env = dict(os.environ if env is None else env)
        given = {str(k).lower(): v for k, v in (options or {}).items()}
        folder = given.get("cache_dir") or env.get(CACHE_ENV) or None
        limit = given.get("cache_max_bytes") or env.get(CACHE_BYTES_ENV) or None
        on_full = str(given.get("cache_on_full") or "ranged").lower()
        if on_full not in ("ranged", "error"):
            raise ValueError(f"storage option cache_on_full={on_full!r} must be ranged or error")
        return cls(
            cache_dir=str(folder) if folder else None,
            max_bytes=parse_size("cache_max_bytes", limit) if limit is not None else None,
            on_full=on_full,
            prefetch_threads=_as_number("cache_prefetch_threads", given.get("cache_prefetch_threads", 2), int, 1),
        )


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(object store options, cache options)`` of one options mapping (keys compared in lower case)."""
    remote: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for key, value in (options or {}).items():
        (cache if str(key).lower() in CACHE_OPTIONS else remote)[key] = value
    return remote, cache


def check_options(options: dict[str, Any] | None, env: dict[str, str] | None = None) -> None:
    """Raise ValueError (what is wrong, what is known) for an unknown key or a bad value; contacts nothing."""
    remote, cache = split_options(options)
    try:
        S3Settings.resolve(remote, env)
    except ValueError as exc:
        if str(exc).startswith("unknown storage option"):
            known = ", ".join(sorted([*STORAGE_OPTIONS, *CACHE_OPTIONS]))
            raise ValueError(f"{str(exc).split(';')[0]}; known options: {known}") from None
        raise
    CacheSettings.resolve(cache, env)


def options_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The storage options of :data:`OPTIONS_ENV` (``{}`` when unset).

    Raises:
        ValueError: the variable is not a JSON object of strings.
    """
    text = (os.environ if env is None else env).get(OPTIONS_ENV, "")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'{OPTIONS_ENV} is not JSON ({exc}); unset it or write {{"key": "value"}}') from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object of option names to values; unset it or fix it")
    return value
