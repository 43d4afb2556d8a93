"""The runtime every service shares: replay, consume, apply, decide, commit, publish, ack.

A service is an `EventService[S]` over its state `S`. It names its durable consumers, the
empty state (`new_state`), how an event changes the state (`apply`) and what it decides on an
event (`decide`, pure: it reads state and returns new events). The runtime does the rest, the
same way everywhere (DESIGN.md rules 2 and 3):

1. On start, take the database's writer lock (one copy of a service per data directory),
   run `before_replay`, replay the SQLite log into the state, re-publish the outbox, and create
   each durable consumer anew to deliver from the stream sequence after the one it tracks.
2. Per fetched batch: skip messages at or below the tracked sequence (redeliveries), decode
   (a malformed message is set aside in `dead` and on `cumulus.dead.<service>`, never retried),
   `step` each event (apply, decide, apply the decisions, depth first); then ONE transaction
   writes the applied events, the outbox and the new tracked sequence; then ack, hand the
   outbox to the relay (shared/outbox.py), and run `reconcile`.
3. Side effects (create a partition, start a process) happen only in `reconcile` and in tasks
   it `spawn`s, which look at state and are idempotent, so a crash before or after an effect
   replays safely. Their outcomes come back as events through `emit`.

Public surface for subclasses: the hooks under "what a service defines", `step` (pure; what
tests drive), `emit`, `spawn`, `reading`, `wake`, `caught_up`, `state`, `position`, `ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, events, subjects, trust
from shared.config import Config
from shared.errors import EventLogError, MalformedEvent
from shared.eventlog import Batch, EventLog, OutboxRow
from shared.events import Event
from shared.outbox import OutboxRelay
from shared.telemetry import DEAD_LETTERS, EVENTS_APPLIED, span

log = logging.getLogger(__name__)

STOP_STEP_S = 10.0
"""Longest wait for each step of a stop, so a stuck effect cannot hang a shutdown."""
DRAIN_S = 2.0
"""How long a stop lets the relay publish what is committed; the outbox keeps the rest."""

S = TypeVar("S")
T = TypeVar("T")


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filters: Sequence[str]


class EventService(Generic[S]):
    """Base of the four services; subclasses set `name` and fill in the hooks.

    `state` is created by `new_state()` at the end of `__init__`, so a subclass sets whatever
    `new_state` reads before calling `super().__init__`.
    """

    name: ClassVar[str]
    creates_streams: ClassVar[bool] = True
    """The control plane (gateway, scheduler) creates the streams; a worker's services may
    not (shared/auth.py) and wait for them instead."""
    state: S

    def __init__(self, config: Config) -> None:
        self.config = config
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.eventlog: EventLog | None = None
        self.position = 0
        """Position of the last event applied from or to the log."""
        self.ready = asyncio.Event()
        """Set once replay is done and the consumers run."""
        self._tracked: dict[str, int] = {}
        self._write = asyncio.Lock()
        self._relay: OutboxRelay | None = None
        self._loops: list[asyncio.Task[None]] = []
        """The consumers and the reconciler: what takes decisions."""
        self._relay_task: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[Any]] = set()
        self._pullers: list[bus.Puller] = []
        self._stopping = asyncio.Event()
        self._reconcile_wanted = asyncio.Event()
        self._progress = asyncio.Event()
        self.state = self.new_state()

    # -- what a service defines ----------------------------------------------------------

    def new_state(self) -> S:
        """The empty state that replay starts from; every service defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define new_state()")

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

    def volatile(self, event: Any) -> bool:
        """True for events applied but not logged (heartbeats): replay does without them."""
        return False

    def decode(self, data: bytes) -> Any:
        return events.decode(data)

    def encode(self, event: Any) -> bytes:
        return events.encode(event)

    async def before_replay(self) -> None:
        """After the writer lock and before replay: find what replay needs (e.g. workers)."""

    async def on_start(self) -> None:
        """After replay and before consuming: register, start timers, API endpoints."""

    async def reconcile(self) -> None:
        """Make the world match state (effects); runs after every commit and on start."""

    async def on_stop(self) -> None:
        """After the consumers, reconciler and spawned tasks ended; before the bus closes."""

    @property
    def db_path(self) -> Path:
        """The service's SQLite file; one writer at a time (see shared/eventlog.py)."""
        return self.config.data_path / f"{self.name}.sqlite"

    # -- the public runtime ------------------------------------------------------------------

    def step(self, event: Any) -> list[Event]:
        """Apply `event` and return everything decided on it, each decision already applied.

        Depth first: a decision's own consequences follow it before its siblings, so every
        decision is taken against a state that holds every earlier one. No I/O and nothing
        logged: the consumer runs exactly this per event (then logs the event and what it
        returns), and tests drive it to feed events without a bus.
        """
        self.apply(event)
        EVENTS_APPLIED.labels(self.name).inc()
        return self._chain(self.decide(event))

    async def emit(self, new: Iterable[Event], internal: Iterable[Any] = ()) -> None:
        """Apply, log and publish events this service decided on its own (timers, effects).

        Each event's consequences are decided and emitted too, as `step` does. `internal`
        records change state and are logged but never published. Never call it while holding
        `reading()`.
        """
        async with self._write:
            batch = Batch()
            for record in internal:
                self.apply(record)
                batch.log.append(self.encode(record))
            self._stage(self._chain(new), batch)
            if batch:
                await self._commit(batch)
        self._reconcile_wanted.set()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[S]:
        """The state, consistent with `position`: no batch is half applied while it is held.

        For API handlers that read state; keep the block short and free of `emit`.
        """
        async with self._write:
            yield self.state

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Run `coro` as a task the service owns: named, logged if it fails, cancelled at stop."""
        task = asyncio.create_task(coro, name=f"{self.name}-{name}")
        self._spawned.add(task)
        task.add_done_callback(self._spawned_done)
        return task

    def wake(self) -> None:
        """Ask for a reconcile pass (after a timer or an effect finished)."""
        self._reconcile_wanted.set()

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

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, nc: Client | None = None) -> None:
        """Lock, replay, connect, publish the outbox, `on_start`, then consume and reconcile.

        A start that fails gives back what it took (the writer lock first of all).
        """
        try:
            await self._start(nc)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._release()
            raise

    async def _start(self, nc: Client | None) -> None:
        self.eventlog = await EventLog.open(self.db_path)
        await self.before_replay()
        await self._replay()
        self.nc = nc or await bus.connect(
            self.config.nats.url,
            f"cumulus-{self.name}",
            timeout=self.config.nats.connect_timeout,
            credentials=self.config.nats.credentials,
        )
        self.js = self.nc.jetstream()
        if self.creates_streams:
            await bus.ensure_streams(self.js)
        else:
            await bus.wait_streams(self.js)
        self._relay = OutboxRelay(self.js, self.eventlog, self.name)
        self._relay.put(await self.eventlog.pending_outbox())
        self._relay_task = asyncio.create_task(self._relay.run(), name=f"{self.name}-publish")
        await self.on_start()
        for spec in self.consumers():
            after = self._tracked.get(spec.durable, 0)
            if self.creates_streams:
                await bus.durable(self.js, spec.stream, spec.durable, spec.filters, after)
            else:  # a worker's: the control plane makes it, within the worker's own subjects
                request = bus.ConsumerRequest(
                    stream=spec.stream,
                    durable=spec.durable,
                    filters=list(spec.filters),
                    after=after,
                )
                worker_id = spec.durable.split("-", 1)[1]
                await bus.request_durable(self.nc, worker_id, request)
            puller = bus.Puller(self.nc, spec.stream, spec.durable)
            await puller.start()
            self._pullers.append(puller)
            self._loops.append(
                asyncio.create_task(self._consume(spec, puller), name=f"{self.name}-{spec.durable}")
            )
        self._loops.append(asyncio.create_task(self._reconciler(), name=f"{self.name}-reconcile"))
        self._reconcile_wanted.set()
        self.ready.set()
        log.info(
            "service started", extra={"fields": {"service": self.name, "position": self.position}}
        )

    async def stop(self) -> None:
        """Stop within a bounded time; whatever is cut short is in the log and the outbox.

        Order: no new messages; the consumers and the reconciler end between two batches;
        spawned tasks are cancelled; `on_stop`; the relay publishes what is committed (briefly);
        the bus and the log close, which gives the writer lock back.
        """
        self._stopping.set()
        await self._stop_pullers()
        await self._end_loops()
        await _cancel(self._spawned)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.on_stop(), STOP_STEP_S)
        if self._relay is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._relay.drained(), DRAIN_S)
        await self._release()

    async def _stop_pullers(self) -> None:
        for puller in self._pullers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(puller.stop(), STOP_STEP_S)
        self._pullers.clear()

    async def _end_loops(self) -> None:
        # Under the write lock no batch is between its apply and its commit.
        acquired = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._write.acquire(), STOP_STEP_S)
            acquired = True
        try:
            await _cancel(self._loops)
        finally:
            if acquired:
                self._write.release()

    async def _release(self) -> None:
        """Close everything `start` opened, in any state it got to."""
        await self._stop_pullers()
        await _cancel(self._loops)
        self._loops.clear()
        await _cancel(self._spawned)
        if self._relay_task is not None:
            await _cancel([self._relay_task])
            self._relay_task = None
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), STOP_STEP_S)
            except Exception:
                with contextlib.suppress(Exception):
                    await self.nc.close()
        if self.eventlog is not None:
            await self.eventlog.close()
            self.eventlog = None

    async def run_forever(self) -> None:
        """Start, serve until SIGINT/SIGTERM, stop cleanly.

        A database that cannot be opened (another copy holds it, or it is unreadable) ends
        the process with one line naming the file, and exit status 1.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self.start()
        except EventLogError as exc:
            raise SystemExit(f"cumulus {self.name}: {exc.message}") from None
        await self._stopping.wait()
        await self.stop()

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        self._spawned.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "background task failed",
                exc_info=exc,
                extra={"fields": {"service": self.name, "task": task.get_name()}},
            )

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
                if not self.ignore(msg.subject):
                    self._take(batch, consumer, seq, msg)
            batch.tracking[consumer] = last
            await self._commit(batch)
            self._tracked[consumer] = last
            self._progress.set()
            self._progress = asyncio.Event()
        await bus.ack_all(msgs[-1])
        self._reconcile_wanted.set()

    def _take(self, batch: Batch, consumer: str, seq: int, msg: Msg) -> None:
        """Decode, step and stage one consumed message (or set it aside)."""
        try:
            event = self.decode(msg.data)
        except MalformedEvent as exc:
            self._set_aside(batch, consumer, seq, msg, str(exc))
            return
        if reason := trust.disagreement(msg.subject, event):
            self._set_aside(batch, consumer, seq, msg, f"not believed: {reason}")
            return
        if not self.volatile(event):
            batch.log.append(msg.data)
        with span(
            f"{self.name} {type(event).__name__}",
            getattr(event, "trace", ""),
            **{
                "messaging.destination": msg.subject,
                "cumulus.job_id": getattr(event, "job_id", ""),
            },
        ):
            self._stage(self.step(event), batch)

    def _set_aside(self, batch: Batch, consumer: str, seq: int, msg: Msg, error: str) -> None:
        log.warning(
            "message set aside",
            extra={
                "fields": {"service": self.name, "subject": msg.subject, "seq": seq, "error": error}
            },
        )
        DEAD_LETTERS.labels(self.name).inc()
        batch.dead.append((consumer, seq, msg.subject, msg.data, error))
        batch.outbox.append(
            OutboxRow(subjects.dead(self.name), f"dead-{self.name}-{consumer}-{seq}", "", msg.data)
        )

    def _chain(self, first: Iterable[Event]) -> list[Event]:
        """Apply each of `first` and what is decided on it, depth first; return them in order."""
        out: list[Event] = []
        pending = deque(first)
        while pending:
            new = pending.popleft()
            self.apply(new)
            out.append(new)
            pending.extendleft(reversed(self.decide(new)))
        return out

    def _stage(self, decided: Iterable[Event], batch: Batch) -> None:
        """Log and queue for publishing events already applied."""
        for event in decided:
            data = self.encode(event)
            batch.log.append(data)
            batch.outbox.append(OutboxRow(bus.subject_of(event), event.event_id, event.trace, data))

    async def _commit(self, batch: Batch) -> None:
        assert self.eventlog is not None
        rows = await self.eventlog.commit(batch)
        self.position += len(batch.log)
        if self._relay is not None:
            self._relay.put(rows)

    # -- reconciling -----------------------------------------------------------------------

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


async def _cancel(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them, boundedly."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if pending:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), STOP_STEP_S)
