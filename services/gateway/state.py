"""The gateway's job table: a projection of every job event, rebuilt from the log on start."""

from __future__ import annotations

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
    def __init__(self) -> None:
        self.jobs: dict[str, JobView] = {}
        self._waiting: dict[str, set[str]] = {}
        """user -> ids of its SUBMITTED or QUEUED jobs (policy.max_queued)."""

    def get(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id)

    def apply(self, event: Any) -> None:
        self._apply(event)
        job = self.jobs.get(getattr(event, "job_id", ""))
        if job is not None:
            ids = self._waiting.setdefault(job.user, set())
            if job.status in (JobStatus.SUBMITTED, JobStatus.QUEUED):
                ids.add(job.job_id)
            else:
                ids.discard(job.job_id)

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
        )

    @_apply.register
    def _(self, event: ev.JobQueued) -> None:
        if job := self._active(event):
            job.status = JobStatus.QUEUED
            job.queue_position = event.position
            job.waiting_reason = event.reason

    @_apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        if job := self._active(event):
            job.status = JobStatus.SCHEDULED
            job.worker_id = event.worker_id
            job.devices = list(event.devices)
            job.attempt = event.attempt
            job.queue_position = None
            job.waiting_reason = f"creating a GPU partition on {event.worker_id}"
            job.scheduled_at = event.ts

    @_apply.register
    def _(self, event: ev.PartitionReady) -> None:
        if job := self._active(event):
            job.status = JobStatus.PARTITIONED
            job.partition_ids = list(event.partition_ids)
            job.waiting_reason = "starting the job"

    @_apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        if job := self._active(event):
            job.status = JobStatus.SUBMITTED
            job.waiting_reason = f"partition failed on {event.worker_id}: {event.message}; retrying"

    @_apply.register
    def _(self, event: ev.CancelRequested) -> None:
        if job := self.jobs.get(event.job_id):
            job.cancel_requested = True

    @_apply.register
    def _(self, event: ev.JobStarted) -> None:
        if job := self._active(event):
            job.status = JobStatus.RUNNING
            job.started_at = event.ts
            job.waiting_reason = ""

    @_apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        if job := self.jobs.get(event.job_id):
            job.partition_released = True

    def _finish(self, event: ev.Terminal) -> JobView | None:
        """The job an end applies to: only the scheduler's (no worker) or the placed worker's
        end counts, as in the scheduler; another worker's is not believed."""
        job = self._active(event)
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

    def _active(self, event: ev.JobEvent) -> JobView | None:
        job = self.jobs.get(event.job_id)
        return job if job is not None and job.status in ACTIVE else None
