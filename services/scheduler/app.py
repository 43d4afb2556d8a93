"""The scheduler: worker inventory, fractional placement, the queue, retries, freeing capacity.

One active scheduler. It consumes job events that change capacity and the WORKERS stream,
decides placements (services/scheduler/handlers.py, pure), and answers four requests on the
`cumulus-scheduler` micro service: `cumulus.scheduler.admit` (can this ever fit?),
`cumulus.scheduler.workers` (devices with allocated and free share),
`cumulus.scheduler.state` (the allocation state and the log position it was read at) and
`cumulus.scheduler.queue` (a waiting job's live position and reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.micro

from cumulus_core.amounts import format_amount
from services.scheduler import snapshot as snapshots
from services.scheduler import swarm
from services.scheduler.handlers import Policy, admission_error, decide, waiting_reason
from services.scheduler.state import SchedulerState
from shared import api, bus, subjects
from shared import events as ev
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

Handler = Callable[[bytes], Awaitable[Any]]

JOB_EVENTS = [
    "submitted",
    "partition_ready",
    "started",
    "cancel_requested",
    "partition_failed",
    "partition_released",
    *ev.TERMINAL_NAMES,
]


class Scheduler(EventService[SchedulerState]):
    name = "scheduler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.startup_allocation: dict[str, Any] = {}
        self.startup_position = 0
        self.ended: dict[str, float] = {}
        """Job id -> when a compaction first found it over (services/scheduler/snapshot.py)."""
        self._micro: Any = None
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
        return [
            ConsumerSpec(subjects.WORKERS_STREAM, "scheduler-workers", ["workers.>"]),
            ConsumerSpec(subjects.JOBS_STREAM, "scheduler-jobs", subjects.job_events(*JOB_EVENTS)),
        ]

    def apply(self, event: Any) -> None:
        # A terminal event may come from the scheduler itself ("_"): read the job's worker first.
        job = self.state.jobs.get(getattr(event, "job_id", ""))
        worker_id = job.worker_id if job is not None else ""
        self.state.apply(event)
        if isinstance(event, ev.WorkerSelected | ev.PartitionReleased):
            worker_id = event.worker_id
        if worker_id and isinstance(
            event,
            ev.WorkerSelected
            | ev.Terminal
            | ev.PartitionFailed
            | ev.PlacementRevoked
            | ev.PartitionReleased,
        ):
            self._gauge_memory(worker_id)

    def decide(self, event: Any) -> list[ev.Event]:
        started = time.perf_counter()
        out = decide(event, self.state, self.policy)
        for new in out:
            if isinstance(new, ev.WorkerSelected):
                WORKER_ASSIGNMENTS.labels("success").inc()
                ASSIGNMENT_DURATION.observe(time.perf_counter() - started)
                job = self.state.jobs.get(new.job_id)
                if job is not None:
                    QUEUE_WAIT.observe(max(0.0, new.ts - job.submitted_at))
            elif isinstance(new, ev.JobQueued):
                WORKER_ASSIGNMENTS.labels("queued").inc()
            elif isinstance(new, ev.JobFailed) and new.code == "UNAVAILABLE":
                WORKER_ASSIGNMENTS.labels("no_workers").inc()
            elif isinstance(new, ev.JobFailed) and new.code == "RESOURCE_EXHAUSTED":
                WORKER_ASSIGNMENTS.labels("insufficient_resources").inc()
        if isinstance(event, ev.WorkerEvent):
            ACTIVE_WORKERS.set(len(self.state.live_workers()))
        return out

    def _gauge_memory(self, worker_id: str) -> None:
        """cumulus_gpu_memory_used_bytes: the share of each device's memory allocated."""
        worker = self.state.workers.get(worker_id)
        if worker is not None:
            for d in worker.devices:
                GPU_MEMORY_USED.labels(f"{worker_id}/{d.index}").set(d.memory_bytes * d.used // 10)

    def volatile(self, event: Any) -> bool:
        """Heartbeats of live workers only move a clock; one that revives a worker counts."""
        if not isinstance(event, ev.WorkerHeartbeat):
            return False
        worker = self.state.workers.get(event.worker_id)
        return worker is None or worker.alive

    async def on_start(self) -> None:
        assert self.nc is not None
        self.startup_allocation = self.state.allocation()
        self.startup_position = self.position
        # Heartbeats are not logged: after a restart every live worker gets a full grace period.
        now = time.time()
        for worker in self.state.workers.values():
            worker.last_seen = max(worker.last_seen, now)
        self.spawn(self._liveness(), name="liveness")
        if self.config.scheduler.swarm_nodes:
            self.spawn(self._swarm(), name="swarm")
        self._micro = await nats.micro.add_service(
            self.nc,
            name="cumulus-scheduler",
            version="0.1.0",
            description="Placement and worker inventory",
        )
        group = self._micro.add_group(name="cumulus.scheduler")
        for op, handler in (
            ("admit", self.admit),
            ("workers", self.workers),
            ("state", self.allocation),
            ("queue", self.queue_position),
        ):
            await group.add_endpoint(name=op, handler=api.endpoint(self._reading(handler)))
        await self._micro.add_endpoint(
            name="consumers",
            subject=subjects.consumer_request("*"),
            handler=api.worker_endpoint(self.worker_consumer),
        )

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

    async def _liveness(self) -> None:
        """Declare lost every worker silent for heartbeat_misses intervals.

        Silence counts only from when this scheduler could hear: its start, and the end of its
        last pause (a full disk: the heartbeats it could not record are not the workers'
        fault). A decision the log refuses is dropped, and taken afresh on the next tick."""
        while True:
            lost = self.silent(time.time())
            if lost and not self.paused:
                with contextlib.suppress(Unavailable):
                    await self._declare(lost)
            interval = min((w.heartbeat_s for w in self.state.workers.values()), default=5.0)
            await asyncio.sleep(max(0.1, min(1.0, interval / 2)))

    async def _declare(self, lost: list[ev.WorkerLost]) -> None:
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
            if observed:
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
        return WorkerList(
            workers=[
                WorkerInfo(
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
                for w in sorted(self.state.workers.values(), key=lambda w: w.worker_id)
            ],
            queued=len(self.state.queue),
        )

    async def allocation(self, data: bytes) -> Any:
        """The allocation state and the log position it was read at (under `reading()`)."""
        return {
            "position": self.position,
            "allocation": self.state.allocation(),
            "startup_position": self.startup_position,
            "startup_allocation": self.startup_allocation,
        }
