"""Reading untrusted source files: regular files only, sizes bounded, a reason for every failure.

Every source file an ingestion reads (``.pt`` caches, CSV/NPZ/HDF5 robot data,
mapping CSVs, manifests) is opened here:

* only regular files are read: the file is opened with ``O_NONBLOCK`` (a FIFO
  or a device then never blocks the open) and checked with ``fstat`` before a
  byte is read, so a FIFO named ``ep_1.csv`` is a skipped file, never a hang;
* a file larger than a limit (:data:`MAX_FILE_BYTES` unless the caller says
  otherwise) is refused before it is read;
* every ``OSError`` becomes a :class:`SourceError` with a short reason
  (``unreadable``, ``symlink-loop``, ``dangling-symlink``, ``not-a-regular-file``,
  ``transient-error``), so one bad file is one skipped file;
* errors that may pass (``EIO``, ``EAGAIN``, ``EINTR``, ``ESTALE``, ``ETIMEDOUT``)
  are retried a few times with backoff by :func:`retrying`; when they persist
  the file is reported as ``transient-error`` and the run asks for a rerun.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "MAX_FILE_BYTES",
    "TRANSIENT_ERRNOS",
    "RETRY_DELAYS",
    "SourceError",
    "classify_os_error",
    "open_regular",
    "open_source",
    "read_whole",
    "pread_exact",
    "retrying",
    "file_size",
    "outside_root",
]

MAX_FILE_BYTES = 1 << 30
"""Largest source file read (1 GiB): a bigger one is skipped as ``too-large`` (``--max-file-size`` changes it)."""

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ESTALE, errno.ETIMEDOUT})
"""``OSError`` numbers worth a retry: I/O hiccups of disks and network filesystems."""

RETRY_DELAYS = (0.05, 0.2, 0.8)
"""Seconds to wait before each retry of a read that failed with a transient error."""

T = TypeVar("T")


class SourceError(ValueError):
    """A source file that cannot be used, and why.

    Attributes:
        reason: a short code used to group skipped files (see ``vlastore.ingest.report.REASONS``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.reason == "transient-error"


def classify_os_error(path: str | os.PathLike[str], exc: OSError) -> SourceError:
    """The :class:`SourceError` an ``OSError`` raised while opening or reading ``path`` stands for."""
    where = os.fspath(path)
    code = exc.errno
    text = exc.strerror or str(exc)
    if code in TRANSIENT_ERRNOS:
        return SourceError(
            "transient-error",
            f"{where}: {text} (errno {errno.errorcode.get(code, code)}); rerun the same command to retry",
        )
    if code == errno.ELOOP:
        return SourceError("symlink-loop", f"{where}: a loop of symbolic links")
    if code == errno.ENOENT and os.path.islink(where):
        return SourceError(
            "dangling-symlink", f"{where}: symbolic link to {_link_target(where)!r}, which does not exist"
        )
    if code in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
        return SourceError("not-a-regular-file", f"{where}: not a regular file ({text})")
    return SourceError("unreadable", f"{where}: {text}")


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | os.PathLike[str], follow_symlinks: bool = True) -> tuple[int, int]:
    """Open ``path`` read-only if it is a regular file: ``(fd, size)``; the caller closes ``fd``.

    ``O_NONBLOCK`` makes the open of a FIFO or device return at once (it blocks
    without it), ``fstat`` on the open descriptor then refuses anything but a
    regular file, with no window for a swap between check and read.

    Raises:
        SourceError: not a regular file, or the open failed (reason from :func:`classify_os_error`).
    """
    try:
        fd = os.open(path, _OPEN_FLAGS if follow_symlinks else _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise classify_os_error(path, exc) from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise classify_os_error(path, exc) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SourceError("not-a-regular-file", f"{os.fspath(path)}: {_kind(info.st_mode)}, not a regular file")
    return fd, info.st_size


def _too_large(path: str | os.PathLike[str], size: int, limit: int) -> SourceError:
    return SourceError(
        "too-large",
        f"{os.fspath(path)}: {size:,} bytes, more than the {limit:,}-byte limit for one "
        "source file; raise it with --max-file-size if the file is genuine",
    )


def read_whole(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, read with one ``os.read`` when it fits.

    A file that grows while it is read is cut at its size when opened.

    Raises:
        SourceError: see :func:`open_regular`; ``too-large`` above ``max_bytes``.
    """
    fd, size = open_regular(path)
    try:
        if size > max_bytes:
            raise _too_large(path, size, max_bytes)
        try:
            data = os.read(fd, size) if size else b""
            while len(data) < size:  # very large files come in pieces
                more = os.read(fd, size - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise classify_os_error(path, exc) from None
        return data
    finally:
        os.close(fd)


def pread_exact(fd: int, offset: int, length: int, path: str) -> bytes:
    """``length`` bytes at ``offset``; a short read means the file shrank (``truncated``)."""
    parts, got = [], 0
    try:
        while got < length:
            chunk = os.pread(fd, min(length - got, 1 << 26), offset + got)
            if not chunk:
                raise SourceError(
                    "truncated",
                    f"{path}: ends at byte {offset + got:,}, before the "
                    f"{length:,} bytes expected at {offset:,} (truncated or changing?)",
                )
            parts.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise classify_os_error(path, exc) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def open_source(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> io.BufferedReader:
    """A binary file object on a regular file of at most ``max_bytes`` (for zipfile, csv, h5py).

    Raises:
        SourceError: see :func:`open_regular`; ``too-large`` above ``max_bytes``.
    """
    fd, size = open_regular(path)
    if size > max_bytes:
        os.close(fd)
        raise _too_large(path, size, max_bytes)
    return os.fdopen(fd, "rb")


def retrying(func: Callable[[], T], sleep: Callable[[float], Any] = time.sleep) -> T:
    """``func()``, called again after :data:`RETRY_DELAYS` while it raises a transient error.

    A transient ``OSError`` escaping ``func`` counts as well (as ``transient-error``);
    the last failure is raised as a :class:`SourceError`.
    """
    for delay in (*RETRY_DELAYS, None):
        try:
            return func()
        except SourceError as exc:
            if not exc.transient or delay is None:
                raise
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise
            if delay is None:
                raise classify_os_error(getattr(exc, "filename", None) or "?", exc) from None
        sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def file_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes, 0 when it cannot be known (dangling link, no permission): only for reports."""
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return 0


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def outside_root(path: str | os.PathLike[str], root_real: str) -> str | None:
    """Where the symbolic link ``path`` leads when that is outside ``root_real`` (a resolved folder), else None.

    Links of a cache usually point into a few folders: those are resolved once, so
    a folder of a million links costs a ``readlink`` and an ``lstat`` per link.
    """
    try:
        link = os.readlink(path)
    except (OSError, ValueError):
        return None  # not a link, or gone
    full = os.path.join(os.path.dirname(os.path.abspath(path)), link)
    folder, name = os.path.split(full)
    try:
        if name in ("", ".", ".."):
            target = os.path.realpath(full)
        else:
            target = os.path.join(_real_folder(folder), name)
            if os.path.islink(target):  # a chain of links: follow it to its end
                target = os.path.realpath(target)
    except (OSError, ValueError):
        return None
    if target == root_real or target.startswith(root_real.rstrip(os.sep) + os.sep):
        return None
    return target
