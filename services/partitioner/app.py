"""The partitioner: carves GPU partitions with chronos_cli for the workers it serves.

Local mode: the agent on one worker. SSH mode: one process serving agentless workers over
SSH, as in the seed (`services/partitioner/workers.py`). Either way, per worker it registers
the worker and its devices, heartbeats (an SSH worker only while it is reachable), consumes
only that worker's events (`jobs.*.*.<worker>.scheduled`, `.revoked` and the terminal ones),
creates partitions with retries and exponential backoff (the seed: 3 attempts, 1 s doubling),
emits PartitionReady or PartitionFailed, and releases on every terminal event and revocation
exactly once, also after its own crash: every partition is labelled `<job>.<attempt>`, so a
replay finds what a crashed run created. A reaper runs `chronos_cli reap` and releases the
partitions no placement holds any more (`state.orphans`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cumulus_core.env import merge_envs
from services.partitioner.chronos import Chronos, ChronosError, ChronosUnreachable
from services.partitioner.ssh import SshPool
from services.partitioner.state import PartitionJob, orphans, parse_label
from services.partitioner.workers import (
    WorkerAgent,
    configured_addresses,
    local_agent,
    ssh_agents,
    ssh_mode,
    swarm_addresses,
)
from shared import bus, subjects
from shared import events as ev
from shared.errors import partition_failed, ssh_failed
from shared.service import ConsumerSpec, EventService
from shared.telemetry import child_trace

log = logging.getLogger(__name__)

PARTITION_GRACE_S = 60
"""A partition outlives its job's duration by this much, so the runner's deadline fires first."""

RELEASE_PATIENCE_S = 30.0
"""How long a release keeps retrying an unreachable chronos_cli before leaving it to the reaper."""

REAP_BATCH = 100
"""Orphans released per reaper pass and worker, so one pass stays bounded."""


class Partitioner(EventService):
    name = "partitioner"

    def __init__(self, *args: Any, chronos: Chronos | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ssh: SshPool | None = None
        self.agents: dict[str, WorkerAgent] = {}
        if ssh_mode(self.config):
            self.ssh = SshPool(self.config.ssh)
            if not log.isEnabledFor(logging.DEBUG):
                # asyncssh logs every channel at INFO: five lines per chronos_cli command.
                logging.getLogger("asyncssh").setLevel(logging.WARNING)
            self._add(ssh_agents(self.config, self.ssh, configured_addresses(self.config)))
        else:
            self._add([local_agent(self.config, chronos)])
        self._effects: set[asyncio.Task[None]] = set()
        self._own: list[asyncio.Task[None]] = []

    def _add(self, agents: list[WorkerAgent]) -> None:
        for agent in agents:
            self.agents.setdefault(agent.worker_id, agent)

    @property
    def db_path(self) -> Path:
        if self.ssh is not None:
            return self.config.data_path / f"partitioner-ssh-{self.config.worker_id}.sqlite"
        return self.config.data_path / f"partitioner-{self.config.worker_id}.sqlite"

    async def start(self, nc: Any = None) -> None:
        if self.ssh is not None and self.config.ssh.swarm:
            # Before replay, so the log's events of these workers find their state.
            found = await asyncio.to_thread(swarm_addresses, self.config.ssh.timeout)
            self._add(ssh_agents(self.config, self.ssh, found))
            log.info("swarm workers", extra={"fields": {"workers": sorted(found)}})
        if not self.agents:
            log.warning("SSH mode without workers: set ssh.workers or label Swarm nodes")
        await super().start(nc)

    def consumers(self) -> list[ConsumerSpec]:
        return [
            ConsumerSpec(
                subjects.JOBS_STREAM,
                f"partitioner-{worker_id}",
                [
                    *subjects.job_events("scheduled", "revoked", worker_id=worker_id),
                    *subjects.terminal_events(worker_id),
                ],
            )
            for worker_id in self.agents
        ]

    def apply(self, event: Any) -> None:
        agent = self.agents.get(getattr(event, "worker_id", ""))
        if agent is not None:
            agent.state.apply(event)

    async def on_start(self) -> None:
        for agent in self.agents.values():
            agent.recovering = {j.job_id for j in agent.state.jobs.values() if j.needs_partition}
            self._own.append(
                asyncio.create_task(self._presence(agent), name=f"presence-{agent.worker_id}")
            )
            if self.config.worker.reap_interval_s > 0:
                self._own.append(
                    asyncio.create_task(self._reaper(agent), name=f"reaper-{agent.worker_id}")
                )

    async def on_stop(self) -> None:
        for task in [*self._own, *self._effects]:
            task.cancel()
        await asyncio.gather(*self._own, *self._effects, return_exceptions=True)
        if self.ssh is not None:
            await self.ssh.close()

    # -- presence: registration and heartbeats -----------------------------------------------

    async def _presence(self, agent: WorkerAgent) -> None:
        delay = 1.0
        while not agent.registered:
            try:
                await self._register(agent)
            except ChronosError as exc:
                log.warning(
                    "cannot register worker; retrying",
                    extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        interval = self.config.worker.heartbeat_s
        while True:
            if await self._reachable(agent):
                try:
                    assert self.js is not None
                    await bus.publish(
                        self.js, ev.WorkerHeartbeat(worker_id=agent.worker_id, interval_s=interval)
                    )
                except Exception as exc:  # the bus may be restarting; keep beating
                    log.warning("heartbeat failed", extra={"fields": {"error": repr(exc)}})
            await asyncio.sleep(interval)

    async def _register(self, agent: WorkerAgent) -> None:
        devices = await agent.chronos.stats()
        await self.emit(
            [
                ev.WorkerRegistered(
                    worker_id=agent.worker_id,
                    hostname=agent.hostname,
                    backend=self.config.worker.backend,
                    labels=dict(agent.labels),
                    devices=[
                        ev.DeviceInfo(
                            index=d["index"],
                            name=d["name"],
                            memory_bytes=d["memory_bytes"],
                            kind=d["kind"],
                        )
                        for d in devices
                    ],
                )
            ]
        )
        agent.registered = True

    async def _reachable(self, agent: WorkerAgent) -> bool:
        """A local worker always is; an SSH worker while its connection is (or can be) open.

        An unreachable worker sends no heartbeats, so the scheduler stops placing work there.
        """
        if self.ssh is None or agent.target is None:
            return True
        reachable = self.ssh.connected(agent.target)
        if not reachable:
            try:
                await self.ssh.connection(agent.target)
                reachable = True
            except ChronosError as exc:
                if agent.reachable:
                    log.warning(
                        "worker unreachable; heartbeats paused",
                        extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                    )
        if reachable and not agent.reachable:
            log.info("worker reachable again", extra={"fields": {"worker_id": agent.worker_id}})
        agent.reachable = reachable
        return reachable

    # -- effects ---------------------------------------------------------------------------

    async def reconcile(self) -> None:
        # Releases first, and every create waits for the releases already under way on its
        # worker: the scheduler frees capacity on a job's terminal event and may place the
        # next job on the same device before this worker has released the old partition.
        for agent in self.agents.values():
            jobs = [j for j in agent.state.jobs.values() if j.job_id not in agent.inflight]
            for job in jobs:
                if job.needs_release:
                    task = self._spawn(agent, job.job_id, self._release(agent, job))
                    agent.releasing[task] = set(job.devices)
            for job in jobs:
                if job.needs_partition:
                    after = {t for t, devs in agent.releasing.items() if devs & set(job.devices)}
                    self._spawn(agent, job.job_id, self._create(agent, job, after))

    def _spawn(
        self, agent: WorkerAgent, job_id: str, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        agent.inflight.add(job_id)
        task = asyncio.create_task(coro)
        self._effects.add(task)

        def done(t: asyncio.Task[None]) -> None:
            agent.releasing.pop(t, None)
            self._effects.discard(t)
            agent.inflight.discard(job_id)
            self.wake()
            if not t.cancelled() and t.exception() is not None:
                log.error("partition effect failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def _holds(self, agent: WorkerAgent, job: PartitionJob) -> bool:
        """True while `job` is still the placement this worker should create partitions for."""
        return agent.state.jobs.get(job.job_id) is job and not job.revoked

    async def _create(
        self, agent: WorkerAgent, job: PartitionJob, after: set[asyncio.Task[None]] | None = None
    ) -> None:
        """Create (or adopt, after a crash) one partition per device of the placement."""
        if after:
            await asyncio.wait(after)
        retries = self.config.worker.create_retries
        backoff = self.config.worker.create_backoff_s
        error: ChronosError | None = None
        for attempt in range(retries):
            if not self._holds(agent, job):
                return  # revoked or superseded meanwhile; a release follows if one is due
            try:
                made = await self._create_once(
                    agent, job, look=attempt > 0 or job.job_id in agent.recovering
                )
                break
            except ChronosError as exc:
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
                    await asyncio.sleep(backoff * 2**attempt)
        else:
            assert error is not None
            err = (
                ssh_failed()
                if isinstance(error, ChronosUnreachable)
                else partition_failed(error.message)
            )
            await self.emit(
                [
                    ev.PartitionFailed(
                        job_id=job.job_id,
                        user=job.user,
                        worker_id=agent.worker_id,
                        attempt=job.attempt,
                        code=err.code,
                        message=err.message,
                        trace=child_trace(job.trace),
                    )
                ]
            )
            return
        agent.recovering.discard(job.job_id)
        if not self._holds(agent, job):
            # Nobody may run on these any more: give them back, report no readiness.
            for partition in made:
                await self._release_quietly(agent, partition["partition_id"])
            return
        await self.emit(
            [
                ev.PartitionReady(
                    job_id=job.job_id,
                    user=job.user,
                    worker_id=agent.worker_id,
                    spec=job.spec,
                    attempt=job.attempt,
                    partition_ids=[p["partition_id"] for p in made],
                    devices=[p["device"] for p in made],
                    env=merge_envs([p["env"] for p in made]),
                    expires_at=min(p["expires_at"] for p in made),
                    trace=child_trace(job.trace),
                )
            ]
        )

    async def _create_once(
        self, agent: WorkerAgent, job: PartitionJob, look: bool
    ) -> list[dict[str, Any]]:
        existing = {p["device"]: p for p in await self._labelled(agent, job)} if look else {}
        made: list[dict[str, Any]] = []
        try:
            for device in job.devices:
                if device in existing:
                    made.append(existing[device])
                    continue
                made.append(
                    await agent.chronos.create(
                        device, job.tenths, job.spec.duration_s + PARTITION_GRACE_S, job.label
                    )
                )
        except ChronosError:
            # All or nothing: a whole-GPU job must not keep half its devices.
            for partition in made:
                await self._release_quietly(agent, partition["partition_id"], patience=0.0)
            raise
        return made

    async def _labelled(self, agent: WorkerAgent, job: PartitionJob) -> list[dict[str, Any]]:
        """The live partitions carrying this placement's label (made by us, maybe pre-crash)."""
        return [p for p in await agent.chronos.partitions() if p.get("label") == job.label]

    async def _release(self, agent: WorkerAgent, job: PartitionJob) -> None:
        ids = set(job.partition_ids)
        if job.status != "ready":
            # A create may have been cut short (crash, revocation): find its partitions by
            # label. A ready placement's ids are complete (all or nothing); strays are the
            # reaper's.
            try:
                ids |= {p["partition_id"] for p in await self._labelled(agent, job)}
            except ChronosError as exc:
                log.warning(
                    "cannot list partitions",
                    extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                )
        for partition_id in sorted(ids):
            await self._release_quietly(agent, partition_id)
        await self.emit(
            [
                ev.PartitionReleased(
                    job_id=job.job_id,
                    user=job.user,
                    worker_id=agent.worker_id,
                    attempt=job.attempt,
                    partition_ids=sorted(ids),
                    trace=child_trace(job.trace),
                )
            ]
        )

    async def _release_quietly(
        self, agent: WorkerAgent, partition_id: str, patience: float = RELEASE_PATIENCE_S
    ) -> bool:
        """Release, retrying for `patience` seconds; True once it is gone (or was already)."""
        deadline = time.monotonic() + patience
        delay = 0.2
        while True:
            try:
                await agent.chronos.release(partition_id)
                return True
            except ChronosError as exc:
                if "not found" in exc.message.lower() or "unknown" in exc.message.lower():
                    return True
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

    # -- the reaper ------------------------------------------------------------------------

    async def _reaper(self, agent: WorkerAgent) -> None:
        interval = self.config.worker.reap_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap(agent)
            except ChronosError as exc:
                log.warning(
                    "reaper pass failed",
                    extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                )

    async def reap(self, agent: WorkerAgent) -> list[str]:
        """One reaper pass: drop expired partitions, release orphans; the ids released.

        An expired partition is gone from chronos_cli's table after `reap`; its placement,
        if still held, is released on its terminal event as usual (finding nothing left to
        release), so no placement is ever reported released twice. Orphans are partitions
        whose placement this worker already released, failed, replaced or never had.
        """
        gone: list[str] = []
        for partition in await agent.chronos.reap():
            gone.append(partition["partition_id"])
            parsed = parse_label(partition.get("label"))
            job = agent.state.jobs.get(parsed[0]) if parsed else None
            running = job is not None and job.status == "ready" and not job.terminal
            (log.warning if running else log.info)(
                "expired partition reaped",
                extra={
                    "fields": {
                        "worker_id": agent.worker_id,
                        "partition_id": partition["partition_id"],
                        "label": partition.get("label"),
                        "job_still_running": running,
                    }
                },
            )
        found = orphans(agent.state, await agent.chronos.partitions(), agent.inflight)
        jobs = {job_id for job_id, _ in filter(None, map(parse_label, _labels(found)))}
        agent.inflight |= jobs  # no create or release of these jobs meanwhile
        try:
            for partition in found[:REAP_BATCH]:
                try:
                    await agent.chronos.release(partition["partition_id"])
                except ChronosUnreachable:
                    raise  # the next pass tries again
                except ChronosError as exc:
                    if "not found" not in exc.message.lower():
                        log.warning(
                            "cannot release orphaned partition",
                            extra={
                                "fields": {
                                    "worker_id": agent.worker_id,
                                    "partition_id": partition["partition_id"],
                                    "error": exc.message,
                                }
                            },
                        )
                    continue
                gone.append(partition["partition_id"])
                log.info(
                    "orphaned partition released",
                    extra={
                        "fields": {
                            "worker_id": agent.worker_id,
                            "partition_id": partition["partition_id"],
                            "label": partition.get("label"),
                        }
                    },
                )
        finally:
            agent.inflight -= jobs
            self.wake()
        return gone


def _labels(partitions: list[dict[str, Any]]) -> list[str | None]:
    return [p.get("label") for p in partitions]
