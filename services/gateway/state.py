"""The gateway's job table: a projection of every job event, rebuilt from the log on start.

It holds every job that is not over and the jobs that ended recently: `forget` drops those that
ended longer ago (config retention.forget_after_s, just before a snapshot); the gateway answers
for them from the job stream (services/gateway/history.py), folding their events with this
same `apply`.

The scheduler's decisions are fenced by its epoch (docs/scheduler.md, high availability):
`epoch` is the largest seen in the job stream (election markers, placements), and a decision
stamped with a smaller one is a superseded scheduler's: the job a user sees does not move on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import singledispatchmethod
from typing import Any

from shared import events as ev
from shared import views
from shared.gpu import GpuRequest
from shared.views import JobInfo, JobStatus

JobView = JobInfo
"""What GetJobStatus answers: the shared view (`shared.views.JobInfo`) the SDK decodes."""

ACTIVE = views.ACTIVE
TERMINAL = views.TERMINAL


class JobTable:
    def __init__(self, jobs: Iterable[JobView] = (), epoch: int = 0) -> None:
        self.jobs: dict[str, JobView] = {}
        self.epoch = epoch
        """The largest scheduler epoch seen (ev.epoch_after)."""
        self._waiting: dict[str, set[str]] = {}
        """user -> ids of its SUBMITTED or QUEUED jobs (policy.max_queued)."""
        for job in jobs:  # a table restored from a snapshot: the waiting sets follow the jobs
            self.jobs[job.job_id] = job
            self._count(job)

    def get(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id)

    def apply(self, event: Any) -> None:
        if ev.stale(event, self.epoch):
            return
        self.epoch = ev.epoch_after(self.epoch, event)
        self._apply(event)
        job = self.jobs.get(getattr(event, "job_id", ""))
        if job is not None:
            self._count(job)

    def _count(self, job: JobView) -> None:
        ids = self._waiting.setdefault(job.user, set())
        if job.status in (JobStatus.SUBMITTED, JobStatus.QUEUED):
            ids.add(job.job_id)
        else:
            ids.discard(job.job_id)

    def forget(self, before: float) -> list[str]:
        """Drop the jobs that ended before `before`; returns their ids.

        Only ended jobs go (an ended job never changes again), so the waiting counts are
        unchanged; users left with nothing waiting leave those counts."""
        gone = [
            job.job_id
            for job in self.jobs.values()
            if job.status in TERMINAL and (job.finished_at or 0.0) < before
        ]
        if gone:  # a new dict: one emptied by `del` keeps its size
            left = set(self.jobs) - set(gone)
            self.jobs = {job_id: job for job_id, job in self.jobs.items() if job_id in left}
        for user in [user for user, ids in self._waiting.items() if not ids]:
            del self._waiting[user]
        return gone

    def waiting(self, user: str) -> int:
        """How many of `user`'s jobs wait (submitted or queued)."""
        return len(self._waiting.get(user, ()))

    @singledispatchmethod
    def _apply(self, event: Any) -> None:
        """Events the gateway does not track change nothing."""

    @_apply.register
    def _(self, event: ev.JobSubmitted) -> None:
        if event.job_id in self.jobs:
            return
        spec = event.spec
        self.jobs[event.job_id] = JobView(
            job_id=event.job_id,
            user=event.user,
            gpu=str(GpuRequest(spec.gpu_tenths)),
            duration_s=spec.duration_s,
            priority=spec.priority,
            entrypoint=spec.entrypoint,
            submitted_at=event.ts,
            waiting_reason="waiting for the scheduler",
            name=spec.name,
            tags=dict(spec.tags),
            target=spec.target,
            retries=spec.retries,
        )

    @_apply.register
    def _(self, event: ev.JobQueued) -> None:
        if job := self._active(event):
            job.status = JobStatus.QUEUED
            job.queue_position = event.position
            job.waiting_reason = event.reason

    @_apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        if (job := self._active(event)) and event.attempt >= job.attempt:
            job.status = JobStatus.SCHEDULED
            job.worker_id = event.worker_id
            job.devices = list(event.devices)
            job.attempt = event.attempt
            job.queue_position = None
            job.waiting_reason = f"creating a GPU partition on {event.worker_id}"
            job.scheduled_at = event.ts

    @_apply.register
    def _(self, event: ev.PartitionReady) -> None:
        if job := self._current(event, event.attempt):
            job.status = JobStatus.PARTITIONED
            job.partition_ids = list(event.partition_ids)
            job.waiting_reason = "starting the job"

    @_apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        if job := self._current(event, event.attempt):
            job.status = JobStatus.SUBMITTED
            job.waiting_reason = f"partition failed on {event.worker_id}: {event.message}; retrying"

    @_apply.register
    def _(self, event: ev.CancelRequested) -> None:
        if job := self.jobs.get(event.job_id):
            job.cancel_requested = True

    @_apply.register
    def _(self, event: ev.JobStarted) -> None:
        if job := self._current(event, event.attempt):
            job.status = JobStatus.RUNNING
            job.started_at = event.ts
            job.waiting_reason = ""

    @_apply.register
    def _(self, event: ev.JobAttemptFailed) -> None:
        job = self._current(event, event.attempt)
        if job is not None and event.worker_id == job.worker_id:
            job.status = JobStatus.SUBMITTED
            job.failed_attempts += 1
            job.waiting_reason = (
                f"attempt {event.attempt} failed ({event.code}: {event.message}); "
                "the scheduler decides whether it runs again"
            )

    @_apply.register
    def _(self, event: ev.PlacementRevoked) -> None:
        # Only a retry's says something to the user (a lost worker's ends the job or is
        # followed by its placement).
        job = self._current(event, event.attempt)
        if job is not None and event.retry_at:
            job.waiting_reason = event.reason

    @_apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        if job := self.jobs.get(event.job_id):
            job.partition_released = True

    def _finish(self, event: ev.Terminal) -> JobView | None:
        """The job an end applies to: only the scheduler's (no worker) or the placed worker's
        end counts, as in the scheduler; another worker's is not believed, nor the end of an
        attempt given up (DESIGN.md rule 9)."""
        job = self._current(event, event.attempt)
        if job is not None and event.worker_id not in ("", job.worker_id):
            return None
        if job is not None:
            job.status = JobStatus(event.status)
            job.finished_at = event.ts
            job.queue_position = None
            job.waiting_reason = ""
        return job

    @_apply.register
    def _(self, event: ev.JobCompleted) -> None:
        if job := self._finish(event):
            job.result = event.result

    @_apply.register
    def _(self, event: ev.JobFailed) -> None:
        if job := self._finish(event):
            job.error_code, job.error_message = event.code, event.message

    @_apply.register
    def _(self, event: ev.JobTimedOut) -> None:
        if job := self._finish(event):
            job.error_code, job.error_message = event.code, event.message

    @_apply.register
    def _(self, event: ev.JobCancelled) -> None:
        if job := self._finish(event):
            job.error_code, job.error_message = event.code, event.message

    def _current(self, event: ev.JobEvent, attempt: int) -> JobView | None:
        """The active job `event` is of, if it is of the job's current attempt (0: of no
        placement, or an event from before attempts were carried: believed as before)."""
        job = self._active(event)
        return job if job is not None and (not attempt or attempt == job.attempt) else None

    def _active(self, event: ev.JobEvent) -> JobView | None:
        job = self.jobs.get(event.job_id)
        return job if job is not None and job.status in ACTIVE else None


def tracked_events() -> list[str]:
    """The names of the job events `JobTable.apply` acts on: what a fold of one job's history
    from the stream reads (its output is not among them)."""
    registry = JobTable.__dict__["_apply"].dispatcher.registry
    return sorted(
        cls.name for cls in registry if isinstance(cls, type) and issubclass(cls, ev.JobEvent)
    )
