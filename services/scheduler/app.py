"""The scheduler: worker inventory, fractional placement, the queue, retries, freeing capacity.

One active scheduler, any number of standbys (docs/scheduler.md, high availability). Every
instance consumes the job events that change capacity, the WORKERS stream and the decisions
themselves (`queued`, `scheduled`, `revoked`, the election markers), so a standby's state
follows the active one's. Only the holder of the lease (lease.py) decides (handlers.py, pure):

1. A standby campaigns for the lease. Once it holds it (epoch N) and its own outbox is
   published, it publishes its election marker (`SchedulerElected`, `jobs._._._.elected`)
   and follows the stream until it has applied that marker: whatever came before is fact.
2. Then it leads: it logs `Leading(N)`, takes the decisions its predecessor may have owed
   (handlers.promotion, then `schedule`), starts liveness and the Swarm watch and serves
   `cumulus.scheduler.admit` (can this ever fit?), `.workers` (devices with allocated and free
   share), `.state` (the allocation state and the log position it was read at) and `.queue`
   (a waiting job's live position and reason). Every decision carries the epoch N; its own
   decisions coming back from the stream are skipped (applied when taken).
   From then on its job consumer leaves the decisions out (`_stop_reading_decisions`): they
   are its own, or fenced, or a later leader's after that leader's marker.
3. It decides only while its lease is valid; a lapsed lease is resumed only by renewing it
   unchanged (then the owed decisions are taken). Finding another holder (the lease, a later
   marker or decision) it stops deciding at once and ends with exit status 1; a restart follows.

Every instance serves `cumulus.consumers.<W>.create` (workers' consumers) and
`cumulus.scheduler.role.<holder>` (which role it has now). A scheduler whose log shows it led
an epoch older than the lease's sets that log aside at start and rebuilds from the streams:
it may hold decisions the others never saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
import nats.micro

from cumulus_core.amounts import TENTHS_PER_GPU, format_amount
from services.scheduler import snapshot as snapshots
from services.scheduler import swarm
from services.scheduler.handlers import (
    Policy,
    admission_error,
    decide,
    promotion,
    retry_due,
    schedule,
    waiting_reason,
)
from services.scheduler.inventory import WorkerState
from services.scheduler.lease import Lease, LeaseValue, Superseded
from services.scheduler.state import JobState, Leading, SchedulerState
from services.scheduler.state import decode as decode_record
from shared import api, bus, metrics, subjects, tracing
from shared import events as ev
from shared.config import Config
from shared.errors import NotFound, Unavailable
from shared.policy import share_limits
from shared.service import ConsumerSpec, EventService
from shared.swarm_nodes import list_nodes
from shared.telemetry import (
    ACTIVE_WORKERS,
    ASSIGNMENT_DURATION,
    GPU_MEMORY_USED,
    QUEUE_WAIT,
    WORKER_ASSIGNMENTS,
)
from shared.views import DeviceUsage, SwarmNode, WorkerInfo, WorkerList

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[Any]]

# cumulus_worker_assignments_total by outcome, looked up once (`labels` costs per call).
_ASSIGNED = WORKER_ASSIGNMENTS.labels("success")
_QUEUED = WORKER_ASSIGNMENTS.labels("queued")
_NO_WORKERS = WORKER_ASSIGNMENTS.labels("no_workers")
_INSUFFICIENT = WORKER_ASSIGNMENTS.labels("insufficient_resources")

JOB_EVENTS = [
    "submitted",
    "partition_ready",
    "started",
    "cancel_requested",
    "partition_failed",
    "partition_released",
    "attempt_failed",
    *ev.TERMINAL_NAMES,
]
DECISIONS = ["queued", "scheduled", "revoked"]
"""The leader's decisions a standby follows (its `failed`/`cancelled` are among JOB_EVENTS,
its `lost` and `node` on the WORKERS stream). The leader itself stops reading them."""
JOBS_CONSUMER = "scheduler-jobs"
PAGE_HEADROOM = 1024
"""Room kept in a `workers` page for its envelope (`queued`, `next`)."""
MARKER_WAIT_S = 30.0
RETRY_TICK_S = 0.25
"""How often the leader looks for retries whose backoff is over."""
MAX_RETRIES_PER_TICK = 100
"""Retries placed again in one look at most (the rest at the next)."""
"""How long a new leader waits to read its own election marker back before it gives up."""


class Scheduler(EventService[SchedulerState]):
    name = "scheduler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.startup_allocation: dict[str, Any] = {}
        self.startup_position = 0
        self._memory_gauges: dict[tuple[str, int], Any] = {}
        self.ended: dict[str, float] = {}
        """Job id -> when a compaction first found it over (services/scheduler/snapshot.py)."""
        self._micro: Any = None
        self._group: Any = None
        self._holder = ""
        self.lease: Lease | None = None
        self.leading = 0
        """The epoch this instance leads with (its marker applied); 0: it follows."""
        self._electing = 0
        self._elected = asyncio.Event()
        self._loops_started = False
        sched = self.config.scheduler
        max_share, user_max_share = share_limits(self.config)
        self.policy = Policy(
            max_attempts=sched.max_attempts,
            queue_limit=sched.queue_limit,
            placement=sched.placement,
            backfill=sched.backfill,
            reserve_after_s=sched.reserve_after_s,
            max_share=max_share,
            user_max_share=user_max_share,
        )

    @property
    def holder(self) -> str:
        """This instance's name in the lease (config `instance`, else made once and kept)."""
        if not self._holder:
            self._holder = holder_name(self.config)
        return self._holder

    def new_state(self) -> SchedulerState:
        return SchedulerState()

    # Retention (shared/service.py): snapshots, and jobs over for a while leave memory.
    def snapshot(self) -> bytes | None:
        return snapshots.encode(self.state, self.ended)

    def restore(self, data: bytes) -> None:
        self.state, self.ended = snapshots.decode(data)

    def compact(self, now: float) -> None:
        snapshots.compact(self.state, self.ended, now, self.config.retention.forget_after_s)

    def consumers(self) -> list[ConsumerSpec]:
        jobs = [*subjects.job_events(*JOB_EVENTS, *DECISIONS), subjects.ELECTED]
        return [
            ConsumerSpec(subjects.WORKERS_STREAM, "scheduler-workers", ["workers.>"]),
            ConsumerSpec(subjects.JOBS_STREAM, JOBS_CONSUMER, jobs),
        ]

    async def _stop_reading_decisions(self) -> None:
        """Once leading, narrow the job consumer to what is news to a leader: the decisions
        on the stream are its own from here on (applied when taken, `skip`), a superseded
        scheduler's (fenced) or a later leader's, which come after that leader's marker, and
        markers stay in. Half of what a burst brings in is the leader's own `scheduled`
        coming back. A restart creates the consumer anew with every filter (it may follow)."""
        assert self.js is not None
        name = self.consumer_name(ConsumerSpec(subjects.JOBS_STREAM, JOBS_CONSUMER, []))
        try:
            info = await self.js.consumer_info(subjects.JOBS_STREAM, name)
            config = dataclasses.replace(
                info.config,
                filter_subjects=[*subjects.job_events(*JOB_EVENTS), subjects.ELECTED],
                filter_subject=None,
            )
            await self.js.add_consumer(subjects.JOBS_STREAM, config=config)
        except Exception as exc:  # only slower: it reads and skips its own decisions
            log.warning(
                "could not narrow the job consumer to what a leader needs",
                extra={"fields": {"error": repr(exc)}},
            )

    def decode(self, data: bytes) -> Any:
        return decode_record(data)

    def fence(self) -> int:
        return self.state.epoch

    def skip(self, event: Any) -> bool:
        """Its own decisions, applied when taken: a repeat could undo what came after them
        (a `queued` arriving after the job was placed)."""
        return isinstance(event, ev.SCHEDULER_ONLY) and ev.epoch_of(event) in self.state.led

    @property
    def deciding(self) -> bool:
        """This instance leads and its lease is valid now. One never connected (tests that
        drive `step` without a bus) decides as a lone leader would."""
        if self.exit_message:
            return False
        if self.lease is None:
            return True
        return self.leading > 0 and self.lease.valid()

    def role(self) -> str:
        if self.exit_message:
            return "superseded"
        if self.leading:
            return "leader" if self.deciding else "lapsed"
        return "electing" if self._electing else "follower"

    def apply(self, event: Any) -> None:
        self._notice(event)
        # What an allocation change touches, read before it is applied: a terminal event
        # may come from the scheduler itself ("_"), and the job's devices are gone after.
        touched: tuple[str, list[int] | None] | None = None
        if isinstance(event, ev.WorkerSelected):
            touched = (event.worker_id, event.devices)
        elif isinstance(event, ev.Terminal | ev.PartitionFailed | ev.PlacementRevoked) and (
            job := self.state.jobs.get(event.job_id)
        ):
            touched = (job.worker_id, list(job.devices))
        elif isinstance(event, ev.PartitionReleased):
            touched = (event.worker_id, None)
        self.state.apply(event)
        if touched is not None and touched[0]:
            self._gauge_memory(*touched)

    def _notice(self, event: Any) -> None:
        """What an event says of the election, before it is applied: our own marker read
        back (we may lead), or a later epoch than ours (we are superseded)."""
        mine = self.leading or self._electing
        if isinstance(event, ev.SchedulerElected):
            if event.holder == self.holder and event.epoch == self._electing:
                self._elected.set()
            elif mine and event.epoch > mine:
                self._superseded(LeaseValue(holder=event.holder, epoch=event.epoch))
        elif mine and isinstance(event, ev.SCHEDULER_ONLY) and ev.epoch_of(event) > mine:
            self._superseded(LeaseValue(holder="?", epoch=ev.epoch_of(event)))

    def _superseded(self, now: LeaseValue) -> None:
        """Stop deciding at once, and the process (exit 1): a restart comes back a follower."""
        mine = self.leading or self._electing
        self.leading = self._electing = 0
        self.end(
            f"superseded: scheduler {now.holder} holds the lease at epoch {now.epoch} "
            f"(this one, {self.holder}, had epoch {mine}); stopping, so that a restart "
            "follows it"
        )

    def stamp(self, out: list[ev.Event]) -> list[ev.Event]:
        """Every decision carries the epoch it was taken in (the fence)."""
        return [ev.stamped(new, self.leading) for new in out]

    def decide(self, event: Any) -> list[ev.Event]:
        if not self.deciding or ev.stale(event, self.state.epoch):
            return []
        started = time.perf_counter()
        out = self.stamp(decide(event, self.state, self.policy))
        for new in out:
            if isinstance(new, ev.WorkerSelected):
                _ASSIGNED.inc()
                ASSIGNMENT_DURATION.observe(time.perf_counter() - started)
                job = self.state.jobs.get(new.job_id)
                if job is not None:
                    metrics.observe(QUEUE_WAIT, new.ts - job.submitted_at, job.trace)
                if job is not None and tracing.enabled():
                    _trace_placement(job, new, event, time.perf_counter() - started)
            elif isinstance(new, ev.JobQueued):
                _QUEUED.inc()
            elif isinstance(new, ev.JobFailed) and new.code == "UNAVAILABLE":
                _NO_WORKERS.inc()
            elif isinstance(new, ev.JobFailed) and new.code == "RESOURCE_EXHAUSTED":
                _INSUFFICIENT.inc()
        if isinstance(event, ev.WorkerEvent):
            ACTIVE_WORKERS.set(len(self.state.capacity.run_of))  # O(1): per heartbeat
        return out

    def gauges(self) -> Iterable[metrics.GaugeValue]:
        """The queue and each live worker's devices, in tenths (shared/metrics.py); only
        the leader's, so that a standby's copy does not count twice."""
        yield from super().gauges()
        if not self.leading:
            return
        state = self.state
        yield ("cumulus_queue_length", (), len(state.queue))
        for worker in list(state.workers.values()):
            if not worker.alive:
                continue
            for d in list(worker.devices):
                used = sum(list(d.allocated.values()))
                labels = (worker.worker_id, str(d.index))
                yield ("cumulus_gpu_tenths_allocated", labels, used)
                yield ("cumulus_gpu_tenths_free", labels, TENTHS_PER_GPU - used)

    def _gauge_memory(self, worker_id: str, indexes: list[int] | None) -> None:
        """cumulus_gpu_memory_used_bytes: the share of each device's memory allocated, for
        the devices an event changed (`indexes`; None: all of the worker's). The gauge's
        children are looked up once (`labels` costs more than the rest)."""
        worker = self.state.workers.get(worker_id)
        if worker is None:
            return
        for d in worker.devices:
            if indexes is None or d.index in indexes:
                key = (worker_id, d.index)
                child = self._memory_gauges.get(key)
                if child is None:
                    child = self._memory_gauges[key] = GPU_MEMORY_USED.labels(
                        f"{worker_id}/{d.index}"
                    )
                child.set(d.memory_bytes * d.used // 10)

    def volatile(self, event: Any) -> bool:
        """Heartbeats of live workers only move a clock; one that revives a worker counts."""
        if not isinstance(event, ev.WorkerHeartbeat):
            return False
        worker = self.state.workers.get(event.worker_id)
        return worker is None or worker.alive

    async def after_connect(self) -> None:
        """Open the lease; a log that led an epoch older than the lease's is set aside."""
        assert self.js is not None
        self.lease = Lease(
            self.js, self.holder, self.config.scheduler.lease_ttl_s, self.config.nats.replicas
        )
        await self.lease.open()
        _, current = await self.lease.read()
        led = max(self.state.led, default=0)
        if led and current is not None and current.epoch > led:
            aside = await self.set_log_aside(f"superseded-{int(time.time())}")
            log.warning(
                "this scheduler's log led an epoch another scheduler's superseded: set aside, "
                "rebuilding from the streams",
                extra={"fields": {"led": led, "lease": current.epoch, "aside": str(aside)}},
            )

    async def on_start(self) -> None:
        assert self.nc is not None
        self.startup_allocation = self.state.allocation()
        self.startup_position = self.position
        self._micro = await nats.micro.add_service(
            self.nc,
            name="cumulus-scheduler",
            version="0.1.0",
            description="Placement and worker inventory",
        )
        self._group = self._micro.add_group(name="cumulus.scheduler")
        await self._micro.add_endpoint(
            name="consumers",
            subject=subjects.consumer_request("*"),
            handler=api.worker_endpoint(self.worker_consumer),
        )
        if subjects.valid_token(self.holder):
            await self._micro.add_endpoint(
                name="role",
                subject=f"cumulus.scheduler.role.{self.holder}",
                handler=api.endpoint(self.role_info),
            )
        self.spawn(self._lead(), name="lead")

    async def role_info(self, data: bytes) -> Any:
        """Which role this instance has now, and the epochs it knows."""
        return {
            "holder": self.holder,
            "role": self.role(),
            "epoch": self.leading or self._electing,
            "known_epoch": self.state.epoch,
        }

    async def _lead(self) -> None:
        """Campaign, publish the marker, follow the stream up to it, then lead. Anything
        that goes wrong on the way ends the process (a restart takes its own lease back)."""
        try:
            await self._take_the_lead()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("could not take the lead")
            self.end(f"could not take the lead: {type(exc).__name__}: {exc}; restarting")

    async def _publish_marker(self, marker: ev.SchedulerElected) -> None:
        """Publish the election marker, retrying while the bus is away (bounded)."""
        assert self.js is not None
        deadline = time.monotonic() + MARKER_WAIT_S
        while True:
            try:
                await bus.publish(self.js, marker)
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _take_the_lead(self) -> None:
        assert self.lease is not None
        epoch = await self.lease.campaign(lambda: self.state.epoch)
        self.spawn(self._keep(), name="lease")
        # What this log decided before must reach the stream before the new epoch's marker,
        # or everyone would fence it (an earlier epoch's, behind the marker).
        while not await self.published(self.lease.ttl_s):
            log.warning("waiting for the outbox to be published before the election marker")
        self._electing = epoch
        await self._publish_marker(ev.SchedulerElected(epoch=epoch, holder=self.holder))
        try:
            await asyncio.wait_for(self._elected.wait(), MARKER_WAIT_S)
        except TimeoutError:
            self.end(
                f"the election marker of epoch {epoch} did not come back within "
                f"{MARKER_WAIT_S:g} s; restarting"
            )
            return
        await self.emit([], [Leading(epoch=epoch, holder=self.holder)])
        self.leading, self._electing = epoch, 0
        self.hearing_since = time.time()
        # In the background: a cluster with a server down can take seconds over it.
        self.spawn(self._stop_reading_decisions(), name="narrow-consumer")
        await self._catch_up()
        await self._start_leading()
        log.info(
            "scheduler leading",
            extra={"fields": {"holder": self.holder, "epoch": epoch}},
        )

    async def _keep(self) -> None:
        assert self.lease is not None
        try:
            await self.lease.keep(self._regained)
        except Superseded as exc:
            self._superseded(exc.value)

    def _regained(self) -> None:
        if self.leading:
            self.spawn(self._catch_up(), name="catch-up")

    async def _catch_up(self) -> None:
        """The decisions owed to what was applied while nobody (or not we) decided."""
        if not self.deciding:
            return
        now = time.time()
        await self.emit_decided(
            lambda: (
                self.stamp(promotion(self.state, self.policy, now, self.holder))
                if self.deciding
                else []
            )
        )
        await self.emit_decided(
            lambda: (
                self.stamp(schedule(self.state, self.policy, time.time())) if self.deciding else []
            )
        )

    async def _start_leading(self) -> None:
        """Liveness, the Swarm watch and the leader's requests (once)."""
        if self._loops_started:
            return
        self._loops_started = True
        # Heartbeats are not logged: after a restart every live worker gets a full grace period.
        now = time.time()
        for worker in self.state.workers.values():
            worker.last_seen = max(worker.last_seen, now)
        self.spawn(self._liveness(), name="liveness")
        self.spawn(self._retries(), name="retries")
        if self.config.scheduler.swarm_nodes:
            self.spawn(self._swarm(), name="swarm")
        for op, handler in (
            ("admit", self.admit),
            ("workers", self.workers),
            ("state", self.allocation),
            ("queue", self.queue_position),
        ):
            await self._group.add_endpoint(name=op, handler=api.endpoint(self._reading(handler)))

    async def worker_consumer(self, worker_id: str, data: bytes) -> Any:
        """Create a worker's durable consumer for it, under its own subjects only (a worker's
        identity may not create consumers: shared/auth.py)."""
        assert self.js is not None
        req = api.decode_request(data, bus.ConsumerRequest)
        await bus.create_worker_consumer(self.js, worker_id, req)
        return {"durable": req.durable}

    def _reading(self, handler: Handler) -> Handler:
        """`handler` run under `reading()`: every request reads state as of a commit."""

        async def read(data: bytes) -> Any:
            async with self.reading():
                return await handler(data)

        return read

    async def on_stop(self) -> None:
        if self._micro is not None:
            await self._micro.stop()
        if self.lease is not None and self.leading and not self.exit_message:
            # Our decisions first, then the lease: a standby takes over at once.
            await self.published(2.0)
            await self.lease.release()

    async def _liveness(self) -> None:
        """Declare lost every worker silent for heartbeat_misses intervals.

        Silence counts only from when this scheduler could hear: its start, and the end of its
        last pause (a full disk: the heartbeats it could not record are not the workers'
        fault). A decision the bus or the log refuses is dropped, and silence counts afresh from
        then: a bus that could not store the verdict (a NATS cluster electing a stream leader,
        a restart) could not store the heartbeats either."""
        while True:
            lost = [ev.stamped(e, self.leading) for e in self.silent(time.time())]
            if lost and not self.paused and self.deciding:
                try:
                    await self._declare(lost)
                except Unavailable:
                    self.hearing_since = time.time()
                    log.warning(
                        "could not declare silent workers lost: the bus did not store it; "
                        "their silence counts afresh",
                        extra={"fields": {"workers": [getattr(e, "worker_id", "") for e in lost]}},
                    )
            interval = min((w.heartbeat_s for w in self.state.workers.values()), default=5.0)
            await asyncio.sleep(max(0.1, min(1.0, interval / 2)))

    async def _retries(self) -> None:
        """Place again each job whose retry's backoff is over (handlers.retry_due), one
        decision at a time, against the state as it is when applied."""
        while True:
            await asyncio.sleep(RETRY_TICK_S)
            for _ in range(MAX_RETRIES_PER_TICK):
                if self.paused or not self.deciding:
                    break
                now = time.time()
                if not retry_due(self.state, self.policy, now):
                    break
                try:
                    await self.emit_decided(
                        lambda: self.stamp(retry_due(self.state, self.policy, now))  # noqa: B023
                    )
                except Unavailable as exc:  # stopping, or the log refuses writes: next tick
                    log.warning(
                        "could not place a retry now", extra={"fields": {"error": str(exc)}}
                    )
                    break

    async def _declare(self, lost: list[ev.Event]) -> None:
        """Take the `lost` decisions only if the bus stores them: a bus that cannot store
        (its disk full, a restart) could not store the heartbeats either, and silence then says
        nothing about the workers. Published first, then applied (the stream's copy comes back
        as a repeat; the outbox's is a duplicate)."""
        assert self.js is not None
        for event in lost:
            await bus.publish(self.js, event)
        await self.emit(lost, wait=False)

    def silent(self, now: float) -> list[ev.WorkerLost]:
        """A `lost` for every live worker silent for heartbeat_misses intervals since the
        later of its last heartbeat and `hearing_since`."""
        misses = self.config.scheduler.heartbeat_misses
        return [
            ev.WorkerLost(
                worker_id=w.worker_id,
                reason=f"no heartbeat for {now - w.last_seen:.0f} s "
                f"(expected every {w.heartbeat_s:g} s)",
            )
            for w in self.state.workers.values()
            if w.alive and now - max(w.last_seen, self.hearing_since) > misses * w.heartbeat_s
        ]

    async def _swarm(self) -> None:
        """Follow the Swarm nodes' state, availability and labels (events on change)."""
        while True:
            observed = swarm.observations(await list_nodes(), self.state)
            if observed and self.deciding:
                await self.emit(observed)
            await asyncio.sleep(self.config.scheduler.swarm_poll_s)

    async def admit(self, data: bytes) -> Any:
        query = api.decode_request(data, api.SchedulerQuery)
        error = admission_error(self.state, query.gpu_tenths, self.policy)
        if error is not None:
            raise error
        return {"ok": True, "queued": len(self.state.queue)}

    async def queue_position(self, data: bytes) -> Any:
        ref = api.decode_request(data, api.JobRef)
        job = self.state.jobs.get(ref.job_id)
        if job is None:
            raise NotFound(f"Job {ref.job_id} not known to the scheduler")
        position = self.state.queue.position(job.job_id)
        return {
            "job_id": job.job_id,
            "status": job.status,
            "position": position,
            "queued": len(self.state.queue),
            "reason": waiting_reason(self.state, job, self.policy) if position else "",
        }

    async def workers(self, data: bytes) -> Any:
        """A page of the workers, by id: as many as `limit` and one reply carry."""
        assert self.nc is not None
        query = api.decode_request(data, api.WorkersQuery)
        ordered = sorted(w for w in self.state.workers if w > query.after)
        budget = api.reply_budget(self.nc) - PAGE_HEADROOM
        page: list[WorkerInfo] = []
        for worker_id in ordered:
            info = self._worker_info(self.state.workers[worker_id])
            budget -= len(msgspec.json.encode(info)) + 1
            if budget < 0 or (query.limit and len(page) >= query.limit):
                break
            page.append(info)
        more = len(page) < len(ordered)
        return WorkerList(
            workers=page,
            queued=len(self.state.queue),
            next=page[-1].worker_id if more and page else "",
        )

    @staticmethod
    def _worker_info(w: WorkerState) -> WorkerInfo:
        return WorkerInfo(
            worker_id=w.worker_id,
            hostname=w.hostname,
            backend=w.backend,
            status="ready"
            if w.schedulable
            else ("down" if not w.alive else w.node_availability or w.node_state),
            down_reason=w.lost_reason,
            node=SwarmNode(
                id=w.node_id,
                state=w.node_state,
                availability=w.node_availability,
                labels=w.node_labels,
            )
            if w.node_id
            else None,
            last_seen=w.last_seen,
            labels=w.labels,
            devices=[
                DeviceUsage(
                    index=d.index,
                    name=d.name,
                    kind=d.kind,
                    memory_bytes=d.memory_bytes,
                    allocated=format_amount(d.used),
                    free=format_amount(d.free),
                    jobs={j: format_amount(t) for j, t in sorted(d.allocated.items())},
                )
                for d in w.devices
            ],
        )

    async def allocation(self, data: bytes) -> Any:
        """The allocation state and the log position it was read at (under `reading()`)."""
        return {
            "position": self.position,
            "allocation": self.state.allocation(),
            "startup_position": self.startup_position,
            "startup_allocation": self.startup_allocation,
        }


def holder_name(config: Config) -> str:
    """This scheduler's name in the lease: config `instance`, else `<hostname>-<random>`,
    made once and kept in the data directory (`scheduler.holder`), so a restart is the same
    holder and takes its own lease back at once."""
    if config.instance:
        return str(config.instance)
    path = config.data_path / "scheduler.holder"
    with contextlib.suppress(OSError):
        name = path.read_text().strip()
        if subjects.valid_token(name):
            return str(name)
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    name = f"{host.split('.')[0][:40] or 'scheduler'}-{os.urandom(3).hex()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(name + "\n")
    return name


def _trace_placement(job: JobState, placed: ev.WorkerSelected, on: Any, took_s: float) -> None:
    """The job's `queue wait` (from its submission to this decision, with the reason it
    waited) and `placement` (the decision) spans; `job` is as it was before the placement."""
    decided = tracing.now()
    began = decided - int(took_s * 1e9)
    job_attrs = tracing.job_attributes(placed)
    queued = job.status == "queued"
    tracing.record(
        "scheduler queue wait",
        placed.trace,
        tracing.ns(job.submitted_at),
        began,
        attributes={
            **job_attrs,
            "cumulus.queued": queued,
            "cumulus.queue.reason": job.queued_reason if queued else "",
            "cumulus.placed_on": type(on).__name__,
        },
    )
    tracing.record(
        "scheduler placement",
        placed.trace,
        began,
        decided,
        kind="producer",
        attributes={
            **tracing.messaging(bus.subject_of(placed), placed.event_id, "publish"),
            **job_attrs,
            "cumulus.gpu": job.spec.gpu_tenths / 10,
            "cumulus.devices": list(placed.devices),
            "cumulus.tenths": placed.tenths,
            "cumulus.epoch": placed.epoch,
        },
    )
