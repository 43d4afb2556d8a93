"""The runner's jobs on one worker, rebuilt from its log (events plus internal records).

Jobs are fenced by attempt (DESIGN.md rule 9), whatever order this worker's events come in:
a job's newest attempt alone may run. A revocation that comes before its attempt's partition
is remembered (the job is then known by its revoked attempt, over), so that partition, when it
comes, starts nothing; an attempt revoked or superseded while it may run is killed and cleaned
up (`Discarded` records that) before a newer attempt of its job starts, and reports nothing.

Revocations and cancels are fenced by the scheduler's epoch too (docs/scheduler.md): `epoch` is
the largest seen in this worker's stream (election markers, decisions), and one stamped with a
smaller epoch is a superseded scheduler's: it changes nothing (`ev.stale`).
"""

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


class Discarded(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="cumulus.runner.v1.discarded"
):
    """Internal: a revoked attempt was killed and what it left removed; it reports nothing."""

    job_id: str
    attempt: int


Record = ev.AnyEvent | Launching | LogCursor | Discarded
decode = ev.decoder(Record)
"""Decode one event or internal record of the runner's log (MalformedEvent otherwise)."""


def _unknown_spec() -> ev.JobSpec:
    return ev.JobSpec(code_ref="")


class RunJob(msgspec.Struct, kw_only=True):
    job_id: str
    user: str
    spec: ev.JobSpec = msgspec.field(default_factory=_unknown_spec)
    """What to run; unknown (empty) for an attempt known only by its revocation."""
    attempt: int
    env: dict[str, str] = {}
    partition_ids: list[str] = []
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
    """The scheduler gave this attempt up, or a newer one came: kill it, clean up, report
    nothing."""
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
        self.discarding: dict[str, RunJob] = {}
        """Attempts a newer attempt of their job replaced in `jobs` while they may still run
        (by job id): killed and cleaned up before the newer one starts."""
        self.epoch = 0
        """The largest scheduler epoch seen (ev.epoch_after)."""

    def active(self) -> list[RunJob]:
        return [j for j in self.jobs.values() if j.status != "done"]

    def attempt_of(self, job_id: str, attempt: int) -> RunJob | None:
        """This attempt of the job, if this runner holds it (newest or being discarded)."""
        for job in (self.jobs.get(job_id), self.discarding.get(job_id)):
            if job is not None and job.attempt == attempt:
                return job
        return None

    def _revoke(self, job: RunJob) -> None:
        """Fence `job`: one not launched yet is over; one that may run is to be discarded."""
        if job.status == "done":
            return
        job.revoked = True
        if job.status == "ready":
            job.status = "done"  # nothing was started (its Launching record never came)

    def _supersede(self, job: RunJob | None) -> None:
        """`job` gives way to a newer attempt of its job: fenced, and discarded if it may run."""
        if job is None:
            return
        self._revoke(job)
        if job.status != "done":
            self.discarding[job.job_id] = job

    def apply(self, event: Any) -> None:
        """Change the state by one event or record: a stale decision (ev.stale) changes
        nothing."""
        if ev.stale(event, self.epoch):
            return
        self.epoch = ev.epoch_after(self.epoch, event)
        self._apply(event)

    @singledispatchmethod
    def _apply(self, event: Any) -> None:
        pass

    @_apply.register
    def _(self, event: ev.PartitionReady) -> None:
        job = self.jobs.get(event.job_id)
        if event.worker_id != self.worker_id or (job is not None and job.attempt >= event.attempt):
            return  # a repeat, or an attempt superseded or revoked already (maybe before it came)
        self._supersede(job)
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

    @_apply.register
    def _(self, event: ev.CancelOrdered) -> None:
        job = self.jobs.get(event.job_id)
        if job is None or job.revoked:
            # For the attempt whose partition is still to come.
            self.cancelled_early[event.job_id] = event.reason
        elif job.status != "done":
            job.cancel = True
            job.cancel_reason = event.reason

    @_apply.register
    def _(self, event: ev.PlacementRevoked) -> None:
        if event.worker_id != self.worker_id:
            return
        job = self.jobs.get(event.job_id)
        if job is not None and job.attempt >= event.attempt:
            if job.attempt == event.attempt:
                self._revoke(job)
            return
        # Revoked before its partition came: known by its revocation alone, so that partition
        # starts nothing when it comes. An older attempt still here is fenced too.
        self._supersede(job)
        self.jobs[event.job_id] = RunJob(
            job_id=event.job_id,
            user=event.user,
            attempt=event.attempt,
            trace=event.trace,
            status="done",
            revoked=True,
        )

    @_apply.register
    def _(self, event: Launching) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None and job.attempt == event.attempt and job.status == "ready":
            job.status = "launching"
            job.nonce = event.nonce

    @_apply.register
    def _(self, event: ev.JobStarted) -> None:
        # Applied to a revoked attempt too: discarding it kills it by this handle.
        job = self.attempt_of(event.job_id, event.attempt)
        if job is not None and job.status in ("ready", "launching"):
            job.status = "running"
            job.handle = event.handle
            job.backend = event.backend
            job.started_at = event.ts

    @_apply.register
    def _(self, event: Discarded) -> None:
        if job := self.attempt_of(event.job_id, event.attempt):
            job.status = "done"
        old = self.discarding.get(event.job_id)
        if old is not None and old.attempt == event.attempt:
            del self.discarding[event.job_id]

    @_apply.register
    def _(self, event: LogCursor) -> None:
        if job := self.jobs.get(event.job_id):
            job.seq = event.seq
            job.offsets = dict(event.offsets)
            job.sent_bytes = event.sent_bytes
            job.truncated = event.truncated

    def _finish(self, event: ev.Terminal) -> None:
        if event.attempt:
            job = self.attempt_of(event.job_id, event.attempt)
        else:
            job = self.jobs.get(event.job_id)
        if job is not None:
            job.status = "done"
        self.cancelled_early.pop(event.job_id, None)

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

    @_apply.register
    def _(self, event: ev.JobAttemptFailed) -> None:
        # Its own report that the attempt's code failed: the attempt is over, as with an end.
        job = self.attempt_of(event.job_id, event.attempt)
        if job is not None:
            job.status = "done"
