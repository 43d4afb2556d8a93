"""The runtime every service shares: replay, consume, apply, decide, commit, publish, ack.

A service names its durable consumers, how an event changes its state (`apply`) and what it
decides on an event (`decide`, pure: it reads state and returns new events). The runtime does
the rest, the same way everywhere (DESIGN.md rules 2 and 3):

1. On start, replay the SQLite log into the state, re-publish the outbox, and create each
   durable consumer anew to deliver from the stream sequence after the one it tracks.
2. Per fetched batch: skip messages at or below the tracked sequence (redeliveries), decode
   (a malformed message is set aside in `dead` and on `cumulus.dead.<service>`, never retried),
   apply, decide, apply the decisions; then ONE transaction writes the applied events, the
   outbox and the new tracked sequence; then ack, publish the outbox, and run `reconcile`.
3. Side effects (create a partition, start a process) happen only in `reconcile`, which looks at
   state and is idempotent, so a crash before or after an effect replays safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, events, subjects
from shared.config import Config
from shared.eventlog import Batch, EventLog, OutboxRow
from shared.events import Event, MalformedEvent
from shared.telemetry import DEAD_LETTERS, EVENTS_APPLIED, span

log = logging.getLogger(__name__)

STOP_STEP_S = 10.0
"""Longest wait for each step of a stop, so a stuck effect cannot hang a shutdown."""


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filters: Sequence[str]


class EventService:
    """Base of the four services; subclasses fill in the class attributes and hooks."""

    name: ClassVar[str]

    def __init__(self, config: Config) -> None:
        self.config = config
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.eventlog: EventLog | None = None
        self.position = 0
        """Position of the last event applied from or to the log."""
        self._tracked: dict[str, int] = {}
        self._write = asyncio.Lock()
        self._to_publish: asyncio.Queue[list[OutboxRow]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._pullers: list[bus.Puller] = []
        self._stopping = asyncio.Event()
        self._reconcile_wanted = asyncio.Event()
        self._progress = asyncio.Event()
        self.ready = asyncio.Event()

    # -- what a service defines ----------------------------------------------------------

    def consumers(self) -> list[ConsumerSpec]:
        return []

    def apply(self, event: Any) -> None:
        """Change state by one event; must be deterministic and accept a repeat."""

    def decide(self, event: Any) -> list[Event]:
        """The events this service emits in answer to `event`; reads state, changes nothing."""
        return []

    def ignore(self, subject: str) -> bool:
        """True for messages consumed only to keep the tracked sequence complete."""
        return False

    async def caught_up(self, consumer: str, seq: int, timeout: float) -> bool:
        """Wait until `consumer` has applied stream sequence `seq` (read-your-writes)."""
        deadline = time.monotonic() + timeout
        while self._tracked.get(consumer, 0) < seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    def volatile(self, event: Any) -> bool:
        """True for events applied but not logged (heartbeats): replay does without them."""
        return False

    def decode(self, data: bytes) -> Any:
        return events.decode(data)

    def encode(self, event: Any) -> bytes:
        return events.encode(event)

    async def on_start(self) -> None:
        """After replay and before consuming: register, start timers, API endpoints."""

    async def reconcile(self) -> None:
        """Make the world match state (effects); runs after every commit and on start."""

    async def on_stop(self) -> None:
        pass

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def db_path(self) -> Any:
        return self.config.data_path / f"{self.name}.sqlite"

    async def start(self, nc: Client | None = None) -> None:
        self.eventlog = await EventLog.open(self.db_path)
        await self._replay()
        self.nc = nc or await bus.connect(self.config.nats.url, f"cumulus-{self.name}")
        self.js = self.nc.jetstream()
        await bus.ensure_streams(self.js)
        pending = await self.eventlog.pending_outbox()
        if pending:
            self._to_publish.put_nowait(pending)
        self._tasks.append(asyncio.create_task(self._publisher(), name=f"{self.name}-publish"))
        await self.on_start()
        for spec in self.consumers():
            await bus.durable(
                self.js, spec.stream, spec.durable, spec.filters, self._tracked.get(spec.durable, 0)
            )
            puller = bus.Puller(self.nc, spec.stream, spec.durable)
            await puller.start()
            self._pullers.append(puller)
            self._tasks.append(
                asyncio.create_task(self._consume(spec, puller), name=f"{self.name}-{spec.durable}")
            )
        self._tasks.append(asyncio.create_task(self._reconciler(), name=f"{self.name}-reconcile"))
        self._reconcile_wanted.set()
        self.ready.set()
        log.info(
            "service started", extra={"fields": {"service": self.name, "position": self.position}}
        )

    async def stop(self) -> None:
        """Stop within a bounded time; whatever is cut short is in the log and the outbox."""
        self._stopping.set()
        for puller in self._pullers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(puller.stop(), STOP_STEP_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.on_stop(), STOP_STEP_S)
        # Let the publisher drain what is committed, briefly; the outbox keeps the rest.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=2.0)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*self._tasks, return_exceptions=True), STOP_STEP_S
            )
        self._tasks.clear()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), STOP_STEP_S)
            except Exception:
                with contextlib.suppress(Exception):
                    await self.nc.close()
        if self.eventlog is not None:
            await self.eventlog.close()

    async def _drained(self) -> None:
        await self._to_publish.join()

    async def run_forever(self) -> None:
        """Start, serve until SIGINT/SIGTERM, stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        await self._stopping.wait()
        await self.stop()

    # -- replay ----------------------------------------------------------------------------

    async def _replay(self) -> None:
        assert self.eventlog is not None
        count = 0
        async for position, data in self.eventlog.replay():
            self.apply(self.decode(data))
            self.position = position
            count += 1
        self._tracked = await self.eventlog.tracking()
        log.info("replayed event log", extra={"fields": {"service": self.name, "events": count}})

    # -- consuming -------------------------------------------------------------------------

    async def _consume(self, spec: ConsumerSpec, puller: bus.Puller) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await puller.next_batch()
                await self._handle_batch(spec.durable, msgs)
            except asyncio.CancelledError:
                raise
            except Exception:
                # State may be ahead of the log now: only a restart (replay) is safe.
                log.exception("consumer failed; stopping the service for a clean replay")
                self._stopping.set()
                raise

    async def _handle_batch(self, consumer: str, msgs: list[Msg]) -> None:
        async with self._write:
            batch = Batch()
            last = self._tracked.get(consumer, 0)
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq <= last:
                    continue
                last = seq
                if self.ignore(msg.subject):
                    continue
                try:
                    event = self.decode(msg.data)
                except MalformedEvent as exc:
                    self._set_aside(batch, consumer, seq, msg, str(exc))
                    continue
                if not self.volatile(event):
                    batch.log.append(msg.data)
                self._apply_and_decide(event, batch, msg.subject)
            batch.tracking[consumer] = last
            await self._commit(batch)
            self._tracked[consumer] = last
            self._progress.set()
            self._progress = asyncio.Event()
        await bus.ack_all(msgs[-1])
        self._reconcile_wanted.set()

    def _set_aside(self, batch: Batch, consumer: str, seq: int, msg: Msg, error: str) -> None:
        log.warning(
            "malformed message set aside",
            extra={
                "fields": {"service": self.name, "subject": msg.subject, "seq": seq, "error": error}
            },
        )
        DEAD_LETTERS.labels(self.name).inc()
        batch.dead.append((consumer, seq, msg.subject, msg.data, error))
        batch.outbox.append(
            OutboxRow(subjects.dead(self.name), f"dead-{self.name}-{consumer}-{seq}", "", msg.data)
        )

    def _apply_and_decide(self, event: Any, batch: Batch, subject: str = "") -> None:
        """Apply `event`, then stage what is decided on it, and on those decisions in turn."""
        with span(
            f"{self.name} {type(event).__name__}",
            getattr(event, "trace", ""),
            **{"messaging.destination": subject, "cumulus.job_id": getattr(event, "job_id", "")},
        ):
            self.apply(event)
            EVENTS_APPLIED.labels(self.name).inc()
            self._decide_chain(self.decide(event), batch)

    def _decide_chain(self, first: Iterable[Event], batch: Batch) -> None:
        # Depth first: an event's consequences are applied before its siblings, so every
        # decision is taken against a state that already holds every earlier decision.
        pending = deque(first)
        while pending:
            new = pending.popleft()
            self._stage(new, batch)
            pending.extendleft(reversed(self.decide(new)))

    def _stage(self, event: Any, batch: Batch, publish: bool = True) -> None:
        self.apply(event)
        data = self.encode(event)
        batch.log.append(data)
        if publish:
            batch.outbox.append(OutboxRow(bus.subject_of(event), event.event_id, event.trace, data))

    async def _commit(self, batch: Batch) -> None:
        assert self.eventlog is not None
        rows = await self.eventlog.commit(batch)
        self.position += len(batch.log)
        if rows:
            self._to_publish.put_nowait(rows)

    async def emit(self, new: Iterable[Event], internal: Iterable[Any] = ()) -> None:
        """Apply, log and publish events this service decided on its own (timers, effects).

        `internal` records change state and are logged but never published.
        """
        async with self._write:
            batch = Batch()
            for record in internal:
                self._stage(record, batch, publish=False)
            self._decide_chain(new, batch)
            if batch:
                await self._commit(batch)
        self._reconcile_wanted.set()

    # -- publishing and reconciling ----------------------------------------------------------

    async def _publisher(self) -> None:
        assert self.js is not None
        assert self.eventlog is not None
        backoff = 0.05
        while True:
            chunks = [await self._to_publish.get()]
            while not self._to_publish.empty():
                chunks.append(self._to_publish.get_nowait())
            rows = [row for chunk in chunks for row in chunk]
            while True:
                try:
                    await bus.publish_many(
                        self.js, ((r.subject, bus.headers(r.msg_id, r.trace), r.data) for r in rows)
                    )
                    await self.eventlog.published([r.id for r in rows])
                    backoff = 0.05
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "publish failed; retrying",
                        extra={"fields": {"service": self.name, "error": repr(exc)}},
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            for _ in chunks:
                self._to_publish.task_done()

    async def _reconciler(self) -> None:
        while True:
            await self._reconcile_wanted.wait()
            self._reconcile_wanted.clear()
            started = time.monotonic()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed", extra={"fields": {"service": self.name}})
                await asyncio.sleep(min(1.0, time.monotonic() - started + 0.1))
                self._reconcile_wanted.set()

    def wake(self) -> None:
        """Ask for a reconcile pass (after a timer or an effect finished)."""
        self._reconcile_wanted.set()
