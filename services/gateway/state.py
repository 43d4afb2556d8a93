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

    def get(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id)

    @singledispatchmethod
    def apply(self, event: Any) -> None:
        """Events the gateway does not track change nothing."""

    @apply.register
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

    @apply.register
    def _(self, event: ev.JobQueued) -> None:
        if job := self._active(event):
            job.status = JobStatus.QUEUED
            job.queue_position = event.position
            job.waiting_reason = event.reason

    @apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        if job := self._active(event):
            job.status = JobStatus.SCHEDULED
            job.worker_id = event.worker_id
            job.devices = list(event.devices)
            job.attempt = event.attempt
            job.queue_position = None
            job.waiting_reason = f"creating a GPU partition on {event.worker_id}"
            job.scheduled_at = event.ts

    @apply.register
    def _(self, event: ev.PartitionReady) -> None:
        if job := self._active(event):
            job.status = JobStatus.PARTITIONED
            job.partition_ids = list(event.partition_ids)
            job.waiting_reason = "starting the job"

    @apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        if job := self._active(event):
            job.status = JobStatus.SUBMITTED
            job.waiting_reason = f"partition failed on {event.worker_id}: {event.message}; retrying"

    @apply.register
    def _(self, event: ev.CancelRequested) -> None:
        if job := self.jobs.get(event.job_id):
            job.cancel_requested = True

    @apply.register
    def _(self, event: ev.JobStarted) -> None:
        if job := self._active(event):
            job.status = JobStatus.RUNNING
            job.started_at = event.ts
            job.waiting_reason = ""

    @apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        if job := self.jobs.get(event.job_id):
            job.partition_released = True

    def _finish(self, event: ev.Terminal) -> JobView | None:
        job = self._active(event)
        if job is not None:
            job.status = JobStatus(event.status)
            job.finished_at = event.ts
            job.queue_position = None
            job.waiting_reason = ""
        return job

    @apply.register
    def _(self, event: ev.JobCompleted) -> None:
        if job := self._finish(event):
            job.result = event.result

    @apply.register
    def _(self, event: ev.JobFailed) -> None:
        if job := self._finish(event):
            job.error_code, job.error_message = event.code, event.message

    @apply.register
    def _(self, event: ev.JobTimedOut) -> None:
        if job := self._finish(event):
            job.error_code, job.error_message = event.code, event.message

    @apply.register
    def _(self, event: ev.JobCancelled) -> None:
        if job := self._finish(event):
            job.error_code, job.error_message = event.code, event.message

    def _active(self, event: ev.JobEvent) -> JobView | None:
        job = self.jobs.get(event.job_id)
        return job if job is not None and job.status in ACTIVE else None
