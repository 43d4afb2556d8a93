"""A worker's presence: its registration (with its devices) and its heartbeats.

Registration is retried with backoff until chronos_cli answers `stats`. A local worker beats
every `worker.heartbeat_s`; an SSH worker only while its connection is (or can be) open, so
the scheduler stops placing work on a worker it cannot reach and declares it lost after
`scheduler.heartbeat_misses` intervals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.partitioner import handlers
from services.partitioner.ssh import SshPool
from services.partitioner.workers import WorkerAgent
from shared import events as ev
from shared.errors import CumulusError

log = logging.getLogger(__name__)

Emit = Callable[[list[ev.Event]], Awaitable[None]]
Beat = Callable[[ev.WorkerHeartbeat], Awaitable[None]]


class Presence:
    def __init__(
        self, backend: str, interval: float, emit: Emit, beat: Beat, ssh: SshPool | None
    ) -> None:
        self.backend = backend
        self.interval = interval
        self.emit = emit
        self.beat = beat
        """Publishes a heartbeat (volatile: never logged)."""
        self.ssh = ssh

    async def run(self, agent: WorkerAgent) -> None:
        await self.register(agent)
        while True:
            if await self.reachable(agent):
                try:
                    await self.beat(
                        ev.WorkerHeartbeat(worker_id=agent.worker_id, interval_s=self.interval)
                    )
                except Exception as exc:  # the bus may be restarting; keep beating
                    log.warning("heartbeat failed", extra={"fields": {"error": repr(exc)}})
            await asyncio.sleep(self.interval)

    async def register(self, agent: WorkerAgent) -> None:
        """Register the worker and its devices, retrying until chronos_cli answers."""
        delay = 1.0
        while not agent.registered:
            try:
                devices = await agent.chronos.stats()
            except CumulusError as exc:
                log.warning(
                    "cannot register worker; retrying",
                    extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            await self.emit(
                [
                    handlers.registered(
                        agent.worker_id, agent.hostname, self.backend, agent.labels, devices
                    )
                ]
            )
            agent.registered = True

    async def reachable(self, agent: WorkerAgent) -> bool:
        """A local worker always is; an SSH worker while its connection is (or can be) open."""
        if self.ssh is None or agent.target is None:
            return True
        reachable = self.ssh.connected(agent.target)
        if not reachable:
            try:
                await self.ssh.connection(agent.target)
                reachable = True
            except CumulusError as exc:
                if agent.reachable:
                    log.warning(
                        "worker unreachable; heartbeats paused",
                        extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                    )
        if reachable and not agent.reachable:
            log.info("worker reachable again", extra={"fields": {"worker_id": agent.worker_id}})
        agent.reachable = reachable
        return reachable
