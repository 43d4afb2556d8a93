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
   An event whose apply or decide raises is poison: the state is rebuilt from the log (it may
   be half changed), the message is set aside with the error, and the batch is taken again
   without it. A commit that fails (a full disk) rebuilds the state too, then pauses: the batch
   is retried with backoff until the log takes it (`cumulus_consumption_paused` is 1 meanwhile),
   so nothing is lost and nothing is applied twice. An event larger than the bus carries is
   never applied: a job event becomes that job's failure (RESOURCE_EXHAUSTED).
   Every `retention.snapshot_events` logged events the state is compacted (`compact`) and
   snapshotted (`snapshot`), and the log rows it covers are dropped (shared/eventlog.py).
3. Side effects (create a partition, start a process) happen only in `reconcile` and in tasks
   it `spawn`s, which look at state and are idempotent, so a crash before or after an effect
   replays safely. Their outcomes come back as events through `emit`.

Every consumer keeps the scheduler's epoch fence (shared/events.py `stale`): a consumed
decision stamped with an epoch older than its state's `fence()` is neither applied nor logged,
only counted (`cumulus_fenced_events_total`) and logged as "fenced". A control-plane replica
(config `instance`) has its own SQLite file and durable consumers (`-<instance>`).

Public surface for subclasses: the hooks under "what a service defines", `step` (pure; what
tests drive), `emit`, `emit_decided`, `spawn`, `reading`, `wake`, `caught_up`, `published`,
`end`, `set_log_aside`, `state`, `position`, `ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, events, health, lifecycle, metrics, subjects, tracing, trust
from shared.config import Config
from shared.errors import EventLogError, MalformedEvent, ResourceExhausted, Unavailable
from shared.eventlog import Batch, EventLog, OutboxRow
from shared.events import Event
from shared.outbox import OutboxRelay
from shared.telemetry import (
    CONSUMER_GAPS,
    CONSUMPTION_PAUSED,
    DEAD_LETTERS,
    EVENTLOG_TRANSACTIONS,
    EVENTS_APPLIED,
    FENCED,
    SNAPSHOTS,
)

log = logging.getLogger(__name__)

STOP_STEP_S = 10.0
"""Longest wait for each step of a stop, so a stuck effect cannot hang a shutdown."""
STOP_S = 3.5
"""Longest a whole stop takes: its steps share it (the bus away, a stuck effect), and what
is cut short is in the log and the outbox for the next start (shared/lifecycle.py)."""
DRAIN_S = 2.0
"""How long a stop lets the relay publish what is committed; the outbox keeps the rest."""
LAG_EVERY_S = 2.0
"""How often a service with metrics on looks at its consumers' lag."""
PAUSE_FIRST_S = 0.25
PAUSE_MAX_S = 5.0
"""Retry interval bounds while the event log cannot be written (a full disk)."""

S = TypeVar("S")
T = TypeVar("T")


class _Poison(Exception):
    """An event of a consumed batch that cannot be applied (its apply or decide raised)."""

    def __init__(self, seq: int, error: str) -> None:
        super().__init__(error)
        self.seq = seq
        self.error = error


class _Stopping(Exception):
    """The service stops while it waits for its event log to take a write."""


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
        self._delivered: dict[str, int] = {}
        """Per consumer, the consumer sequence of the last delivery taken since it was made."""
        self._write = asyncio.Lock()
        self._relay: OutboxRelay | None = None
        self._loops: list[asyncio.Task[None]] = []
        """The consumers and the reconciler: what takes decisions."""
        self._relay_task: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[Any]] = set()
        self._pullers: list[bus.Puller] = []
        self._stopping = asyncio.Event()
        self._stop_by = float("inf")
        """When the stop under way must be done (monotonic); `_stop_left`."""
        self._reconcile_wanted = asyncio.Event()
        self._progress = asyncio.Event()
        self.paused = False
        """True while the event log refuses writes (a full disk): consumption waits."""
        self.hearing_since = time.time()
        """When this service last began to take in events: its start, or the end of a pause.
        Silence before it says nothing about the publishers (the scheduler's liveness)."""
        self._pause_backoff = PAUSE_FIRST_S
        self.failure: BaseException | None = None
        """What stopped a consumer unexpectedly; `run_forever` then exits non-zero."""
        self.exit_message = ""
        """Why the service ended itself (`end`): `run_forever` exits 1 with this line."""
        self._snapshot_at = 0
        """Position of the latest snapshot (0: none)."""
        self._applied = EVENTS_APPLIED.labels(self.name)
        """This service's child of the counter, looked up once (not per event)."""
        DEAD_LETTERS.labels(self.name)  # exported as 0 from the start: a rate has a base
        self.lag: dict[str, int] = {}
        """Durable consumer -> messages not yet applied, as of the last look (`_watch_lag`)."""
        self.state = self.new_state()
        metrics.watch(self)

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

    def fence(self) -> int:
        """The largest scheduler epoch this service's state has seen (shared/events.py
        `stale`): a consumed decision stamped with a smaller one is neither applied nor
        logged. 0: this service keeps no fence."""
        return 0

    def skip(self, event: Any) -> bool:
        """True for a consumed event this service applied already when it decided it (a
        leading scheduler's own decisions coming back): neither applied nor logged again."""
        return False

    async def after_connect(self) -> None:
        """Once connected, before the outbox is published: a service may find here that its
        log must not be published (`set_log_aside`)."""

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

    def reset_state(self) -> None:
        """Start the state afresh (before a rebuild from the log); override where other
        objects hold parts of the state."""
        self.state = self.new_state()

    def snapshot(self) -> bytes | None:
        """The whole state, encoded, for replay to start from; None: take no snapshots."""
        return None

    def restore(self, data: bytes) -> None:
        """Set the state (fresh from `new_state`) from what `snapshot` returned."""
        raise NotImplementedError(f"{type(self).__name__} takes snapshots but cannot restore")

    def compact(self, now: float) -> None:
        """Just before a snapshot: drop from memory what the stores answer for (jobs that
        ended more than `retention.forget_after_s` ago)."""

    async def on_stop(self) -> None:
        """After the consumers, reconciler and spawned tasks ended; before the bus closes."""

    def gauges(self) -> Iterable[metrics.GaugeValue]:
        """What a scrape reads of this service (shared/metrics.py GAUGES), in the scrape's
        thread: only reads, and copies a dict before walking it. A service adds its own."""
        if self._relay is not None:
            yield ("cumulus_outbox_depth", (self.name,), self._relay.waiting)
        for consumer, lag in list(self.lag.items()):
            yield ("cumulus_consumer_lag", (self.name, consumer), lag)

    @property
    def db_path(self) -> Path:
        """The service's SQLite file; one writer at a time (see shared/eventlog.py). A named
        replica (config `instance`) has its own."""
        suffix = f"-{self.config.instance}" if self.config.instance else ""
        return self.config.data_path / f"{self.name}{suffix}.sqlite"

    def consumer_name(self, spec: ConsumerSpec) -> str:
        """The server's name of `spec`'s durable consumer: a control-plane replica's carries
        its `instance`, so replicas never share a cursor. The log tracks `spec.durable`."""
        if self.creates_streams and self.config.instance:
            return f"{spec.durable}-{self.config.instance}"
        return spec.durable

    # -- the public runtime ------------------------------------------------------------------

    def step(self, event: Any) -> list[Event]:
        """Apply `event` and return everything decided on it, each decision already applied.

        Depth first: a decision's own consequences follow it before its siblings, so every
        decision is taken against a state that holds every earlier one. No I/O and nothing
        logged: the consumer runs exactly this per event (then logs the event and what it
        returns), and tests drive it to feed events without a bus.
        """
        return [event for event, _ in self._step(event)]

    def _step(self, event: Any) -> list[tuple[Event, bytes]]:
        self.apply(event)
        self._applied.inc()
        return self._chain(self.decide(event))

    async def emit(
        self, new: Iterable[Event], internal: Iterable[Any] = (), *, wait: bool = True
    ) -> None:
        """Apply, log and publish events this service decided on its own (timers, effects).

        Each event's consequences are decided and emitted too, as `step` does. `internal`
        records change state and are logged but never published. Never call it while holding
        `reading()`. If the log cannot take the write (a full disk) the state is put back as
        it was; then with `wait` the emit retries until it can (an effect's outcome is never
        lost), without it raises Unavailable (an API call answers at once). If applying raises,
        the state is put back and the error raised.
        """
        new, internal = list(new), list(internal)

        def stage(batch: Batch) -> None:
            for record in internal:
                self.apply(record)
                batch.log.append(self.encode(record))
            self._stage(self._chain(new), batch)

        await self._write_until_taken(stage, wait=wait)

    async def emit_decided(self, decide: Callable[[], Iterable[Event]]) -> None:
        """`emit` what `decide()` returns, computed under the write lock: against the state
        as it is when applied (no batch between the reading and the applying)."""
        await self._write_until_taken(lambda batch: self._stage(self._chain(decide()), batch))

    async def _write_until_taken(
        self, stage: Callable[[Batch], None], *, wait: bool = True
    ) -> None:
        """Apply and log what `stage` puts in a batch, under the write lock, until the log
        takes it (see `emit`): a failure to apply puts the state back and raises; a log that
        refuses the write is waited out (`wait`) or answered with Unavailable."""
        while True:
            async with self._write:
                batch = Batch()
                try:
                    stage(batch)
                except Exception:
                    await self._rebuild()
                    raise
                if not batch or await self._try_commit(batch):
                    await self._maybe_snapshot()
                    break
            if not wait:
                raise Unavailable(
                    f"Cumulus {self.name} cannot record this now: its event log refuses writes "
                    "(is the data disk full?); retry shortly"
                )
            if not await self._paused_wait():
                raise Unavailable(f"Cumulus {self.name} is stopping; retry shortly")
        self._resumed()
        self._reconcile_wanted.set()

    async def published(self, timeout: float) -> bool:
        """Wait until everything committed so far is published (the outbox is empty); False
        if that took longer than `timeout`."""
        if self._relay is None:
            return True
        try:
            await asyncio.wait_for(self._relay.drained(), timeout)
        except TimeoutError:
            return False
        return True

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
        tracing.setup(f"cumulus-{self.name}")
        self.eventlog = await EventLog.open(self.db_path)
        self.eventlog.on_write = EVENTLOG_TRANSACTIONS.labels(self.name).inc
        await self.before_replay()
        await self._replay()
        self.nc = nc or await bus.connect(
            self.config.nats.url,
            f"cumulus-{self.name}",
            timeout=self.config.nats.connect_timeout,
            credentials=self.config.nats.credentials,
            reconnected=self._reconnected,
            startup_timeout=self.config.nats.startup_timeout,
        )
        self.js = self.nc.jetstream()
        await health.serve(self)  # alive/ready on the bus and the metrics port
        if self.creates_streams:
            await bus.ensure_streams(self.js, self.config.retention, self.config.nats.replicas)
        else:
            await bus.wait_streams(self.js, self.config.nats.startup_timeout or None)
        await self.after_connect()
        self._relay = OutboxRelay(self.js, self.eventlog, self.name)
        self._relay.put(await self.eventlog.pending_outbox())
        self._relay_task = asyncio.create_task(self._relay.run(), name=f"{self.name}-publish")
        await self.on_start()
        for spec in self.consumers():
            await self._make_consumer(spec)
            puller = bus.Puller(self.nc, spec.stream, self.consumer_name(spec))
            await puller.start()
            self._pullers.append(puller)
            self._loops.append(
                asyncio.create_task(self._consume(spec, puller), name=f"{self.name}-{spec.durable}")
            )
        self._loops.append(asyncio.create_task(self._reconciler(), name=f"{self.name}-reconcile"))
        if self.config.metrics_port:
            self.spawn(self._watch_lag(), name="lag")
        self._reconcile_wanted.set()
        self.hearing_since = time.time()
        self.ready.set()
        log.info(
            "service started", extra={"fields": {"service": self.name, "position": self.position}}
        )

    async def _make_consumer(self, spec: ConsumerSpec) -> None:
        """Create `spec`'s durable consumer anew, delivering from the first stream sequence
        after the last one this service applied from it."""
        assert self.nc is not None
        assert self.js is not None
        after = self._tracked.get(spec.durable, 0)
        if self.creates_streams:
            await bus.durable(self.js, spec.stream, self.consumer_name(spec), spec.filters, after)
        else:  # a worker's: the control plane makes it, within the worker's own subjects
            request = bus.ConsumerRequest(
                stream=spec.stream, durable=spec.durable, filters=list(spec.filters), after=after
            )
            worker_id = spec.durable.split("-", 1)[1]
            await bus.request_durable(self.nc, worker_id, request)
        self._delivered[spec.durable] = 0

    async def stop(self) -> None:
        """Stop within a bounded time; whatever is cut short is in the log and the outbox.

        Order: no new messages; the consumers and the reconciler end between two batches;
        spawned tasks are cancelled; `on_stop`; the relay publishes what is committed (briefly);
        the bus and the log close, which gives the writer lock back.
        """
        self._stopping.set()
        self._stop_by = time.monotonic() + STOP_S
        await self._stop_pullers()
        await self._end_loops()
        await _cancel(self._spawned, self._stop_left())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.on_stop(), self._stop_left())
        if self._relay is not None and self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(asyncio.TimeoutError):  # the bus away: the outbox keeps it
                await asyncio.wait_for(self._relay.drained(), min(DRAIN_S, self._stop_left()))
        await self._release()
        if tracing.enabled():  # the last spans, exported (bounded: tracing.FLUSH_S)
            await asyncio.to_thread(tracing.flush)

    def _stop_left(self) -> float:
        """Seconds a step of the stop may take: STOP_STEP_S, within what is left of STOP_S
        (a little at least, so each step gets its chance to end)."""
        return max(0.1, min(STOP_STEP_S, self._stop_by - time.monotonic()))

    async def _stop_pullers(self) -> None:
        for puller in self._pullers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(puller.stop(), self._stop_left())
        self._pullers.clear()

    async def _end_loops(self) -> None:
        # Under the write lock no batch is between its apply and its commit.
        acquired = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._write.acquire(), self._stop_left())
            acquired = True
        try:
            await _cancel(self._loops, self._stop_left())
        finally:
            if acquired:
                self._write.release()

    async def _release(self) -> None:
        """Close everything `start` opened, in any state it got to."""
        await self._stop_pullers()
        await _cancel(self._loops, self._stop_left())
        self._loops.clear()
        await _cancel(self._spawned, self._stop_left())
        if self._relay_task is not None:
            await _cancel([self._relay_task], self._stop_left())
            self._relay_task = None
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), self._stop_left())
            except Exception:
                with contextlib.suppress(Exception):
                    await self.nc.close()
        if self.eventlog is not None:
            await self.eventlog.close()
            self.eventlog = None

    async def run_forever(self) -> None:
        """Start, serve until SIGINT/SIGTERM, stop cleanly (shared/lifecycle.py: a signal is
        taken in every state, waiting for the bus included; the process ends within 5 s).

        A database that cannot be opened (another copy holds it, or it is unreadable) ends
        the process with one line naming the file, and exit status 1. So does a consumer that
        failed unexpectedly (after a clean stop): a supervisor restarts the service, whose
        replay is the safe way back.
        """
        lifecycle.on_signals(self.name, self._stopping.set)
        starting = asyncio.ensure_future(self.start())
        stopped = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not starting.done():  # a signal while it replays or waits for its bus
            self._stop_by = time.monotonic() + STOP_S
            starting.cancel()  # `start` gives back what it took
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        try:
            starting.result()
        except EventLogError as exc:
            raise SystemExit(f"cumulus {self.name}: {exc.message}") from None
        except Unavailable as exc:  # the bus did not come (nats.startup_timeout)
            raise SystemExit(f"cumulus {self.name}: {exc.message}") from None
        except bus.CONNECTION_LOST as exc:  # the bus went away while it started
            raise SystemExit(
                f"cumulus {self.name}: the bus went away while it started ({exc!r}); "
                "a restart tries again"
            ) from None
        await self._stopping.wait()
        await self.stop()
        if self.exit_message:
            raise SystemExit(f"cumulus {self.name}: {self.exit_message}")
        if self.failure is not None:
            raise SystemExit(
                f"cumulus {self.name}: stopped after an unexpected error: {self.failure!r}"
            )

    def end(self, message: str) -> None:
        """Stop this service for good, now (a superseded scheduler): `run_forever` exits 1
        with `message`, and a supervisor's restart comes back the safe way (replay)."""
        if not self.exit_message:
            log.error(message, extra={"fields": {"service": self.name}})
            self.exit_message = message
        self._stopping.set()

    async def set_log_aside(self, suffix: str) -> Path:
        """Move this service's SQLite file (and its WAL) aside as `<file>.<suffix>` and start
        from an empty log: the state afresh, nothing tracked (consumers from the stream's
        start), no outbox. Only before the outbox is published (`after_connect`)."""
        assert self.eventlog is not None
        await self.eventlog.close()
        aside = self.db_path.with_name(f"{self.db_path.name}.{suffix}")
        for ending in ("", "-wal", "-shm"):
            source = self.db_path.with_name(self.db_path.name + ending)
            if source.exists():
                source.rename(aside.with_name(aside.name + ending))
        self.eventlog = await EventLog.open(self.db_path)
        self.eventlog.on_write = EVENTLOG_TRANSACTIONS.labels(self.name).inc
        self.reset_state()
        self.position = self._snapshot_at = 0
        await self._replay()
        return aside

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
        """State = the latest snapshot, then every logged event after it."""
        assert self.eventlog is not None
        after = 0
        if (latest := await self.eventlog.latest_snapshot()) is not None:
            after, data = latest
            self.restore(data)
            self.position = self._snapshot_at = after
        count = 0
        async for position, data in self.eventlog.replay(after=after):
            self.apply(self.decode(data))
            self.position = position
            count += 1
        self._tracked = await self.eventlog.tracking()
        log.info(
            "replayed event log",
            extra={"fields": {"service": self.name, "snapshot": after, "events": count}},
        )

    async def _rebuild(self) -> None:
        """Put the state back to what the log holds (after a half-applied event or a commit
        that failed): the state afresh from `new_state`, then replay."""
        self.reset_state()
        self.position = self._snapshot_at = 0
        await self._replay()
        # What was applied but never logged (heartbeats: `volatile`) is gone from the state:
        # silence counts afresh, as after a restart.
        self.hearing_since = time.time()

    # -- consuming -------------------------------------------------------------------------

    async def _consume(self, spec: ConsumerSpec, puller: bus.Puller) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await puller.next_batch()
                taken, lost = self._until_gap(spec.durable, msgs)
                if taken:
                    await self._handle_batch(spec.durable, taken)
                if lost:
                    await self._recover_gap(spec, puller)
            except asyncio.CancelledError:
                raise
            except _Stopping:
                return
            except Exception as exc:
                # State may be ahead of the log now: only a restart (replay) is safe.
                log.exception("consumer failed; stopping the service for a clean replay")
                self.failure = exc
                self._stopping.set()
                raise

    def _until_gap(self, consumer: str, msgs: list[Msg]) -> tuple[list[Msg], bool]:
        """The deliveries of `msgs` before the first one that skips a consumer sequence, and
        whether one did. A skipped number is a delivery lost on the way (the consumer's
        leader died with it in flight): the consumer being AckAll, acking anything after it
        would acknowledge it unseen, so nothing after it is applied or acked."""
        last = self._delivered.get(consumer, 0)
        for index, msg in enumerate(msgs):
            seq = bus.consumer_seq(msg)
            if seq > last + 1:
                self._delivered[consumer] = last
                return msgs[:index], True
            last = max(last, seq)
        self._delivered[consumer] = last
        return msgs, False

    async def _recover_gap(self, spec: ConsumerSpec, puller: bus.Puller) -> None:
        """Make the consumer anew from the first sequence after the last one applied, so the
        lost delivery comes again (what was applied is skipped by its stream sequence)."""
        log.warning(
            "a delivery never arrived; consumer made anew from the last applied event",
            extra={
                "fields": {
                    "service": self.name,
                    "consumer": spec.durable,
                    "after": self._tracked.get(spec.durable, 0),
                }
            },
        )
        CONSUMER_GAPS.labels(self.name).inc()
        await self._make_consumer(spec)
        await puller.restart()

    async def _handle_batch(self, consumer: str, msgs: list[Msg]) -> None:
        poison: dict[int, str] = {}
        while True:
            async with self._write:
                try:
                    batch, last = self._build(consumer, msgs, poison)
                except _Poison as exc:
                    poison[exc.seq] = exc.error
                    await self._rebuild()
                    continue
                if await self._try_commit(batch):
                    self._tracked[consumer] = last
                    self._progress.set()
                    self._progress = asyncio.Event()
                    for _ in batch.dead:
                        DEAD_LETTERS.labels(self.name).inc()
                    await self._maybe_snapshot()
                    break
            if not await self._paused_wait():
                raise _Stopping
        self._resumed()
        await bus.ack_all(msgs[-1])
        self._reconcile_wanted.set()

    def _build(self, consumer: str, msgs: list[Msg], poison: dict[int, str]) -> tuple[Batch, int]:
        """Step every new message of `msgs` into one batch (those in `poison` set aside)."""
        batch = Batch()
        last = self._tracked.get(consumer, 0)
        for msg in msgs:
            seq = bus.stream_seq(msg)
            if seq <= last:
                continue
            last = seq
            if seq in poison:
                self._set_aside(batch, consumer, seq, msg, poison[seq])
            elif not self.ignore(msg.subject):
                self._take(batch, consumer, seq, msg)
        batch.tracking[consumer] = last
        return batch, last

    async def _try_commit(self, batch: Batch) -> bool:
        """Commit `batch`; if the log refuses it, put the state back as the log has it, note
        the pause, and return False (the caller retries after `_paused_wait`)."""
        try:
            await self._commit(batch)
        except EventLogError as exc:
            if not self.paused:
                log.error(
                    "event log refuses writes; consumption paused until it takes them again",
                    extra={"fields": {"service": self.name, "error": exc.message}},
                )
            self.paused = True
            CONSUMPTION_PAUSED.labels(self.name).set(1)
            await self._rebuild()
            return False
        return True

    async def _reconnected(self) -> None:
        """The bus is back: what was published meanwhile (heartbeats) could not reach us."""
        self.hearing_since = time.time()

    async def _paused_wait(self) -> bool:
        """Wait before retrying a write the log refused; False if the service stops meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._pause_backoff)
        self._pause_backoff = min(self._pause_backoff * 2, PAUSE_MAX_S)
        return not self._stopping.is_set()

    def _resumed(self) -> None:
        if self.paused:
            log.warning(
                "event log takes writes again; consumption resumed",
                extra={"fields": {"service": self.name}},
            )
            self.paused = False
            self.hearing_since = time.time()
            CONSUMPTION_PAUSED.labels(self.name).set(0)
        self._pause_backoff = PAUSE_FIRST_S

    async def _maybe_snapshot(self) -> None:
        """Under the write lock, after a commit: snapshot every `snapshot_events` events."""
        every = self.config.retention.snapshot_events
        if self.eventlog is None or self.position - self._snapshot_at < every:
            return
        self._snapshot_at = self.position  # also when this service takes none
        started = time.monotonic()
        self.compact(time.time())
        data = self.snapshot()
        if data is None:
            return
        try:
            await self.eventlog.save_snapshot(
                self.position, data, self.config.retention.dead_letters
            )
        except EventLogError as exc:  # the log keeps its rows; the next interval tries again
            log.warning(
                "snapshot not saved", extra={"fields": {"service": self.name, "error": exc.message}}
            )
            return
        SNAPSHOTS.labels(self.name).inc()
        log.info(
            "snapshot taken",
            extra={
                "fields": {
                    "service": self.name,
                    "position": self.position,
                    "bytes": len(data),
                    "ms": round((time.monotonic() - started) * 1000, 1),
                }
            },
        )

    def _take(self, batch: Batch, consumer: str, seq: int, msg: Msg) -> None:
        """Decode, step and stage one consumed message (or set it aside; _Poison if it
        cannot be applied)."""
        try:
            event = self.decode(msg.data)
        except MalformedEvent as exc:
            self._set_aside(batch, consumer, seq, msg, str(exc))
            return
        if reason := trust.disagreement(msg.subject, event):
            self._set_aside(batch, consumer, seq, msg, f"not believed: {reason}")
            return
        if events.stale(event, self.fence()):
            FENCED.labels(self.name).inc()
            log.warning(
                "fenced: a decision of a superseded scheduler",
                extra={
                    "fields": {
                        "service": self.name,
                        "subject": msg.subject,
                        "epoch": events.epoch_of(event),
                        "known_epoch": self.fence(),
                    }
                },
            )
            return
        if self.skip(event):
            return
        if not self.volatile(event):
            batch.log.append(msg.data)
        # No span per consumed event: each service records the spans of its work on a job
        # where it decides or acts (shared/tracing.py), never while it replays.
        self._stage(self._apply_or_poison(event, msg.subject, seq), batch)

    def _apply_or_poison(self, event: Any, subject: str, seq: int) -> list[tuple[Event, bytes]]:
        """`_step(event)`; _Poison if its apply or decide raises."""
        try:
            return self._step(event)
        except Exception as exc:
            log.exception(
                "event cannot be applied; setting it aside",
                extra={"fields": {"service": self.name, "subject": subject, "seq": seq}},
            )
            raise _Poison(seq, f"cannot apply: {type(exc).__name__}: {exc}"[:2000]) from exc

    def _set_aside(self, batch: Batch, consumer: str, seq: int, msg: Msg, error: str) -> None:
        log.warning(
            "message set aside",
            extra={
                "fields": {"service": self.name, "subject": msg.subject, "seq": seq, "error": error}
            },
        )
        batch.dead.append((consumer, seq, msg.subject, msg.data, error))
        batch.outbox.append(
            OutboxRow(subjects.dead(self.name), f"dead-{self.name}-{consumer}-{seq}", "", msg.data)
        )

    def _chain(self, first: Iterable[Event]) -> list[tuple[Event, bytes]]:
        """Apply each of `first` and what is decided on it, depth first; return them in order,
        encoded. One too large for the bus is replaced before it is applied (`_too_large`)."""
        out: list[tuple[Event, bytes]] = []
        pending = deque(first)
        limit = self.max_event_bytes
        while pending:
            new = pending.popleft()
            data = self.encode(new)
            if len(data) > limit:
                new = self._too_large(new, len(data), limit)
                data = self.encode(new)
            self.apply(new)
            out.append((new, data))
            pending.extendleft(reversed(self.decide(new)))
        return out

    @property
    def max_event_bytes(self) -> int:
        """The largest event the bus carries (its max_payload, less room for headers)."""
        return bus.event_limit(self.nc)

    def _too_large(self, event: Event, size: int, limit: int) -> Event:
        """What this service records instead of `event`, which the bus would refuse: the
        failure of its job (the job fails, the queue moves on). Anything else is refused."""
        what = f"{type(event).__name__} of {size} bytes is over the bus's limit of {limit}"
        log.error("event too large for the bus", extra={"fields": {"service": self.name}})
        if not isinstance(event, events.JobEvent):
            raise ResourceExhausted(f"Cannot record a {what}")
        return events.JobFailed(
            job_id=event.job_id,
            user=event.user,
            # A worker fails a job under its own token; the control plane under none.
            worker_id="" if self.creates_streams else event.worker_id,
            code="RESOURCE_EXHAUSTED",
            message=(
                f"Cumulus could not record this job's {event.name} event: a {what}. "
                "Make what the job carries smaller (env, requirements, the result)"
            ),
            trace=event.trace,
        )

    def _stage(self, decided: Iterable[tuple[Event, bytes]], batch: Batch) -> None:
        """Log and queue for publishing events already applied (with their encoding)."""
        for event, data in decided:
            batch.log.append(data)
            batch.outbox.append(OutboxRow(bus.subject_of(event), event.event_id, event.trace, data))

    async def _commit(self, batch: Batch) -> None:
        assert self.eventlog is not None
        # The transaction runs whole in SQLite's thread: a caller cancelled meanwhile (a stop)
        # does not stop it, so it is seen through (its rows handed to the relay, as the state
        # already holds the batch) before the cancellation goes on.
        commit = asyncio.ensure_future(self.eventlog.commit(batch))
        try:
            rows = await asyncio.shield(commit)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._committed(batch, await commit)
            raise
        self._committed(batch, rows)

    def _committed(self, batch: Batch, rows: list[OutboxRow]) -> None:
        self.position += len(batch.log)
        if self._relay is not None:
            self._relay.put(rows)

    async def _watch_lag(self) -> None:
        """Every LAG_EVERY_S, each durable consumer's lag: what the server holds for it that
        this service has not applied (pending plus delivered and unacknowledged). One small
        request per consumer; only with metrics on."""
        assert self.js is not None
        while True:
            for spec in self.consumers():
                try:
                    info = await self.js.consumer_info(spec.stream, self.consumer_name(spec))
                except Exception:  # the bus away, or no right to ask: the last value stays
                    continue
                self.lag[spec.durable] = (info.num_pending or 0) + (info.num_ack_pending or 0)
            await asyncio.sleep(LAG_EVERY_S)

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


async def _cancel(tasks: Collection[asyncio.Task[Any]], within: float = STOP_STEP_S) -> None:
    """Cancel `tasks` and wait for them, for `within` seconds at most."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if pending:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), within)
