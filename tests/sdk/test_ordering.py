"""A job's events and its output come in two streams (JOBS, LOGS): the SDK hands them out in
the order they happened (cumulus/_jobs.py `_Ordered`), and an end only after the output lines
its worker reported, or after LOG_WAIT_S."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.msg import Msg

from cumulus._jobs import LOG_WAIT_S, _Ordered
from shared import events as ev
from shared import subjects

JOB = {"job_id": "j1", "user": "alice", "worker_id": "w1"}


def log(seq: int, n: int) -> ev.JobLog:
    return ev.JobLog(seq=seq, lines=[ev.LogLine("stdout", f"l{seq + i}") for i in range(n)], **JOB)


def completed(lines: int) -> ev.JobCompleted:
    return ev.JobCompleted(result=msgspec.Raw(b'{"ok":true}'), log_lines=lines, **JOB)


def names(out: list[Any]) -> list[str]:
    return [e.name if not isinstance(e, ev.JobLog) else f"log{e.seq}" for e in out]


def test_output_comes_after_the_started_it_belongs_to() -> None:
    order = _Ordered(wait_for_lines=True)
    assert order.take(log(0, 2), 0.0) == []  # replayed before the job's `started`
    started = ev.JobStarted(backend="process", handle="h", **JOB)
    assert names(order.take(started, 0.0)) == ["started", "log0"]
    assert names(order.take(log(2, 1), 0.0)) == ["log2"]


def test_an_end_waits_for_the_lines_its_worker_reported() -> None:
    order = _Ordered(wait_for_lines=True)
    order.take(ev.JobStarted(backend="process", handle="h", **JOB), 0.0)
    assert order.take(completed(3), 0.0) == []  # 3 lines reported, none here yet
    released = ev.PartitionReleased(partition_ids=["p"], **JOB)
    assert order.take(released, 0.1) == []  # later events follow the end
    assert names(order.take(log(0, 2), 0.2)) == ["log0"]
    assert names(order.take(log(2, 1), 0.3)) == ["log2", "completed", "partition_released"]


def test_an_end_waits_no_longer_than_log_wait_s() -> None:
    order = _Ordered(wait_for_lines=True)
    order.take(ev.JobStarted(backend="process", handle="h", **JOB), 0.0)
    assert order.take(completed(5), 10.0) == []
    assert order.take(None, 10.0 + LOG_WAIT_S / 2) == []
    assert names(order.take(None, 10.0 + LOG_WAIT_S)) == ["completed"]  # lines gone: go on


def test_without_output_an_end_is_not_held() -> None:
    order = _Ordered(wait_for_lines=False)
    assert names(order.take(completed(5), 0.0)) == ["completed"]


def test_an_end_without_a_started_still_comes_after_its_lines() -> None:
    """The job's `started` aged out of JOBS (or never came): its lines go out before its end."""
    order = _Ordered(wait_for_lines=True)
    order.take(log(0, 1), 0.0)
    assert names(order.take(completed(1), 0.0)) == ["log0", "completed"]


def _msg(event: ev.JobEvent) -> Msg:
    subject = subjects.job(event.user, event.job_id, event.worker_id, event.name)
    return Msg(_client=None, subject=subject, data=msgspec.json.encode(event))  # type: ignore[arg-type]


def test_a_superseded_schedulers_late_decision_about_the_job_is_not_believed() -> None:
    """Scheduler b (epoch 2) placed the job; scheduler a's failure of it (epoch 1), published
    late, is no end: the user waits for the job's real one."""
    order = _Ordered(wait_for_lines=False)
    spec = ev.JobSpec(code_ref="c")
    placed = ev.WorkerSelected(spec=spec, devices=[0], tenths=5, epoch=2, **JOB)
    assert order.believe(_msg(placed)) is not None
    late = ev.JobFailed(
        code="UNAVAILABLE", message="no workers", epoch=1, job_id="j1", user="alice"
    )
    assert order.believe(_msg(late)) is None
    assert order.believe(_msg(completed(0))) is not None  # the worker's own end (epoch 0)
    newer = ev.JobCancelled(epoch=3, job_id="j1", user="alice")
    assert order.believe(_msg(newer)) is not None
