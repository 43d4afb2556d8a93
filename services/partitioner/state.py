"""One worker's placements as the partitioner knows them, rebuilt from its log.

Every partition of a placement carries the label `<job_id>.<attempt>` (`PartitionJob.label`,
read back by `parse_label`), so a replay finds what a crashed run created.
"""

from __future__ import annotations

import re
from functools import singledispatchmethod
from typing import Any

import msgspec

from shared import events as ev


class PartitionJob(msgspec.Struct, kw_only=True):
    job_id: str
    user: str
    spec: ev.JobSpec
    devices: list[int]
    tenths: int
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
        return f"{self.job_id}.{self.attempt}"

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

    @singledispatchmethod
    def apply(self, event: Any) -> None:
        pass

    @apply.register
    def _(self, event: ev.WorkerSelected) -> None:
        job = self.jobs.get(event.job_id)
        if event.worker_id != self.worker_id or (job is not None and job.attempt >= event.attempt):
            return
        self.jobs[event.job_id] = PartitionJob(
            job_id=event.job_id,
            user=event.user,
            spec=event.spec,
            devices=list(event.devices),
            tenths=event.tenths,
            attempt=event.attempt,
            trace=event.trace,
        )

    @apply.register
    def _(self, event: ev.PartitionReady) -> None:
        if (job := self._current(event)) and job.status == "wanted":
            job.status = "ready"
            job.partition_ids = list(event.partition_ids)

    @apply.register
    def _(self, event: ev.PartitionFailed) -> None:
        if (job := self._current(event)) and job.status == "wanted":
            job.status = "failed"

    @apply.register
    def _(self, event: ev.PartitionReleased) -> None:
        if job := self._current(event):
            job.status = "released"

    @apply.register
    def _(self, event: ev.PlacementRevoked) -> None:
        if job := self._current(event):
            job.revoked = True

    def _terminal(self, event: ev.Terminal) -> None:
        job = self.jobs.get(event.job_id)
        if job is not None:
            job.terminal = True

    @apply.register
    def _(self, event: ev.JobCompleted) -> None:
        self._terminal(event)

    @apply.register
    def _(self, event: ev.JobFailed) -> None:
        self._terminal(event)

    @apply.register
    def _(self, event: ev.JobTimedOut) -> None:
        self._terminal(event)

    @apply.register
    def _(self, event: ev.JobCancelled) -> None:
        self._terminal(event)

    def _current(self, event: Any) -> PartitionJob | None:
        job = self.jobs.get(event.job_id)
        if job is None or job.attempt != getattr(event, "attempt", job.attempt):
            return None
        return job


_LABEL = re.compile(r"(?P<job>[A-Za-z0-9_-]{1,64})\.(?P<attempt>[0-9]{1,9})")


def parse_label(label: str | None) -> tuple[str, int] | None:
    """(job_id, attempt) of a partition label `<job_id>.<attempt>`; None for other labels."""
    match = _LABEL.fullmatch(label or "")
    if match is None:
        return None
    return match["job"], int(match["attempt"])
