"""The gateway's job table believes only the current attempt of a job (DESIGN.md rule 9).

A paused worker's events of an attempt the scheduler gave up arrive late by design; the job a
user sees must not go back to PARTITIONED or RUNNING, or end, on them.
"""

from __future__ import annotations

import msgspec

from services.gateway.state import JobTable
from shared import events as ev
from shared.views import JobStatus

SPEC = ev.JobSpec(code_ref="0" * 64)


def placed(attempt: int, worker: str) -> ev.WorkerSelected:
    return ev.WorkerSelected(
        job_id="j1", worker_id=worker, spec=SPEC, devices=[0], tenths=5, attempt=attempt
    )


def test_events_of_an_attempt_given_up_change_nothing() -> None:
    table = JobTable()
    table.apply(ev.JobSubmitted(job_id="j1", spec=SPEC))
    table.apply(placed(1, "w1"))
    table.apply(placed(2, "w2"))  # w1 was lost; attempt 1 revoked
    late = dict(job_id="j1", worker_id="w1", attempt=1)
    table.apply(ev.JobStarted(backend="process", handle="h", **late))  # type: ignore[arg-type]
    table.apply(placed(1, "w1"))  # a late copy of the first placement
    job = table.get("j1")
    assert job is not None
    assert job.status is JobStatus.SCHEDULED
    assert job.attempt == 2
    table.apply(ev.JobCompleted(result=msgspec.Raw(b"1"), **late))  # type: ignore[arg-type]
    assert job.status is JobStatus.SCHEDULED
    assert job.finished_at is None
    current = dict(job_id="j1", worker_id="w2", attempt=2)
    table.apply(ev.JobStarted(backend="process", handle="h", **current))  # type: ignore[arg-type]
    table.apply(ev.JobCompleted(result=msgspec.Raw(b"2"), **current))  # type: ignore[arg-type]
    assert job.status is JobStatus.COMPLETED
    assert bytes(job.result or b"") == b"2"
