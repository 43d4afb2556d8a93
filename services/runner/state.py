"""The runner's jobs on one worker, rebuilt from its log (events plus two internal records)."""

from __future__ import annotations

from functools import singledispatchmethod
from typing import Any

import msgspec

from shared import events as ev


class Launching(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="cumulus.runner.v1.launching"
):
    """Internal: the runner is about to start this job with this result nonce."""

    job_id: str
    attempt: int
    nonce: str


class LogCursor(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="cumulus.runner.v1.log_cursor"
):
    """Internal: output consumed so far (bytes of complete lines per stream) and lines sent."""

    job_id: str
    seq: int
    offsets: dict[str, int]
    sent_bytes: int
    truncated: bool = False


Record = ev.AnyEvent | Launching | LogCursor
decode = ev.decoder(Record)
"""Decode one event or internal record of the runner's log (MalformedEvent otherwise)."""


class RunJob(msgspec.Struct, kw_only=True):
    job_id: str
    user: str
    spec: ev.JobSpec
    attempt: int
    env: dict[str, str]
    partition_ids: list[str]
    trace: str = ""
    status: str = "ready"
    """ready | launching | running | done."""
    nonce: str = ""
    handle: str = ""
    backend: str = ""
    started_at: float = 0.0
    cancel: bool = False
    cancel_reason: str = ""
    revoked: bool = False
    """The scheduler gave this placement up: kill it, clean up, report nothing."""
    seq: int = 0
    offsets: dict[str, int] = {}
    sent_bytes: int = 0
    truncated: bool = False


class RunnerState:
    """The jobs of one worker by id; `apply` changes it by one event or record."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.jobs: dict[str, RunJob] = {}
        self.cancelled_early: dict[str, str] = {}
        """Cancels that arrived before the job's partition (job id -> reason)."""

    def active(self) -> list[RunJob]:
        return [j for j in self.jobs.values() if j.status != "done"]

    @singledispatchmethod
    def apply(self, event: Any) -> None:
        pass

    @apply.register
    def _(self, event: ev.PartitionReady) -> None:
        job = self.jobs.get(event.job_id)
        if event.worker_id != self.worker_id or (job is not None and job.attempt >= event.attempt):
            return
        reason = self.cancelled_early.pop(event.job_id, None)
        self.jobs[event.job_id] = RunJob(
            job_id=event.job_id,
            user=event.user,
            spec=event.spec,
            attempt=event.attempt,
            env=dict(event.env),
            partition_ids=list(event.partition_ids),
            trace=event.trace,
            cancel=reason is not None,
            cancel_reason=reason or "",
        )

    @apply.register
    def _(self, event: ev.CancelOrdered) -> None:
        job = self.jobs.get(event.job_id)
        if job is None:
            self.cancelled_early[event.job_id] = event.reason
        elif job.status != "done":
            job.cancel = True
            job.cancel_reason = event.reason

    @apply.register
    def _(self, event: ev.PlacementRevoked) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None and job.attempt == event.attempt and job.status != "done":
            job.revoked = True
            job.status = "done"

    @apply.register
    def _(self, event: Launching) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None and job.attempt == event.attempt and job.status == "ready":
            job.status = "launching"
            job.nonce = event.nonce

    @apply.register
    def _(self, event: ev.JobStarted) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None and job.status in ("ready", "launching"):
            job.status = "running"
            job.handle = event.handle
            job.backend = event.backend
            job.started_at = event.ts

    @apply.register
    def _(self, event: LogCursor) -> None:
        if job := self.jobs.get(event.job_id):
            job.seq = event.seq
            job.offsets = dict(event.offsets)
            job.sent_bytes = event.sent_bytes
            job.truncated = event.truncated

    def _finish(self, event: ev.Terminal) -> None:
        if job := self.jobs.get(event.job_id):
            job.status = "done"
        self.cancelled_early.pop(event.job_id, None)

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
