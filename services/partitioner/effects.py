"""The partitioner's effects: chronos_cli create and release, with retries, for each worker.

Releases start first, and every create waits for the releases already under way on its
devices: the scheduler frees capacity on a job's terminal event and may place the next job
on the same device before this worker has released the old partition. A create is tried
`worker.create_retries` times with `worker.create_backoff_s` doubling (the seed: 3, 1 s),
looking first for partitions a crashed run (or a cut-short attempt) already made; it is all
or nothing, so a whole-GPU job never keeps half its devices. A create stops as soon as its
placement is no longer held (revoked, superseded or ended: `handlers.holds`, checked before
each chronos_cli create and again before reporting ready); what it made is given back and the
placement's release reports it. What to emit is decided in `handlers.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from services.partitioner import handlers
from services.partitioner.state import PartitionJob
from services.partitioner.types import Partition
from services.partitioner.workers import WorkerAgent
from shared import bus, metrics, tracing
from shared import events as ev
from shared.config import WorkerConfig
from shared.errors import CumulusError, NotFound

log = logging.getLogger(__name__)

RELEASE_PATIENCE_S = 30.0
"""How long a release keeps retrying an unreachable chronos_cli before leaving it to the reaper."""

Emit = Callable[[list[ev.Event]], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


async def labelled(agent: WorkerAgent, job: PartitionJob) -> list[Partition]:
    """The live partitions carrying this placement's label (made by us, maybe pre-crash)."""
    live = await agent.chronos.partitions()
    return list(handlers.adoptable(job, live).values())


async def release_quietly(
    agent: WorkerAgent, partition_id: str, patience: float = RELEASE_PATIENCE_S
) -> bool:
    """Release, retrying for `patience` seconds; True once it is gone (or was already)."""
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            await agent.chronos.release(partition_id)
            return True
        except NotFound:
            return True
        except CumulusError as exc:
            if time.monotonic() >= deadline:
                log.error(
                    "cannot release partition; the reaper will",
                    extra={
                        "fields": {
                            "worker_id": agent.worker_id,
                            "partition_id": partition_id,
                            "error": exc.message,
                        }
                    },
                )
                return False
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 5.0)


class Effects:
    """Starts the creates and releases a worker's state asks for, each job once at a time."""

    def __init__(
        self, worker: WorkerConfig, emit: Emit, spawn: Spawn, wake: Callable[[], None]
    ) -> None:
        self.worker = worker
        self.emit = emit
        self.spawn = spawn
        self.wake = wake

    def reconcile(self, agent: WorkerAgent) -> None:
        work = handlers.work(agent.state, agent.inflight)
        for job in work.releases:
            task = self._start(agent, job.job_id, self.release(agent, job))
            agent.releasing[task] = set(job.devices)
        for job in work.creates:
            after = {t for t, devs in agent.releasing.items() if devs & set(job.devices)}
            self._start(agent, job.job_id, self.create(agent, job, after))

    def _start(
        self, agent: WorkerAgent, job_id: str, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        agent.inflight.add(job_id)
        task = self.spawn(coro, f"partition-{agent.worker_id}-{job_id}")

        def done(t: asyncio.Task[None]) -> None:
            agent.releasing.pop(t, None)
            agent.inflight.discard(job_id)
            self.wake()

        task.add_done_callback(done)
        return task

    async def create(
        self, agent: WorkerAgent, job: PartitionJob, after: Iterable[asyncio.Task[None]] = ()
    ) -> None:
        """Create (or adopt, after a crash) one partition per device of the placement."""
        begun = tracing.now() if tracing.enabled() else 0
        if after := set(after):
            await asyncio.wait(after)
        started = time.monotonic()
        made = await self._create_with_retries(agent, job)
        if made is None:
            return
        metrics.observe(metrics.PARTITION_CREATE, time.monotonic() - started, job.trace)
        agent.recovering.discard(job.job_id)
        if not handlers.holds(agent.state, job):
            # Nobody may run on these any more: give them back, report no readiness.
            for partition in made:
                await release_quietly(agent, partition.partition_id)
            return
        ready = handlers.ready(job, agent.worker_id, made)
        if begun:
            _traced("partitioner partition create", job, ready, begun, ready.partition_ids)
        await self.emit([ready])

    async def _create_with_retries(
        self, agent: WorkerAgent, job: PartitionJob
    ) -> list[Partition] | None:
        """The placement's partitions; None if it was given up or failed (then reported)."""
        retries = self.worker.create_retries
        error: CumulusError | None = None
        for attempt in range(retries):
            if not handlers.holds(agent.state, job):
                return None  # revoked or superseded meanwhile; a release follows if one is due
            try:
                look = attempt > 0 or job.job_id in agent.recovering
                return await self._create_once(agent, job, look)
            except CumulusError as exc:
                error = exc
                log.warning(
                    "Chronos partition creation failed",
                    extra={
                        "fields": {
                            "worker_id": agent.worker_id,
                            "job_id": job.job_id,
                            "attempt": attempt + 1,
                            "error": exc.message,
                        }
                    },
                )
                if attempt < retries - 1:
                    await asyncio.sleep(self.worker.create_backoff_s * 2**attempt)
        if error is not None:
            await self.emit([handlers.failed(job, agent.worker_id, error)])
        return None

    async def _create_once(
        self, agent: WorkerAgent, job: PartitionJob, look: bool
    ) -> list[Partition]:
        existing = await labelled(agent, job) if look else []
        found = {p.device: p for p in existing}
        made: list[Partition] = []
        try:
            for device in job.devices:
                if not handlers.holds(agent.state, job):
                    break  # given up meanwhile: `create` gives back what was made
                if device in found:
                    made.append(found[device])
                    continue
                created = await agent.chronos.create(
                    device, job.tenths, handlers.partition_duration(job), job.label
                )
                made.append(created)
        except CumulusError:
            # All or nothing: a whole-GPU job must not keep half its devices.
            for partition in made:
                await release_quietly(agent, partition.partition_id, patience=0.0)
            raise
        return made

    async def release(self, agent: WorkerAgent, job: PartitionJob) -> None:
        begun = tracing.now() if tracing.enabled() else 0
        ids = set(job.partition_ids)
        if job.status != "ready":
            # A create may have been cut short (crash, revocation): find its partitions by
            # label. A ready placement's ids are complete (all or nothing); strays are the
            # reaper's.
            try:
                ids |= {p.partition_id for p in await labelled(agent, job)}
            except CumulusError as exc:
                log.warning(
                    "cannot list partitions",
                    extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                )
        for partition_id in sorted(ids):
            await release_quietly(agent, partition_id)
        released = handlers.released(job, agent.worker_id, ids)
        if begun:
            _traced("partitioner release", job, released, begun, released.partition_ids)
        await self.emit([released])


def _traced(name: str, job: PartitionJob, outcome: ev.JobEvent, begun: int, ids: list[str]) -> None:
    """A span of chronos_cli work on a placement, up to the event that reports it."""
    tracing.record(
        name,
        outcome.trace,
        begun,
        attributes={
            **tracing.messaging(bus.subject_of(outcome), outcome.event_id, "publish"),
            **tracing.job_attributes(outcome),
            "chronos.device": job.devices[0] if job.devices else -1,
            "chronos.devices": list(job.devices),
            "chronos.amount_tenths": job.tenths,
            "chronos.partition_ids": ids,
        },
    )
