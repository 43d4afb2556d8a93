"""The reaper: ends expired partitions and releases the orphans no placement holds any more.

Every `worker.reap_interval_s` it runs `chronos_cli reap` (expired partitions leave the
table), then releases at most REAP_BATCH orphans (`handlers.orphans`): partitions whose
placement this worker already released, failed, replaced or never had. A placement still
held is released on its terminal event as usual, finding nothing left, so no placement is
ever reported released twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.partitioner import handlers
from services.partitioner.chronos import ChronosUnreachable
from services.partitioner.types import Partition
from services.partitioner.workers import WorkerAgent
from shared.errors import CumulusError, NotFound

log = logging.getLogger(__name__)

REAP_BATCH = 100
"""Orphans released per reaper pass and worker, so one pass stays bounded."""


class Reaper:
    def __init__(self, interval: float, wake: Callable[[], None]) -> None:
        self.interval = interval
        self.wake = wake

    async def run(self, agent: WorkerAgent) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reap(agent)
            except CumulusError as exc:
                log.warning(
                    "reaper pass failed",
                    extra={"fields": {"worker_id": agent.worker_id, "error": exc.message}},
                )

    async def reap(self, agent: WorkerAgent) -> list[str]:
        """One reaper pass: drop expired partitions, release orphans; the ids released."""
        gone: list[str] = []
        for partition in await agent.chronos.reap():
            gone.append(partition.partition_id)
            running = handlers.still_running(agent.state, partition)
            (log.warning if running else log.info)(
                "expired partition reaped",
                extra={
                    "fields": {
                        "worker_id": agent.worker_id,
                        "partition_id": partition.partition_id,
                        "label": partition.label,
                        "job_still_running": running,
                    }
                },
            )
        live = await agent.chronos.partitions()
        found = handlers.orphans(agent.state, live, agent.inflight)
        jobs = handlers.jobs_of(found)
        agent.inflight |= jobs  # no create or release of these jobs meanwhile
        try:
            for partition in found[:REAP_BATCH]:
                if await self._release(agent, partition):
                    gone.append(partition.partition_id)
        finally:
            agent.inflight -= jobs
            self.wake()
        return gone

    async def _release(self, agent: WorkerAgent, partition: Partition) -> bool:
        """True if this pass released `partition`; an unreachable worker ends the pass."""
        fields = {"worker_id": agent.worker_id, "partition_id": partition.partition_id}
        try:
            await agent.chronos.release(partition.partition_id)
        except ChronosUnreachable:
            raise  # the next pass tries again
        except NotFound:
            return False  # gone meanwhile (released or expired)
        except CumulusError as exc:
            log.warning(
                "cannot release orphaned partition",
                extra={"fields": {**fields, "error": exc.message}},
            )
            return False
        log.info(
            "orphaned partition released",
            extra={"fields": {**fields, "label": partition.label}},
        )
        return True
