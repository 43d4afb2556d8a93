"""The scheduler's state: workers and their devices' allocations, jobs, and the queue.

Changed only by `apply(event)`, so replaying the log rebuilds exactly the state the scheduler
had. Capacity is counted in integer tenths per device (10 = one whole GPU). Every terminal
event of a placed job frees its capacity exactly once; a lost worker takes its capacity out of
the pool until it is heard from again.

Decisions are fenced by attempt (DESIGN.md rule 9): an outcome (`started`, `partition_failed`,
a terminal event naming its attempt) of an attempt other than the job's current one changes
nothing. A revoked attempt's share stays allocated on its devices, under the key
`<job>.<attempt>` (its partitions' label), until its worker reports that partition released:
the worker may still hold it (a paused partitioner, a runner that has not yet killed the
attempt), so nothing else is placed there meanwhile, and the release frees it exactly once.

Decisions are fenced by epoch too (scheduler high availability, docs/scheduler.md): `epoch` is
the largest scheduler epoch seen in stream order (election markers, and decisions only a
scheduler publishes), and a decision stamped with a smaller one is a superseded scheduler's:
it changes nothing (`ev.stale`). `led` lists the epochs in which this log's own scheduler led
(its internal `Leading` records): its decisions of those epochs were applied when it took them.
"""

from __future__ import annotations

from functools import singledispatchmethod
from pathlib import Path
from typing import Any

import msgspec

from services.scheduler.capacity import Capacity
from services.scheduler.inventory import DeviceState as DeviceState
from services.scheduler.inventory import WorkerState as WorkerState
from services.scheduler.queue import JobQueue
from shared import events as ev
from shared.eventlog import read_log


class Leading(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="cumulus.scheduler.v1.leading"
):
    """Internal: from here on this log's scheduler leads with `epoch` (its election marker
    was applied); logged, never published."""

    epoch: int
    holder: str


Record = ev.AnyEvent | Leading
decode = ev.decoder(Record)
"""Decode one event or internal record of the scheduler's log (MalformedEvent otherwise)."""


class JobState(msgspec.Struct, kw_only=True):
    job_id: str
    user: str
    spec: ev.JobSpec
    trace: str = ""
    status: str = "pending"
    """pending (not placed) | queued | placed | done."""
    worker_id: str = ""
    devices: list[int] = []
    tenths: int = 0
    attempt: int = 0
    revoked: int = 0
    """The newest attempt given up (PlacementRevoked); its share is held until released."""
    started: bool = False
    partitioned: bool = False
    """The worker reported the current attempt's partition ready: its runner may have started
    the job (before its `started` reached the bus), so a lost worker fails it, never places it
    again (at most once)."""
    tried: list[str] = []
    cancel_requested: bool = False
    submitted_at: float = 0.0
    queued_reason: str = ""
    queued_at: float = 0.0
    order: int = 0
    """Submission order, for FIFO within a priority."""
    failed_code: str = ""
    failed_message: str = ""
    """The current attempt's partition failure, for a scheduler that takes over before the
    failure was decided on (handlers.promotion)."""
    failure: ev.JobAttemptFailed | None = None
    """The current attempt's failure of the job's code (`attempt_failed`), until decided on:
    a retry or the job's end (handlers; a scheduler that takes over decides it then)."""
    retried: int = 0
    """Times the job was run again after its code failed (`revoked` with `retry_at`)."""
    retry_at: float = 0.0
    """The pending job is placed again from this time on (a retry's backoff); 0: at once."""


class SchedulerState:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerState] = {}
        self.jobs: dict[str, JobState] = {}
        self.queue = JobQueue()
        self.capacity = Capacity()
        self.submitted = 0
        self.placed: dict[str, dict[str, int]] = {}
        """user -> {job id: tenths it holds}, for every placed job: the users' shares."""
        self.epoch = 0
        """The largest scheduler epoch seen (ev.epoch_after)."""
        self.led: list[int] = []
        """Epochs this log's scheduler led (its `Leading` records)."""

    # -- queries ---------------------------------------------------------------------------

    def live_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.schedulable and w.devices]

    def has_live_workers(self) -> bool:
        return bool(self.capacity.run_of)

    def held_by(self, user: str) -> int:
        """Tenths of GPUs `user`'s placed jobs hold (scheduled, partitioned or running)."""
        return sum(self.placed.get(user, {}).values())

    def jobs_on(self, worker_id: str) -> list[JobState]:
        return [j for j in self.jobs.values() if j.status == "placed" and j.worker_id == worker_id]

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
            "queue": self.queue.ordered(),
            "active": sorted(j.job_id for j in self.jobs.values() if j.status != "done"),
        }

    # -- capacity --------------------------------------------------------------------------

    def _free(self, job: JobState, keep_as: str = "") -> None:
        """Give back what the placed `job` holds; `keep_as` keeps its devices' share allocated
        under that key instead (a revoked attempt's, until its partition is released)."""
        held = self.placed.get(job.user, {})
        held.pop(job.job_id, None)
        if not held:
            self.placed.pop(job.user, None)
        worker = self.workers.get(job.worker_id)
        if worker is not None:
            for device in worker.devices:
                tenths = device.allocated.pop(job.job_id, None)
                if tenths is not None and keep_as:
                    device.allocated[keep_as] = tenths
            self.capacity.index(worker)
        job.worker_id, job.devices, job.tenths = "", [], 0

    def _hold(self, job: JobState) -> None:
        self.placed.setdefault(job.user, {})[job.job_id] = job.tenths * len(job.devices)
        worker = self.workers.get(job.worker_id)
        if worker is None:
            return
        for device in worker.devices:
            if device.index in job.devices:
                device.allocated[job.job_id] = job.tenths
        self.capacity.index(worker)

    # -- apply -----------------------------------------------------------------------------

    def apply(self, event: Any) -> None:
        """Change the state by one event: a stale decision (ev.stale) changes nothing."""
        if ev.stale(event, self.epoch):
            return
        self.epoch = ev.epoch_after(self.epoch, event)
        # The registered mutator, looked up by type (cached): `self._apply(...)` would build
        # a bound wrapper on every call (functools.singledispatchmethod), per event.
        _mutator(type(event))(self, event)

    @singledispatchmethod
    def _apply(self, event: Any) -> None:
        """Events the scheduler does not track change nothing."""

    @_apply.register
    def _(self, event: Leading) -> None:
        if event.epoch not in self.led:
            self.led.append(event.epoch)
        self.epoch = max(self.epoch, event.epoch)

    @_apply.register
    def _(self, event: ev.WorkerRegistered) -> None:
        old = self.workers.get(event.worker_id)
        held = {d.index: d.allocated for d in old.devices} if old else self._placed_on(event)
        node = (
            (old.node_id, old.node_state, old.node_availability, dict(old.node_labels))
            if old
            else ("", "", "", {})
        )
        worker = WorkerState(
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
            node_id=node[0],
            node_state=node[1],
            node_availability=node[2],
            node_labels=node[3],
        )
        self.workers[event.worker_id] = worker
        self.capacity.index(worker)

    def _placed_on(self, event: ev.WorkerRegistered) -> dict[int, dict[str, int]]:
        """What jobs placed on a worker not known yet hold of its devices: a scheduler that
        follows another's decisions may read a placement before the registration it was
        made against (two streams, two consumers)."""
        held: dict[int, dict[str, int]] = {}
        for job in self.jobs.values():
            if job.status == "placed" and job.worker_id == event.worker_id:
                for index in job.devices:
                    held.setdefault(index, {})[job.job_id] = job.tenths
        return held

    @_apply.register
    def _(self, event: ev.WorkerHeartbeat) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is None:
            return
        worker.last_seen = max(worker.last_seen, event.ts)
        worker.heartbeat_s = event.interval_s
        if not worker.alive:
            worker.alive = True
            worker.lost_reason = ""
            worker.declared_lost = False
            worker.revived_at = event.ts
            self.capacity.index(worker)

    def _gone(self, worker_id: str, reason: str) -> None:
        if worker := self.workers.get(worker_id):
            worker.alive = False
            worker.lost_reason = reason
            self.capacity.drop(worker_id)

    @_apply.register
    def _(self, event: ev.WorkerNodeObserved) -> None:
        if worker := self.workers.get(event.worker_id):
            worker.node_id = event.node_id
            worker.node_state = event.state
            worker.node_availability = event.availability
            worker.node_labels = dict(event.labels)
            self.capacity.index(worker)

    @_apply.register
    def _(self, event: ev.WorkerDeregistered) -> None:
        self._gone(event.worker_id, event.reason or "deregistered")

    @_apply.register
    def _(self, event: ev.WorkerLost) -> None:
        self._gone(event.worker_id, event.reason)
        if worker := self.workers.get(event.worker_id):
            worker.declared_lost = True

    @_apply.register
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

    @_apply.register
    def _(self, event: ev.JobQueued) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None and job.status == "pending":
            job.status = "queued"
            job.retry_at = 0.0
            job.queued_reason = event.reason
            job.queued_at = event.ts
            self.queue.push(job.job_id, job.spec.priority, job.spec.gpu_tenths, job.order, job.user)

    @_apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.status == "done" or event.attempt <= job.attempt:
            return
        self.queue.remove(job.job_id)
        job.status = "placed"
        job.worker_id = event.worker_id
        job.devices = list(event.devices)
        job.tenths = event.tenths
        job.attempt = event.attempt
        job.started = False
        job.partitioned = False
        job.failed_code = job.failed_message = ""
        job.failure = None
        job.retry_at = 0.0
        job.tried = [*job.tried, event.worker_id]
        self._hold(job)

    def _current(self, event: ev.JobEvent, attempt: int) -> JobState | None:
        job = self.jobs.get(event.job_id)
        if job is None or job.status != "placed" or job.attempt != attempt:
            return None
        if job.worker_id != event.worker_id:
            return None
        return job

    @_apply.register
    def _(self, event: ev.JobStarted) -> None:
        if job := self._current(event, event.attempt):
            job.started = True

    @_apply.register
    def _(self, event: ev.PartitionReady) -> None:
        if job := self._current(event, event.attempt):
            job.partitioned = True

    @_apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        if job := self._current(event, event.attempt):
            self._free(job)
            job.status = "pending"
            job.failed_code, job.failed_message = event.code, event.message

    @_apply.register
    def _(self, event: ev.JobAttemptFailed) -> None:
        if job := self._current(event, event.attempt):
            job.failure = event

    @_apply.register
    def _(self, event: ev.PlacementRevoked) -> None:
        if job := self._current(event, event.attempt):
            self._free(job, keep_as=retained_key(job.job_id, job.attempt))
            job.revoked = job.attempt
            job.status = "pending"
            if event.retry_at:
                job.retried += 1
                job.retry_at = event.retry_at
                job.failure = None

    @_apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        # Only a revoked attempt's share is still held at its release (any other was freed
        # by its job's terminal event); a repeated release finds nothing left to free.
        worker = self.workers.get(event.worker_id)
        key = retained_key(event.job_id, event.attempt)
        if worker is not None and any(key in d.allocated for d in worker.devices):
            for device in worker.devices:
                device.allocated.pop(key, None)
            self.capacity.index(worker)

    @_apply.register
    def _(self, event: ev.CancelRequested) -> None:
        if job := self.jobs.get(event.job_id):
            job.cancel_requested = True

    def _finish(self, event: ev.Terminal) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.status == "done":
            return
        if event.attempt and event.attempt != job.attempt:
            return  # the outcome of an attempt given up earlier (revoked): stale
        if job.status == "placed" and event.worker_id not in ("", job.worker_id):
            return  # from a placement given up earlier (its worker was lost): stale
        if job.status == "placed":
            self._free(job)
        self.queue.remove(job.job_id)
        job.status = "done"

    @_apply.register
    def _(self, event: ev.JobCompleted) -> None:
        self._finish(event)

    @_apply.register
    def _(self, event: ev.JobFailed) -> None:
        self._finish(event)

    @_apply.register
    def _(self, event: ev.JobTimedOut) -> None:
        self._finish(event)

    @_apply.register
    def _(self, event: ev.JobCancelled) -> None:
        self._finish(event)


_mutator = SchedulerState.__dict__["_apply"].dispatcher.dispatch
"""The `_apply` mutator registered for an event type."""


def retained_key(job_id: str, attempt: int) -> str:
    """The allocation key of a revoked attempt's share (its partitions' label): no job id
    contains a dot, so it never meets a placed job's own key."""
    return f"{job_id}.{attempt}"


def rebuild(path: Path, upto: int | None = None) -> SchedulerState:
    """The state a scheduler log file holds at position `upto` (for tools and tests)."""
    state = SchedulerState()
    for _, data in read_log(path, upto):
        state.apply(decode(data))
    return state
