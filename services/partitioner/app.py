"""The partitioner: the agent on each worker that carves GPU partitions with chronos_cli.

It registers its worker and devices, heartbeats, consumes only its own worker's events
(`jobs.*.*.<worker>.scheduled` and the terminal ones), creates partitions with retries and
exponential backoff (the seed: 3 attempts, 1 s doubling), emits PartitionReady or
PartitionFailed, and releases on every terminal event exactly once, also after its own crash:
every partition is labelled `<job>.<attempt>`, so a replay finds what a crashed run created.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from cumulus_core.env import merge_envs
from services.partitioner.chronos import Chronos, ChronosError, ChronosUnreachable
from services.partitioner.state import PartitionerState, PartitionJob
from shared import bus, subjects
from shared import events as ev
from shared.errors import partition_failed, ssh_failed
from shared.service import ConsumerSpec, EventService
from shared.telemetry import child_trace

log = logging.getLogger(__name__)

PARTITION_GRACE_S = 60
"""A partition outlives its job's duration by this much, so the runner's deadline fires first."""


class Partitioner(EventService):
    name = "partitioner"

    def __init__(self, *args: Any, chronos: Chronos | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_id = self.config.worker_id
        self.state = PartitionerState(self.worker_id)
        self.chronos = chronos or self._local_chronos()
        self._inflight: set[str] = set()
        self._recovering: set[str] = set()
        """Jobs that wanted a partition when the log was replayed: a crashed run may have
        created it already, so look before creating."""
        self._effects: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def db_path(self) -> Any:
        return self.config.data_path / f"partitioner-{self.worker_id}.sqlite"

    def _local_chronos(self) -> Chronos:
        worker = self.config.worker
        options = [
            "--state-dir",
            str(self.config.data_path / f"chronos-{self.worker_id}"),
            "--backend",
            worker.device_source,
            "--devices",
            worker.devices,
        ]
        if worker.chronos_cli:
            return Chronos(command=[worker.chronos_cli], options=options)
        return Chronos(options=options)

    def consumers(self) -> list[ConsumerSpec]:
        me = self.worker_id
        return [
            ConsumerSpec(
                subjects.JOBS_STREAM,
                f"partitioner-{me}",
                [*subjects.job_events("scheduled", worker_id=me), *subjects.terminal_events(me)],
            )
        ]

    def apply(self, event: Any) -> None:
        self.state.apply(event)

    async def on_start(self) -> None:
        self._recovering = {j.job_id for j in self.state.jobs.values() if j.needs_partition}
        devices = await self.chronos.stats()
        await self.emit(
            [
                ev.WorkerRegistered(
                    worker_id=self.worker_id,
                    hostname=socket.gethostname(),
                    backend=self.config.worker.backend,
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
        self._heartbeat = asyncio.create_task(self._beat(), name="partitioner-heartbeat")
        self._tasks.append(self._heartbeat)

    async def on_stop(self) -> None:
        for task in list(self._effects):
            task.cancel()
        await asyncio.gather(*self._effects, return_exceptions=True)

    async def _beat(self) -> None:
        assert self.js is not None
        interval = self.config.worker.heartbeat_s
        while True:
            try:
                await bus.publish(
                    self.js, ev.WorkerHeartbeat(worker_id=self.worker_id, interval_s=interval)
                )
            except Exception as exc:  # the bus may be restarting; keep beating
                log.warning("heartbeat failed", extra={"fields": {"error": repr(exc)}})
            await asyncio.sleep(interval)

    # -- effects ---------------------------------------------------------------------------

    async def reconcile(self) -> None:
        for job in list(self.state.jobs.values()):
            if job.job_id in self._inflight:
                continue
            if job.needs_partition:
                self._spawn(job, self._create(job))
            elif job.needs_release:
                self._spawn(job, self._release(job))

    def _spawn(self, job: PartitionJob, coro: Any) -> None:
        self._inflight.add(job.job_id)
        task = asyncio.create_task(coro)
        self._effects.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._effects.discard(t)
            self._inflight.discard(job.job_id)
            self.wake()
            if not t.cancelled() and t.exception() is not None:
                log.error("partition effect failed", exc_info=t.exception())

        task.add_done_callback(done)

    async def _create(self, job: PartitionJob) -> None:
        """Create (or adopt, after a crash) one partition per device of the placement."""
        retries = self.config.worker.create_retries
        backoff = self.config.worker.create_backoff_s
        error: ChronosError | None = None
        for attempt in range(retries):
            try:
                made = await self._create_once(
                    job, look=attempt > 0 or job.job_id in self._recovering
                )
                break
            except ChronosError as exc:
                error = exc
                log.warning(
                    "Chronos partition creation failed",
                    extra={
                        "fields": {
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
                        worker_id=self.worker_id,
                        attempt=job.attempt,
                        code=err.code,
                        message=err.message,
                        trace=child_trace(job.trace),
                    )
                ]
            )
            return
        await self.emit(
            [
                ev.PartitionReady(
                    job_id=job.job_id,
                    user=job.user,
                    worker_id=self.worker_id,
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

    async def _create_once(self, job: PartitionJob, look: bool) -> list[dict[str, Any]]:
        existing = {p["device"]: p for p in await self._labelled(job)} if look else {}
        made: list[dict[str, Any]] = []
        try:
            for device in job.devices:
                if device in existing:
                    made.append(existing[device])
                    continue
                made.append(
                    await self.chronos.create(
                        device, job.tenths, job.spec.duration_s + PARTITION_GRACE_S, job.label
                    )
                )
        except ChronosError:
            # All or nothing: a whole-GPU job must not keep half its devices.
            for partition in made:
                await self._release_quietly(partition["partition_id"])
            raise
        return made

    async def _labelled(self, job: PartitionJob) -> list[dict[str, Any]]:
        """The live partitions carrying this placement's label (made by us, maybe pre-crash)."""
        return [p for p in await self.chronos.partitions() if p.get("label") == job.label]

    async def _release(self, job: PartitionJob) -> None:
        ids = set(job.partition_ids)
        try:
            ids |= {p["partition_id"] for p in await self._labelled(job)}
        except ChronosError as exc:
            log.warning("cannot list partitions", extra={"fields": {"error": exc.message}})
        for partition_id in sorted(ids):
            await self._release_quietly(partition_id)
        await self.emit(
            [
                ev.PartitionReleased(
                    job_id=job.job_id,
                    user=job.user,
                    worker_id=self.worker_id,
                    attempt=job.attempt,
                    partition_ids=sorted(ids),
                    trace=child_trace(job.trace),
                )
            ]
        )

    async def _release_quietly(self, partition_id: str) -> None:
        deadline = time.monotonic() + 30
        delay = 0.2
        while True:
            try:
                await self.chronos.release(partition_id)
                return
            except ChronosError as exc:
                if "not found" in exc.message.lower() or "unknown" in exc.message.lower():
                    return
                if time.monotonic() > deadline:
                    log.error(
                        "cannot release partition; the reaper will",
                        extra={"fields": {"partition_id": partition_id, "error": exc.message}},
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
