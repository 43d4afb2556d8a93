"""Drive the real Scheduler's apply/decide chain without a bus: events in, events out.

`Driver.feed(event)` runs exactly what the service runs per consumed event (`step`: apply,
decide, apply each decision, decide again …) and keeps the log bytes the service would write,
so a "restart" is a new Scheduler replaying that log.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from services.scheduler.app import Scheduler
from services.scheduler.state import SchedulerState
from shared import config as config_mod
from shared import events as ev

_ids = itertools.count()


def spec(tenths: int, priority: int = 0) -> ev.JobSpec:
    return ev.JobSpec(code_ref="x" * 64, gpu_tenths=tenths, duration_s=600, priority=priority)


def devices(n: int) -> list[ev.DeviceInfo]:
    return [ev.DeviceInfo(index=i, name=f"GPU {i}", memory_bytes=16 << 30) for i in range(n)]


class Driver:
    def __init__(self, **policy: Any) -> None:
        env = {f"CUMULUS_SCHEDULER_{k.upper()}": str(v) for k, v in policy.items()}
        self.config = config_mod.load(environ=env)
        self.scheduler = Scheduler(self.config)
        self.log: list[bytes] = []
        self.emitted: list[ev.Event] = []

    @property
    def state(self) -> SchedulerState:
        return self.scheduler.state

    def feed(self, event: ev.Event) -> list[ev.Event]:
        out = self.scheduler.step(event)
        self.log.extend(ev.encode(e) for e in [event, *out])
        self.emitted.extend(out)
        return out

    def restart(self) -> None:
        self.scheduler = Scheduler(self.config)
        for data in self.log:
            self.scheduler.apply(ev.decode(data))

    # -- convenience ---------------------------------------------------------------------

    def add_worker(self, worker_id: str, n: int) -> list[ev.Event]:
        return self.feed(
            ev.WorkerRegistered(worker_id=worker_id, hostname=worker_id, devices=devices(n))
        )

    def submit(
        self, tenths: int, priority: int = 0, job_id: str = "", ts: float | None = None
    ) -> tuple[str, list[ev.Event]]:
        job_id = job_id or f"j{next(_ids)}"
        extra: dict[str, Any] = {} if ts is None else {"ts": ts}
        return job_id, self.feed(
            ev.JobSubmitted(job_id=job_id, spec=spec(tenths, priority), **extra)
        )

    def job(self, job_id: str) -> Any:
        return self.state.jobs[job_id]

    def start(self, job_id: str) -> None:
        job = self.job(job_id)
        self.feed(
            ev.JobStarted(
                job_id=job_id,
                worker_id=job.worker_id,
                backend="process",
                handle="1",
                attempt=job.attempt,
            )
        )

    def complete(self, job_id: str, ts: float | None = None) -> list[ev.Event]:
        job = self.job(job_id)
        extra: dict[str, Any] = {} if ts is None else {"ts": ts}
        return self.feed(
            ev.JobCompleted(
                job_id=job_id, worker_id=job.worker_id, **extra, result=msgspec.Raw(b'{"ok":true}')
            )
        )

    def placed(self) -> list[str]:
        return [j.job_id for j in self.state.jobs.values() if j.status == "placed"]
