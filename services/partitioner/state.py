"""One worker's placements as the partitioner knows them, rebuilt from its log.

Every partition of a placement carries the label `<job_id>.<attempt>` (`PartitionJob.label`,
read back by `parse_label`), so a replay finds what a crashed run created.

Placements are fenced by attempt (DESIGN.md rule 9), whatever order this worker's events come
in: only a job's newest attempt is ever created; an older one still to be released waits in
`older` and is released (and reported) like a revoked one; a revocation that comes before its
placement is remembered as a placement known only by it, so the placement is never created
when it comes, and the revoked attempt is reported released all the same (the scheduler holds
its share until then).

Placements are fenced by the scheduler's epoch too (docs/scheduler.md, high availability):
`epoch` is the largest seen in this worker's stream (election markers, placements), and a
placement, revocation or end stamped with a smaller one is a superseded scheduler's: it changes
nothing (`ev.stale`), so a job is never partitioned on two schedulers' word.
"""

from __future__ import annotations

import re
from functools import singledispatchmethod
from typing import Any

import msgspec

from shared import events as ev


def _unknown_spec() -> ev.JobSpec:
    return ev.JobSpec(code_ref="")


class PartitionJob(msgspec.Struct, kw_only=True):
    job_id: str
    user: str
    spec: ev.JobSpec = msgspec.field(default_factory=_unknown_spec)
    """What the placement runs; unknown (empty) for one known only by its revocation."""
    devices: list[int] = []
    tenths: int = 0
    attempt: int
    trace: str = ""
    status: str = "wanted"
    """wanted | ready | failed | released."""
    partition_ids: list[str] = []
    terminal: bool = False
    revoked: bool = False
    """The scheduler gave this placement up (PlacementRevoked): release, report no outcome."""

    @property
    def label(self) -> str:
        """The label every partition of this placement carries, to find them after a crash."""
        return label_of(self.job_id, self.attempt)

    @property
    def needs_partition(self) -> bool:
        return self.status == "wanted" and not self.terminal and not self.revoked

    @property
    def needs_release(self) -> bool:
        return (self.terminal or self.revoked) and self.status in ("wanted", "ready")


class PartitionerState:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.jobs: dict[str, PartitionJob] = {}
        """Each job's newest placement on this worker (perhaps known only by its revocation)."""
        self.older: dict[str, PartitionJob] = {}
        """Placements a newer attempt of their job superseded before they were released, by
        label: revoked, released and reported once, never created."""
        self.epoch = 0
        """The largest scheduler epoch seen (ev.epoch_after)."""
        self.open: dict[str, PartitionJob] = {}
        """The placements of `jobs` that may still need an effect (wanted or ready): what a
        reconcile looks at, so it costs the live placements, not every one kept (`jobs`
        holds each done one for hours, as a fence). Left entries are pruned by `live`."""

    def live(self) -> list[PartitionJob]:
        """The placements of `jobs` still wanted or ready (those done are pruned here)."""
        out = []
        for job_id, job in list(self.open.items()):
            if self.jobs.get(job_id) is job and job.status in OPEN:
                out.append(job)
            else:
                del self.open[job_id]
        return out

    def reindex(self) -> None:
        """Rebuild `open` from `jobs` (after `jobs` was set whole: a snapshot restored)."""
        self.open = {k: job for k, job in self.jobs.items() if job.status in OPEN}

    def _hold(self, job: PartitionJob) -> None:
        self.jobs[job.job_id] = job
        self.open[job.job_id] = job

    def placements(self) -> list[PartitionJob]:
        """Every placement held: the older ones first (their releases go first)."""
        return [*self.older.values(), *self.jobs.values()]

    def find(self, job_id: str, attempt: int) -> PartitionJob | None:
        """The placement of this attempt of the job, if this worker holds it."""
        job = self.jobs.get(job_id)
        if job is not None and job.attempt == attempt:
            return job
        return self.older.get(label_of(job_id, attempt))

    def _supersede(self, job_id: str) -> None:
        """The job's placement gives way to a newer attempt: it is fenced, and kept for its
        release while it may hold partitions."""
        old = self.jobs.pop(job_id, None)
        self.open.pop(job_id, None)
        if old is not None:
            old.revoked = True
            if old.needs_release:
                self.older[old.label] = old

    def apply(self, event: Any) -> None:
        """Change the state by one event: a stale decision (ev.stale) changes nothing."""
        if ev.stale(event, self.epoch):
            return
        self.epoch = ev.epoch_after(self.epoch, event)
        self._apply(event)

    @singledispatchmethod
    def _apply(self, event: Any) -> None:
        pass

    @_apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        job = self.jobs.get(event.job_id)
        if event.worker_id != self.worker_id or (job is not None and job.attempt >= event.attempt):
            return  # a repeat, or an attempt already superseded or revoked
        self._supersede(event.job_id)
        self._hold(
            PartitionJob(
                job_id=event.job_id,
                user=event.user,
                spec=event.spec,
                devices=list(event.devices),
                tenths=event.tenths,
                attempt=event.attempt,
                trace=event.trace,
            )
        )

    @_apply.register
    def _(self, event: ev.PartitionReady) -> None:
        if (job := self.find(event.job_id, event.attempt)) and job.status == "wanted":
            job.status = "ready"
            job.partition_ids = list(event.partition_ids)

    @_apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        if (job := self.find(event.job_id, event.attempt)) and job.status == "wanted":
            job.status = "failed"
            self.older.pop(job.label, None)

    @_apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        if job := self.find(event.job_id, event.attempt):
            job.status = "released"
            self.older.pop(job.label, None)

    @_apply.register
    def _(self, event: ev.PlacementRevoked) -> None:
        if event.worker_id != self.worker_id:
            return
        if job := self.find(event.job_id, event.attempt):
            job.revoked = True
            return
        newest = self.jobs.get(event.job_id)
        if newest is not None and newest.attempt > event.attempt:
            return  # an older attempt this worker no longer holds
        # Revoked before its placement came: known by its revocation alone, never created.
        self._supersede(event.job_id)
        self._hold(
            PartitionJob(
                job_id=event.job_id,
                user=event.user,
                attempt=event.attempt,
                trace=event.trace,
                revoked=True,
            )
        )

    def _terminal(self, event: ev.Terminal) -> None:
        # An end names its attempt; one that does not (written before ends did) is the newest's.
        if event.attempt:
            job = self.find(event.job_id, event.attempt)
        else:
            job = self.jobs.get(event.job_id)
        if job is not None:
            job.terminal = True

    @_apply.register
    def _(self, event: ev.JobCompleted) -> None:
        self._terminal(event)

    @_apply.register
    def _(self, event: ev.JobFailed) -> None:
        self._terminal(event)

    @_apply.register
    def _(self, event: ev.JobTimedOut) -> None:
        self._terminal(event)

    @_apply.register
    def _(self, event: ev.JobCancelled) -> None:
        self._terminal(event)


OPEN = ("wanted", "ready")
"""Statuses of a placement that may still need an effect (a create, a release)."""


def label_of(job_id: str, attempt: int) -> str:
    """The label of every partition of this attempt of the job."""
    return f"{job_id}.{attempt}"


_LABEL = re.compile(r"(?P<job>[A-Za-z0-9_-]{1,64})\.(?P<attempt>[0-9]{1,9})")


def parse_label(label: str | None) -> tuple[str, int] | None:
    """(job_id, attempt) of a partition label `<job_id>.<attempt>`; None for other labels."""
    match = _LABEL.fullmatch(label or "")
    if match is None:
        return None
    return match["job"], int(match["attempt"])
