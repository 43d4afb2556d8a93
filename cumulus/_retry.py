"""How the SDK retries a call the cluster could not take *now* (the seed's `run_with_retry`).

RESOURCE_EXHAUSTED and UNAVAILABLE mean "not now": no GPU share is free anywhere, or the API
(or every worker) is away, e.g. while a gateway restarts. Those are retried with exponential
backoff; every other error means "not like this" and is raised at once, and so is a
RESOURCE_EXHAUSTED that says it is `permanent` (the job is larger than any worker of the pool,
or than the user's share): no wait can change that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from shared.errors import CumulusError, InvalidArgument

T = TypeVar("T")

log = logging.getLogger("cumulus")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for calls that failed with a retryable seed code.

    The default is the seed's: three attempts, waiting 1 s then 2 s.
    """

    max_attempts: int = 3
    """Attempts in all, the first included; 1 turns retries off."""
    initial_backoff_s: float = 1.0
    """Wait before the second attempt."""
    multiplier: float = 2.0
    """Each wait is the previous one times this."""
    max_backoff_s: float = 30.0
    """No single wait is longer than this."""
    retry_on: frozenset[str] = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})
    """Seed codes worth another attempt; any other code is raised at once."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgument naming the first field that makes no sense."""
        if self.max_attempts < 1:
            raise InvalidArgument(f"RetryPolicy.max_attempts must be >= 1, not {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise InvalidArgument("RetryPolicy backoffs must not be negative")
        if self.multiplier < 1:
            raise InvalidArgument(f"RetryPolicy.multiplier must be >= 1, not {self.multiplier}")

    def backoffs(self) -> list[float]:
        """The waits between attempts, in order (one fewer than the attempts)."""
        waits, wait = [], self.initial_backoff_s
        for _ in range(self.max_attempts - 1):
            waits.append(min(wait, self.max_backoff_s))
            wait *= self.multiplier
        return waits

    def retries(self, error: BaseException) -> bool:
        """Whether `error` is worth another attempt: a code in `retry_on`, and not an error
        that says retrying cannot change it."""
        if not isinstance(error, CumulusError) or error.code not in self.retry_on:
            return False
        return not getattr(error, "permanent", False)

    async def call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` until it succeeds, fails for good, or the attempts are used up."""
        waits = self.backoffs()
        for number in range(1, self.max_attempts + 1):
            try:
                return await attempt()
            except CumulusError as exc:
                if not self.retries(exc) or number == self.max_attempts:
                    raise
                wait = waits[number - 1]
                log.warning(
                    "%s failed with %s: %s; retrying in %.3g s (attempt %d of %d)",
                    what,
                    exc.code,
                    exc.message,
                    wait,
                    number + 1,
                    self.max_attempts,
                )
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")


NO_RETRY = RetryPolicy(max_attempts=1)
