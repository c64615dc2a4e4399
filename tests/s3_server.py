"""A real S3 server on loopback for the tests: moto in server mode, and a proxy in front of it.

Import the fixtures into a test module (``from s3_server import moto_s3, s3_options, ...``);
pytest finds them there. Nothing leaves 127.0.0.1.

- ``moto_s3`` (session): ``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1, one
  bucket (moto rejects one-character names), fake credentials. Stopped at the end of the session.
- ``s3_proxy`` (function): a small HTTP/1.1 proxy on another loopback port that forwards to moto,
  logs every request (method, key, Range, status, bytes sent: the tests count GETs with it) and
  injects faults on a schedule: 500s, connection resets before or after the request reached the
  server, bodies cut short (the connection closes early) and bodies that lie (a shorter
  Content-Length, as a broken middlebox would send), and slow bodies (half, a stall of
  ``slow_s`` seconds, the rest).
- ``s3_options`` / ``s3_url``: the storage options and a fresh ``s3://bucket/prefix`` per test.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

__all__ = [
    "MotoS3",
    "FaultProxy",
    "RequestRecord",
    "start_moto",
    "moto_s3",
    "s3_options",
    "s3_url",
    "s3_proxy",
    "proxy_options",
    "proxy_url",
    "BUCKET",
]

BUCKET = "vlastore-test"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

FAULTS = ("500", "reset_before", "reset_after", "short", "lie", "slow")


@dataclass
class MotoS3:
    """A running moto server and what clients need to reach it."""

    endpoint: str
    bucket: str
    server: object

    def options(self, endpoint: str | None = None) -> dict[str, str]:
        """Storage options as the CLI would pass them (all strings)."""
        return {
            "endpoint": endpoint or self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": REGION,
        }

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The same, as the usual AWS environment variables."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }


def start_moto(bucket: str = BUCKET) -> MotoS3:
    """Start moto on a free loopback port and create ``bucket`` (a plain HTTP PUT: no boto3 needed)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("PUT", f"/{bucket}")  # moto accepts unsigned requests
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        server.stop()
        raise RuntimeError(f"moto refused to create bucket {bucket!r}: HTTP {response.status}")
    return MotoS3(f"http://{host}:{port}", bucket, server)


# ------------------------------------------------------------------- the proxy


@dataclass
class RequestRecord:
    method: str
    key: str  # object key inside the bucket ('' for bucket-level requests such as LIST)
    query: str
    range: str | None
    status: int  # 0 when the proxy reset the connection instead of answering
    body_bytes: int  # response body bytes the proxy sent
    fault: str | None


@dataclass
class _Rule:
    faults: list[str | None]
    method: str | None
    key_contains: str | None
    remaining: list[str | None] = field(default_factory=list)

    def matches(self, method: str, key: str) -> bool:
        return (self.method is None or method == self.method) and (
            self.key_contains is None or self.key_contains in key
        )


class FaultProxy:
    """HTTP/1.1 proxy in front of moto that logs requests and injects faults on a schedule.

    ``inject(["500", None, "short"], method="GET", key_contains="shard")`` makes the next
    three matching requests fail with a 500, pass, and get a cut body; later ones pass.
    """

    def __init__(self, upstream: str, bucket: str) -> None:
        self.upstream = urlsplit(upstream)
        self.bucket = bucket
        self.log: list[RequestRecord] = []
        self._rules: list[_Rule] = []
        self.slow_s = 1.0  # how long a "slow" answer stalls after half its body
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --------------------------------------------------------------- schedule

    def inject(self, faults: list[str | None], method: str | None = None, key_contains: str | None = None) -> None:
        for fault in faults:
            if fault is not None and fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        with self._lock:
            self._rules.append(_Rule(list(faults), method, key_contains, list(faults)))

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self.log.clear()

    def requests(self, method: str | None = None, key_contains: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r
                for r in self.log
                if (method is None or r.method == method) and (key_contains is None or key_contains in r.key)
            ]

    def _next_fault(self, method: str, key: str) -> str | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining and rule.matches(method, key):
                    return rule.remaining.pop(0)
        return None

    # ---------------------------------------------------------------- serving

    def _key(self, path: str) -> tuple[str, str]:
        parts = urlsplit(path)
        route = parts.path.lstrip("/")
        prefix = self.bucket + "/"
        key = route[len(prefix) :] if route.startswith(prefix) else ""
        return key, parts.query

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        key, query = self._key(handler.path)
        body = _read_request_body(handler)
        fault = self._next_fault(method, key)
        record = RequestRecord(method, key, query, handler.headers.get("Range"), 0, 0, fault)
        with self._lock:
            self.log.append(record)
        if fault == "reset_before":
            _reset(handler)
            return
        if fault == "500":
            payload = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                b"<Message>injected by the test proxy</Message></Error>"
            )
            record.status = 500
            handler.send_response(500)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            record.body_bytes = len(payload)
            return
        status, reason, headers, data = self._forward(handler, method, body)
        if fault == "reset_after":  # the server did the work; the client never hears of it
            _reset(handler)
            return
        record.status = status
        send = data
        declared = len(data)
        if fault in ("short", "lie") and method != "HEAD" and len(data) > 1:
            send = data[: len(data) // 2]
            if fault == "lie":
                declared = len(send)
        handler.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(declared if method != "HEAD" else _content_length(headers)))
        handler.end_headers()
        if fault == "slow" and method != "HEAD":
            handler.wfile.write(send[: len(send) // 2])
            handler.wfile.flush()
            time.sleep(self.slow_s)
            send = send[len(send) // 2 :]
            record.body_bytes = len(data) - len(send)
        if method != "HEAD":
            handler.wfile.write(send)
            record.body_bytes += len(send)
        if fault == "short":  # close after half the body (FIN, so the client reads what was sent)
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_WR)

    def _forward(
        self, handler: BaseHTTPRequestHandler, method: str, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
            headers["Content-Length"] = str(len(body))
            conn.request(
                method, handler.path, body=body if body or method in ("PUT", "POST") else None, headers=headers
            )
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            conn.close()


def _content_length(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "content-length":
            return value
    return "0"


def _read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close the client connection with a TCP RST (SO_LINGER 0), as a dying server or middlebox does."""
    handler.close_connection = True
    sock = handler.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (in vlastore[dev])")
    server = start_moto()
    yield server
    server.server.stop()  # type: ignore[attr-defined]


@pytest.fixture
def s3_options(moto_s3: MotoS3) -> dict[str, str]:
    return moto_s3.options()


@pytest.fixture
def s3_url(moto_s3: MotoS3) -> str:
    """A fresh prefix per test, so tests never see each other's objects."""
    return f"s3://{moto_s3.bucket}/t-{uuid.uuid4().hex[:12]}/store.vla"


@pytest.fixture
def s3_proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_s3.endpoint, moto_s3.bucket)
    yield proxy
    proxy.close()


@pytest.fixture
def proxy_options(moto_s3: MotoS3, s3_proxy: FaultProxy) -> dict[str, str]:
    """Options that reach moto through the proxy, with fast retries (the tests inject faults)."""
    return {**moto_s3.options(s3_proxy.endpoint), "retry_backoff_s": "0.01"}


@pytest.fixture
def proxy_url(s3_url: str) -> str:
    return s3_url


if os.environ.get("VLASTORE_S3_DEBUG"):  # pragma: no cover - a switch for debugging the proxy by hand
    import logging

    logging.basicConfig(level=logging.DEBUG)
