"""The partitioner: carves GPU partitions with chronos_cli for the workers it serves.

Local mode: the agent on one worker. SSH mode: one process serving agentless workers over
SSH, as in the seed (`services/partitioner/workers.py`). Either way, per worker it registers
the worker and its devices and heartbeats (`presence.py`; an SSH worker only while it is
reachable), consumes only that worker's events (`jobs.*.*.<worker>.scheduled`, `.revoked` and
the terminal ones), creates partitions with retries and exponential backoff (`effects.py`; the
seed: 3 attempts, 1 s doubling), emits PartitionReady or PartitionFailed, and releases on every
terminal event and revocation exactly once, also after its own crash: every partition is
labelled `<job>.<attempt>`, so a replay finds what a crashed run created. A reaper
(`reaper.py`) runs `chronos_cli reap` and releases the partitions no placement holds any more.
What to create, release and report is decided in `handlers.py`; this module is the wiring.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from services.partitioner import snapshot as snapshots
from services.partitioner.chronos import Chronos
from services.partitioner.effects import Effects
from services.partitioner.presence import Presence
from services.partitioner.reaper import Reaper
from services.partitioner.ssh import SshPool
from services.partitioner.state import PartitionerState
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
from shared.config import Config
from shared.service import ConsumerSpec, EventService

log = logging.getLogger(__name__)

States = dict[str, PartitionerState]
"""Each served worker's state, by worker id."""


class Partitioner(EventService[States]):
    name = "partitioner"
    creates_streams = False

    def __init__(self, config: Config, *, chronos: Chronos | None = None) -> None:
        super().__init__(config)
        self.ssh: SshPool | None = None
        self.agents: dict[str, WorkerAgent] = {}
        self.ended: snapshots.Ended = {}
        """When a compaction first found each placement done (services/partitioner/snapshot.py)."""
        if ssh_mode(self.config):
            self.ssh = SshPool(self.config.ssh)
            if not log.isEnabledFor(logging.DEBUG):
                # asyncssh logs every channel at INFO: five lines per chronos_cli command.
                logging.getLogger("asyncssh").setLevel(logging.WARNING)
            self._add(ssh_agents(self.config, self.ssh, configured_addresses(self.config)))
        else:
            self._add([local_agent(self.config, chronos)])
        worker = self.config.worker
        self.effects = Effects(worker, self.emit, self._spawn, self.wake)
        backend: str = worker.backend
        if backend == "auto" and self.ssh is None:
            # The worker registers what runs its jobs, as its runner resolves `auto` on this
            # host (`cumulus workers` shows it): docker or process, never "auto".
            from services.runner.config import explain

            backend = explain(self.config)[0]
        self.presence = Presence(backend, worker.heartbeat_s, self.emit, self._beat, self.ssh)
        self.reaper = Reaper(worker.reap_interval_s, self.wake)

    def new_state(self) -> States:
        return {}

    def reset_state(self) -> None:
        # Each agent holds its worker's part of the state: give it a fresh one too.
        self.state = {}
        for agent in self.agents.values():
            agent.state = PartitionerState(agent.worker_id)
            self.state[agent.worker_id] = agent.state

    # Retention (shared/service.py): snapshots, and placements done for a while leave memory.
    def snapshot(self) -> bytes | None:
        return snapshots.encode(self.state, self.ended)

    def restore(self, data: bytes) -> None:
        # Into the states the agents hold, which effects and the reaper read.
        self.state = {worker_id: agent.state for worker_id, agent in self.agents.items()}
        self.ended = snapshots.restore(self.state, data)

    def compact(self, now: float) -> None:
        snapshots.compact(self.state, self.ended, now, self.config.retention.forget_after_s)

    def _add(self, agents: list[WorkerAgent]) -> None:
        for agent in agents:
            if agent.worker_id not in self.agents:
                self.agents[agent.worker_id] = agent
                self.state[agent.worker_id] = agent.state

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self.spawn(coro, name=name)

    async def _beat(self, heartbeat: ev.WorkerHeartbeat) -> None:
        assert self.js is not None
        if self.nc is not None and not self.nc.is_connected:
            return  # the bus away: no one to hear it, and the bus's own lines say so
        await bus.publish(self.js, heartbeat)

    @property
    def db_path(self) -> Path:
        if self.ssh is not None:
            return self.config.data_path / f"partitioner-ssh-{self.config.worker_id}.sqlite"
        return self.config.data_path / f"partitioner-{self.config.worker_id}.sqlite"

    async def before_replay(self) -> None:
        if self.ssh is not None and self.config.ssh.swarm:
            # Before replay, so the log's events of these workers find their state.
            found = await asyncio.to_thread(swarm_addresses, self.config.ssh.timeout)
            self._add(ssh_agents(self.config, self.ssh, found))
            log.info("swarm workers", extra={"fields": {"workers": sorted(found)}})
        if not self.agents:
            log.warning("SSH mode without workers: set ssh.workers or label Swarm nodes")

    def consumers(self) -> list[ConsumerSpec]:
        return [
            ConsumerSpec(
                subjects.JOBS_STREAM,
                f"partitioner-{worker_id}",
                [
                    *subjects.job_events("scheduled", "revoked", worker_id=worker_id),
                    *subjects.terminal_events(worker_id),
                    subjects.ELECTED,
                ],
            )
            for worker_id in self.agents
        ]

    def apply(self, event: Any) -> None:
        if isinstance(event, ev.SchedulerElected):  # every served worker's fence moves
            for each in self.state.values():
                each.apply(event)
            return
        state = self.state.get(getattr(event, "worker_id", ""))
        if state is not None:
            state.apply(event)

    def fence(self) -> int:
        # The fences of the served workers move together (one stream, the same markers).
        return max((state.epoch for state in self.state.values()), default=0)

    async def on_start(self) -> None:
        for agent in self.agents.values():
            agent.recovering = {j.job_id for j in agent.state.jobs.values() if j.needs_partition}
            self.spawn(self.presence.run(agent), name=f"presence-{agent.worker_id}")
            if self.reaper.interval > 0:
                self.spawn(self.reaper.run(agent), name=f"reaper-{agent.worker_id}")

    async def reconcile(self) -> None:
        for agent in self.agents.values():
            self.effects.reconcile(agent)

    async def on_stop(self) -> None:
        if self.ssh is not None:
            await self.ssh.close()
