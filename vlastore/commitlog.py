"""The commit log of a format-2 store: find the head, read a commit, commit a change.

Commit ``N`` is the object ``_log/<N>.json``, created with ``put_if_absent``
(local files: ``os.link``; S3: ``If-None-Match: *``), so exactly one writer makes
each number and no update is lost: a committer that loses the race re-reads the
new head, applies its change to it again and tries the next number. There is no
lock, and a killed committer leaves either no commit or a complete one.

The head is the highest number present. A hint ``_log/_last`` (the number of a
recent commit, written after each commit, never trusted beyond a starting
point) lets readers list only newer names on object storage.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from .format import FormatError, canonical_json
from .snapshot import LOG_PREFIX, Snapshot, commit_of_log_key, log_key
from .storage.base import AlreadyExistsError, Storage

__all__ = ["CommitLog", "CommitConflictError", "SnapshotNotFoundError", "MAX_COMMIT_BYTES"]

log = logging.getLogger(__name__)

MAX_COMMIT_BYTES = 256 << 20
"""A commit document larger than this is refused unread (a damaged or hostile store)."""

HINT_KEY = f"{LOG_PREFIX}/_last"


class CommitConflictError(RuntimeError):
    """A change could not be committed: other writers kept committing first, or the change no longer applies."""


class SnapshotNotFoundError(LookupError):
    """The asked-for commit is not in the log (never made, or removed by ``vlastore gc``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CommitLog:
    """The ``_log/`` folder of one store."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # ------------------------------------------------------------------ reads

    def numbers(self) -> list[int]:
        """Every commit number present, ascending."""
        found = (commit_of_log_key(key) for key, _size in self.storage.list(LOG_PREFIX))
        return sorted(n for n in found if n is not None)

    def head_number(self) -> int | None:
        """The newest commit's number (None: an empty log)."""
        numbers = self.numbers()
        return numbers[-1] if numbers else None

    def read(self, commit: int) -> Snapshot:
        """Commit ``commit``, parsed and checked.

        Raises:
            SnapshotNotFoundError: no such commit. FormatError: it is damaged.
        """
        key = log_key(commit)
        size = self.storage.size(key)
        if size is None:
            raise SnapshotNotFoundError(
                f"{self.storage.location}: snapshot {commit} is not in the log (never made, or removed by "
                "`vlastore gc`); `vlastore log STORE` lists the snapshots there are"
            )
        if size > MAX_COMMIT_BYTES:
            raise FormatError(f"{self.storage.location}/{key}: {size:,} bytes, more than a commit can be; damaged")
        data = self.storage.get(key)
        if data is None:
            raise SnapshotNotFoundError(f"{self.storage.location}: snapshot {commit} disappeared while being read")
        where = f"{self.storage.location}/{key}"
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{where}: not valid JSON ({exc}); the commit is damaged") from None
        snapshot = Snapshot.from_dict(document, where)
        if snapshot.commit != commit:
            raise FormatError(f"{where}: the document says it is commit {snapshot.commit}; damaged or misplaced")
        return snapshot

    def head(self) -> Snapshot:
        number = self.head_number()
        if number is None:
            raise SnapshotNotFoundError(f"{self.storage.location}: the commit log is empty")
        return self.read(number)

    # ----------------------------------------------------------------- writes

    def write(self, snapshot: Snapshot) -> None:
        """Create commit ``snapshot.commit``.

        Raises:
            AlreadyExistsError: another writer made that number first.
        """
        self.storage.put_if_absent(log_key(snapshot.commit), canonical_json(snapshot.to_dict()))
        try:
            self.storage.put(HINT_KEY, str(snapshot.commit).encode())
        except OSError as exc:  # only a hint: a reader lists the log anyway
            log.debug("could not update %s: %s", HINT_KEY, exc)

    def commit(
        self,
        change: Callable[[Snapshot | None, int], Snapshot],
        attempts: int = 50,
    ) -> Snapshot:
        """Apply ``change`` to the head and commit the result, retrying on a lost race.

        Args:
            change: ``(head or None, number) -> new snapshot numbered ``number```. It may
                write new immutable objects (named with :func:`~vlastore.snapshot.object_id`)
                and is called again, on the newer head, after a lost race; it raises
                :class:`CommitConflictError` when the change no longer applies.
            attempts: races to lose before giving up.

        Raises:
            CommitConflictError: every attempt lost, or the change no longer applies.
        """
        for attempt in range(attempts):
            head_number = self.head_number()
            head = None if head_number is None else self.read(head_number)
            number = (head_number or 0) + 1
            snapshot = change(head, number)
            if snapshot.commit != number or snapshot.parent != head_number:
                raise AssertionError("change() must number the new snapshot after the head it was given")
            try:
                self.write(snapshot)
                return snapshot
            except AlreadyExistsError:
                # another committer made this number: re-apply on its result (jitter spreads the retries)
                time.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise CommitConflictError(
            f"{self.storage.location}: {attempts} attempts to commit lost the race to other writers; "
            "retry, or find the process committing in a loop"
        )

    def describe(self) -> list[dict[str, Any]]:
        """Every commit: number, time, what changed (for ``vlastore log``)."""
        out = []
        for number in self.numbers():
            try:
                snapshot = self.read(number)
            except (FormatError, SnapshotNotFoundError) as exc:
                out.append({"commit": number, "time": "", "changes": [], "error": str(exc)})
                continue
            out.append(
                {
                    "commit": snapshot.commit,
                    "time": snapshot.time,
                    "episodes": snapshot.catalog.episodes,
                    "steps": snapshot.catalog.steps,
                    "changes": [c.summary() for c in snapshot.changes],
                }
            )
        return out
