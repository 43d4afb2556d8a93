"""The scheduler's state: workers and their devices' allocations, jobs, and the queue.

Changed only by `apply(event)`, so replaying the log rebuilds exactly the state the scheduler
had. Capacity is counted in integer tenths per device (10 = one whole GPU).
"""

from __future__ import annotations

from functools import singledispatchmethod
from pathlib import Path
from typing import Any

import msgspec

from cumulus_core.amounts import TENTHS_PER_GPU
from shared import events as ev
from shared.eventlog import read_log


class DeviceState(msgspec.Struct, kw_only=True):
    index: int
    name: str
    memory_bytes: int
    kind: str = "virtual"
    allocated: dict[str, int] = {}
    """job id -> tenths held on this device."""

    @property
    def used(self) -> int:
        return sum(self.allocated.values())

    @property
    def free(self) -> int:
        return TENTHS_PER_GPU - self.used


class WorkerState(msgspec.Struct, kw_only=True):
    worker_id: str
    hostname: str = ""
    backend: str = ""
    labels: dict[str, str] = {}
    devices: list[DeviceState] = []
    registered_at: float = 0.0
    last_seen: float = 0.0
    heartbeat_s: float = 5.0
    alive: bool = True


class JobState(msgspec.Struct, kw_only=True):
    job_id: str
    user: str
    spec: ev.JobSpec
    trace: str = ""
    status: str = "pending"
    """pending (not placed yet) | queued | placed | done."""
    worker_id: str = ""
    devices: list[int] = []
    tenths: int = 0
    attempt: int = 0
    tried: list[str] = []
    cancel_requested: bool = False
    submitted_at: float = 0.0
    order: int = 0
    """Submission order, for FIFO within a priority."""


class SchedulerState:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerState] = {}
        self.jobs: dict[str, JobState] = {}
        self.queue: list[str] = []
        self.submitted = 0

    # -- queries ---------------------------------------------------------------------------

    def live_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.alive and w.devices]

    def allocation(self) -> dict[str, Any]:
        """Allocation state only (no clocks): what must survive a restart unchanged."""
        return {
            "workers": {
                w.worker_id: {
                    "alive": w.alive,
                    "devices": {d.index: dict(sorted(d.allocated.items())) for d in w.devices},
                }
                for w in sorted(self.workers.values(), key=lambda w: w.worker_id)
            },
            "placements": {
                j.job_id: [j.worker_id, list(j.devices), j.tenths, j.attempt]
                for j in sorted(self.jobs.values(), key=lambda j: j.job_id)
                if j.status == "placed"
            },
            "queue": list(self.queue),
            "active": sorted(j.job_id for j in self.jobs.values() if j.status != "done"),
        }

    # -- capacity --------------------------------------------------------------------------

    def _free(self, job: JobState) -> None:
        worker = self.workers.get(job.worker_id)
        if worker is not None:
            for device in worker.devices:
                device.allocated.pop(job.job_id, None)

    def _hold(self, job: JobState) -> None:
        worker = self.workers.get(job.worker_id)
        if worker is None:
            return
        for device in worker.devices:
            if device.index in job.devices:
                device.allocated[job.job_id] = job.tenths

    def _dequeue(self, job_id: str) -> None:
        if job_id in self.queue:
            self.queue.remove(job_id)

    # -- apply -----------------------------------------------------------------------------

    @singledispatchmethod
    def apply(self, event: Any) -> None:
        """Events the scheduler does not track change nothing."""

    @apply.register
    def _(self, event: ev.WorkerRegistered) -> None:
        old = self.workers.get(event.worker_id)
        held = {d.index: d.allocated for d in old.devices} if old else {}
        self.workers[event.worker_id] = WorkerState(
            worker_id=event.worker_id,
            hostname=event.hostname,
            backend=event.backend,
            labels=dict(event.labels),
            devices=[
                DeviceState(
                    index=d.index,
                    name=d.name,
                    memory_bytes=d.memory_bytes,
                    kind=d.kind,
                    allocated=dict(held.get(d.index, {})),
                )
                for d in event.devices
            ],
            registered_at=old.registered_at if old else event.ts,
            last_seen=event.ts,
            heartbeat_s=old.heartbeat_s if old else 5.0,
            alive=True,
        )

    @apply.register
    def _(self, event: ev.WorkerHeartbeat) -> None:
        if worker := self.workers.get(event.worker_id):
            worker.last_seen = max(worker.last_seen, event.ts)
            worker.heartbeat_s = event.interval_s

    @apply.register
    def _(self, event: ev.WorkerDeregistered) -> None:
        if worker := self.workers.get(event.worker_id):
            worker.alive = False

    @apply.register
    def _(self, event: ev.JobSubmitted) -> None:
        if event.job_id in self.jobs:
            return
        self.submitted += 1
        self.jobs[event.job_id] = JobState(
            job_id=event.job_id,
            user=event.user,
            spec=event.spec,
            trace=event.trace,
            submitted_at=event.ts,
            order=self.submitted,
        )

    @apply.register
    def _(self, event: ev.JobQueued) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None and job.status == "pending":
            job.status = "queued"
            self.queue.append(job.job_id)

    @apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.status == "done" or event.attempt <= job.attempt:
            return
        self._dequeue(job.job_id)
        job.status = "placed"
        job.worker_id = event.worker_id
        job.devices = list(event.devices)
        job.tenths = event.tenths
        job.attempt = event.attempt
        job.tried = [*job.tried, event.worker_id]
        self._hold(job)

    @apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.attempt != event.attempt or job.worker_id != event.worker_id:
            return
        self._free(job)
        if job.status == "placed":
            job.status = "pending"
        job.worker_id, job.devices, job.tenths = "", [], 0

    @apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.attempt != event.attempt or job.worker_id != event.worker_id:
            return
        self._free(job)
        job.worker_id, job.devices, job.tenths = "", [], 0
        if job.status == "placed":
            # Released before any terminal event (partition expired, worker reaped it).
            job.status = "pending"

    @apply.register
    def _(self, event: ev.CancelRequested) -> None:
        if job := self.jobs.get(event.job_id):
            job.cancel_requested = True

    def _finish(self, event: ev.Terminal) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.status == "done":
            return
        if job.status != "placed":
            self._free(job)
        self._dequeue(job.job_id)
        job.status = "done"

    @apply.register
    def _(self, event: ev.JobCompleted) -> None:
        self._finish(event)

    @apply.register
    def _(self, event: ev.JobFailed) -> None:
        self._finish(event)

    @apply.register
    def _(self, event: ev.JobTimedOut) -> None:
        self._finish(event)

    @apply.register
    def _(self, event: ev.JobCancelled) -> None:
        self._finish(event)


def rebuild(path: Path, upto: int | None = None) -> SchedulerState:
    """The state a scheduler log file holds at position `upto` (for tools and tests)."""
    state = SchedulerState()
    for _, data in read_log(path, upto):
        state.apply(ev.decode(data))
    return state
