"""The store an ingestion writes: made atomically, or found as an earlier run of the same command left it."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..format import FormatError
from ..storage import StoreNotFoundError
from ..store import DEFAULT_FORMAT_VERSION, EpisodeData, VLAStore
from .report import IngestUsageError

__all__ = ["open_or_create_store", "store_usage"]


def store_usage(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{"bytes", "files"}`` of a store (zeros when there is none yet)."""
    try:
        nbytes, files = VLAStore.open(path).storage.disk_usage()
    except (StoreNotFoundError, FormatError, OSError):
        return {"bytes": 0, "files": 0}
    return {"bytes": nbytes, "files": files}


_CREATING = ".creating-"


def _stale_creations(path: Path) -> list[Path]:
    """Hidden build folders of ``path`` whose run died (``.NAME.creating-PID-XXXXXXXX``); never a glob."""
    prefix = f".{path.name}{_CREATING}"
    stale = []
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                    continue
                pid = entry.name[len(prefix) :].split("-", 1)[0]
                if pid.isdigit() and _alive(int(pid)):
                    continue  # another run of this command is building it right now
                stale.append(Path(entry.path))
    except OSError:
        return []
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def open_or_create_store(
    out: str,
    episodes: list[EpisodeData],
    columns: dict[str, Any] | None = None,
    same: Callable[[VLAStore], bool] | None = None,
    other_store_hint: str = "",
    allow_nonfinite: bool = False,
    _retried: bool = False,
    format_version: int = DEFAULT_FORMAT_VERSION,
) -> tuple[VLAStore, bool]:
    """Open ``out`` if an earlier run of the same ingestion made it, else create it atomically.

    The store is built in a hidden sibling folder and renamed into place, so a
    run killed while creating it leaves no half-made store behind.

    Returns:
        ``(store, created)``.

    Raises:
        IngestUsageError: ``out`` holds another store (different episodes or data) or is not a store.
    """
    if str(out).startswith("s3://"):
        return _open_or_create_remote(
            str(out), episodes, columns, same, other_store_hint, allow_nonfinite, format_version
        )
    path = Path(out)
    try:
        occupied = os.path.lexists(path) and (not path.is_dir() or path.is_symlink() or any(path.iterdir()))
    except OSError as exc:
        raise IngestUsageError(f"--out {out}: cannot look inside ({exc.strerror or exc}); pick another --out") from None
    if occupied:
        try:
            store = VLAStore.open(path, writable=True)
        except (StoreNotFoundError, FormatError, OSError):
            raise IngestUsageError(f"--out {out} exists and is not a vlastore store; pick a new --out") from None
        return _same_store(out, store, episodes, same, other_store_hint), False
    for stale in _stale_creations(path):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run of ours
    tmp = path.parent / f".{path.name}{_CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        VLAStore.create(tmp, episodes, columns=columns, allow_nonfinite=allow_nonfinite, format_version=format_version)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()  # an empty folder the user made
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.lexists(path) or _retried:
            raise
        # another run of this command renamed its store into place first: use it if it is the same
        return open_or_create_store(
            out,
            episodes,
            columns,
            same,
            other_store_hint,
            allow_nonfinite,
            _retried=True,
            format_version=format_version,
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return VLAStore.open(path, writable=True), True


def _same_store(
    out: str,
    store: VLAStore,
    episodes: list[EpisodeData],
    same: Callable[[VLAStore], bool] | None,
    other_store_hint: str,
) -> VLAStore:
    """``store`` if an earlier run of this same ingestion made it, else IngestUsageError."""
    names = tuple(e.name for e in episodes)
    steps = [e.step_count() for e in episodes]
    if store.catalog.names != names or store.catalog.steps.tolist() != steps or (same and not same(store)):
        what = "other episodes" if store.catalog.names != names else "other data"
        raise IngestUsageError(
            f"--out {out} is an existing store with {what} ({len(store.datasets)} episodes in it, {len(names)} "
            f"from this source); --out only creates a store (or finishes one this same command started). "
            + (other_store_hint or f"To add to it use --into {out}; else pick a new --out")
        )
    return store


def _open_or_create_remote(
    out: str,
    episodes: list[EpisodeData],
    columns: dict[str, Any] | None,
    same: Callable[[VLAStore], bool] | None,
    other_store_hint: str,
    allow_nonfinite: bool,
    format_version: int,
) -> tuple[VLAStore, bool]:
    """``--out s3://...``: object storage has no rename, but the manifest is written last, so a prefix
    without it is not a store; a killed creation leaves objects that the message says to remove."""
    from ..storage import open_storage

    try:
        store = VLAStore.open(out, writable=True)
    except StoreNotFoundError:
        if next(iter(open_storage(out).list("")), None) is not None:
            raise IngestUsageError(
                f"--out {out} holds objects but no vlastore store (a creation killed before its "
                "end?); remove that prefix, or pick a new --out"
            ) from None
        store = VLAStore.create(
            out, episodes, columns=columns, allow_nonfinite=allow_nonfinite, format_version=format_version
        )
        return store, True
    except FormatError:
        raise IngestUsageError(f"--out {out} exists and is not a readable vlastore store; pick a new --out") from None
    return _same_store(out, store, episodes, same, other_store_hint), False
