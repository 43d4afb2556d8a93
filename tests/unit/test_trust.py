"""An event is believed only if its body says what its subject says (shared/trust.py), and a
worker gets only consumers over its own subjects (shared/bus.py consumer_refusal)."""

from __future__ import annotations

import msgspec
import pytest

from shared import bus, subjects, trust
from shared import events as ev


def completed(**fields: str) -> ev.JobCompleted:
    base = {"job_id": "j1", "user": "alice", "worker_id": "w1"}
    return ev.JobCompleted(result=msgspec.Raw(b'{"ok":true}'), **{**base, **fields})


def test_an_event_that_agrees_with_its_subject_is_believed() -> None:
    event = completed()
    assert trust.disagreement(subjects.job("alice", "j1", "w1", "completed"), event) == ""


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("jobs.bob.j1.w1.completed", "job alice/j1 in the body"),
        ("jobs.alice.j2.w1.completed", "job alice/j1 in the body"),
        ("jobs.alice.j1.w2.completed", "worker 'w1' in the body"),
        ("jobs.alice.j1.w1.failed", "a completed event on a failed subject"),
        ("workers.w1.completed", "outside jobs"),
    ],
)
def test_an_event_that_disagrees_is_not_believed(subject: str, why: str) -> None:
    assert why in trust.disagreement(subject, completed())


def test_a_workers_event_without_a_worker_is_not_believed() -> None:
    event = completed(worker_id="")
    assert "without its worker" in trust.disagreement("jobs.alice.j1._.completed", event)


def test_a_worker_event_must_name_its_own_worker() -> None:
    beat = ev.WorkerHeartbeat(worker_id="w1")
    assert trust.disagreement("workers.w1.heartbeat", beat) == ""
    assert "worker 'w1' in the body" in trust.disagreement("workers.evil.heartbeat", beat)


def test_a_worker_gets_only_its_own_consumers_over_its_own_subjects() -> None:
    own = bus.ConsumerRequest(
        stream="JOBS", durable="runner-w1", filters=["jobs.*.*.w1.partition_ready"]
    )
    assert bus.consumer_refusal("w1", own) == ""
    for durable, filters in (
        ("runner-w2", ["jobs.*.*.w2.partition_ready"]),
        ("runner-w1", ["jobs.alice.j1.>"]),
        ("runner-w1", ["jobs.*.*.w2.partition_ready"]),
        ("runner-w1", ["jobs.*.*.w1.>"]),
        ("scheduler-jobs", ["jobs.*.*.w1.partition_ready"]),
        ("runner-w1", []),
    ):
        request = bus.ConsumerRequest(stream="JOBS", durable=durable, filters=filters)
        assert bus.consumer_refusal("w1", request), (durable, filters)
    other_stream = bus.ConsumerRequest(
        stream="WORKERS", durable="runner-w1", filters=["jobs.*.*.w1.started"]
    )
    assert bus.consumer_refusal("w1", other_stream)
