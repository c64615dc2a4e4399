"""The two kinds of failure the command line tells apart (exit codes 2 and 1); raised by the commands."""

from __future__ import annotations

__all__ = ["UserError", "DataError"]


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, exit code 2."""


class DataError(Exception):
    """A problem with the data (damaged store, failed check): shown as a few lines, exit code 1."""
