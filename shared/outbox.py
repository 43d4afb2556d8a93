"""The outbox relay: publishes what a service committed to its outbox, then forgets it.

A service commits the events it emits to the `outbox` table in the same SQLite transaction as
its state change (DESIGN.md rule 2); the relay publishes them in order, pipelined, and deletes
the rows JetStream acknowledged (in one transaction, once nothing more waits to be published).
A failed publish is retried with exponential backoff, for ever: the rows stay in the outbox, so
a crash at any point re-publishes them on the next start, and JetStream drops the copies it
already holds by their `Nats-Msg-Id`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.js import JetStreamContext

from shared import bus
from shared.eventlog import EventLog, OutboxRow
from shared.telemetry import DEAD_LETTERS

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
FORGET_EVERY = 4096
"""Most published rows the relay owes a delete before it makes one (module docstring)."""
T = TypeVar("T")


class OutboxRelay:
    """Publishes committed outbox rows in commit order; `run()` is the relay's task."""

    def __init__(self, js: JetStreamContext, eventlog: EventLog, service: str) -> None:
        self._js = js
        self._eventlog = eventlog
        self._service = service
        self._queue: asyncio.Queue[list[OutboxRow]] = asyncio.Queue()
        self.waiting = 0
        """Rows handed on and not yet published (cumulus_outbox_depth)."""

    def put(self, rows: list[OutboxRow]) -> None:
        """Hand on rows just committed (or found in the outbox at start)."""
        if rows:
            self.waiting += len(rows)
            self._queue.put_nowait(rows)

    async def drained(self) -> None:
        """Return once every row handed on so far is published and forgotten."""
        await self._queue.join()

    async def run(self) -> None:
        """Publish for ever: everything waiting goes out as one pipelined burst. The rows
        published are forgotten in one transaction once nothing more is waiting (or
        FORGET_EVERY rows are owed): under a burst, commits arrive while a publish is in
        flight, and one delete then covers several bursts. A crash before the delete
        re-publishes them, which JetStream drops as duplicates, as it always could."""
        owed: list[int] = []
        chunks_owed = 0
        while True:
            chunks = [await self._queue.get()]
            while not self._queue.empty():
                chunks.append(self._queue.get_nowait())
            rows = [row for chunk in chunks for row in chunk]
            owed += await self._until_done(functools.partial(self._publish, rows))
            self.waiting -= len(rows)
            chunks_owed += len(chunks)
            if self._queue.empty() or len(owed) >= FORGET_EVERY:
                await self._until_done(functools.partial(self._eventlog.published, owed))
                owed = []
                for _ in range(chunks_owed):
                    self._queue.task_done()
                chunks_owed = 0

    async def _until_done(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, retried with exponential backoff for as long as it fails."""
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                return await attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "publish failed; retrying",
                    extra={"fields": {"service": self._service, "error": repr(exc)}},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _publish(self, rows: list[OutboxRow]) -> list[int]:
        """Publish `rows` (those the bus can take), pipelined; the ids published."""
        rows = await self._set_aside_unpublishable(rows)
        await bus.publish_many(
            self._js, ((r.subject, bus.headers(r.msg_id, r.trace), r.data) for r in rows)
        )
        return [r.id for r in rows]

    async def _set_aside_unpublishable(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Rows the bus can never take (over its max_payload, or a subject that is not one)
        go to the dead table with the reason, so they cannot hold up every row after them
        (the runtime never commits such rows; an outbox written by an older version may)."""
        limit = bus.event_limit(self._js._nc)
        good: list[OutboxRow] = []
        for row in rows:
            if len(row.data) > limit:
                reason = f"{len(row.data)} bytes, over the bus's limit of {limit}"
            elif not _publishable_subject(row.subject):
                reason = f"{row.subject[:200]!r} is not a valid subject"
            else:
                good.append(row)
                continue
            log.error(
                "outbox row cannot be published; set aside",
                extra={"fields": {"service": self._service, "error": reason}},
            )
            DEAD_LETTERS.labels(self._service).inc()
            await self._eventlog.set_aside_outbox([row], f"not publishable: {reason}")
        return good


def _publishable_subject(subject: str) -> bool:
    """A literal NATS subject: non-empty tokens, no whitespace, no wildcards."""
    tokens = subject.split(".")
    return all(t and t not in ("*", ">") and not any(c.isspace() for c in t) for t in tokens)
