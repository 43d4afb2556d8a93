"""The exit statuses of `cumulus` (docs/cli.md) and the errors that choose them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_TIMED_OUT = 4
EXIT_CANCELLED = 5
EXIT_UNAVAILABLE = 6
EXIT_DENIED = 7
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    "INTERNAL": EXIT_FAILED,
    "INVALID_ARGUMENT": EXIT_USAGE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "DEADLINE_EXCEEDED": EXIT_TIMED_OUT,
    "CANCELLED": EXIT_CANCELLED,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "PERMISSION_DENIED": EXIT_DENIED,
    "UNAUTHENTICATED": EXIT_DENIED,
}
"""The exit status for each seed code (a job's or a request's)."""

STATUS_EXIT = {
    "COMPLETED": EXIT_OK,
    "FAILED": EXIT_FAILED,
    "TIMED_OUT": EXIT_TIMED_OUT,
    "CANCELLED": EXIT_CANCELLED,
}
"""The exit status of `run` for each way a job ends."""


class UsageError(Exception):
    """Bad command-line input: printed, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during `run`, after the job was cancelled: exit status 130."""
