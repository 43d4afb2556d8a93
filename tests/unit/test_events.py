"""The event catalog as a wire format: what `nats sub 'jobs.>'` shows and what a reader accepts."""

from __future__ import annotations

import json

import msgspec
import pytest

from shared import events as ev
from shared.errors import InvalidArgument, NotFound

SPEC = ev.JobSpec(code_ref="ab" * 32, entrypoint="train.py", requirements=["numpy"], env={"A": "1"})
JOB = {"job_id": "job1", "user": "alice", "worker_id": "w1", "trace": "00-abc-def-01"}

SAMPLES: list[tuple[ev.Event, str]] = [
    (ev.JobSubmitted(spec=SPEC, **JOB), "cumulus.job.v1.submitted"),
    (ev.JobQueued(position=3, reason="no capacity", **JOB), "cumulus.job.v1.queued"),
    (
        ev.WorkerSelected(spec=SPEC, devices=[0, 1], tenths=20, attempt=2, **JOB),
        "cumulus.job.v1.scheduled",
    ),
    (
        ev.PartitionReady(
            spec=SPEC, partition_ids=["p1"], devices=[1], env={"X": "y"}, expires_at=1.5, **JOB
        ),
        "cumulus.job.v1.partition_ready",
    ),
    (ev.PartitionFailed(code="INTERNAL", message="boom", **JOB), "cumulus.job.v1.partition_failed"),
    (ev.PartitionReleased(partition_ids=["p1", "p2"], **JOB), "cumulus.job.v1.partition_released"),
    (ev.CancelRequested(reason="changed my mind", **JOB), "cumulus.job.v1.cancel_requested"),
    (ev.CancelOrdered(**JOB), "cumulus.job.v1.cancel"),
    (ev.PlacementRevoked(attempt=1, reason="worker w1 lost", **JOB), "cumulus.job.v1.revoked"),
    (ev.JobStarted(backend="process", handle="1234", **JOB), "cumulus.job.v1.started"),
    (
        ev.JobAttemptFailed(attempt=1, code="INTERNAL", message="ValueError: x", **JOB),
        "cumulus.job.v1.attempt_failed",
    ),
    (
        ev.JobLog(
            seq=7, lines=[ev.LogLine("stdout", "hi"), ev.LogLine("stderr", "ünïcode")], **JOB
        ),
        "cumulus.job.v1.log",
    ),
    (
        ev.JobResultPart(attempt=1, index=0, count=2, data=b"\x00\xffpart", **JOB),
        "cumulus.job.v1.result",
    ),
    (
        ev.JobOutputsPart(attempt=1, index=0, count=1, data=b"\x1f\x8btar", **JOB),
        "cumulus.job.v1.outputs",
    ),
    (
        ev.JobCompleted(result=msgspec.Raw(b'{"ok":true,"data":[1,2]}'), runtime_s=2.5, **JOB),
        "cumulus.job.v1.completed",
    ),
    (
        ev.JobFailed(code="INTERNAL", message="ValueError: x", traceback="Traceback...", **JOB),
        "cumulus.job.v1.failed",
    ),
    (
        ev.JobTimedOut(message="Job exceeded allocated duration of 60 seconds", **JOB),
        "cumulus.job.v1.timed_out",
    ),
    (ev.JobCancelled(**JOB), "cumulus.job.v1.cancelled"),
    (
        ev.WorkerRegistered(
            worker_id="w1",
            hostname="gpu-01",
            devices=[ev.DeviceInfo(index=0, name="A100", memory_bytes=2**34)],
            labels={"zone": "a"},
        ),
        "cumulus.worker.v1.registered",
    ),
    (ev.WorkerHeartbeat(worker_id="w1", interval_s=2.0), "cumulus.worker.v1.heartbeat"),
    (ev.WorkerDeregistered(worker_id="w1", reason="drained"), "cumulus.worker.v1.deregistered"),
    (ev.WorkerLost(worker_id="w1", reason="no heartbeat for 16 s"), "cumulus.worker.v1.lost"),
    (
        ev.WorkerNodeObserved(
            worker_id="w1",
            node_id="n1",
            state="ready",
            availability="drain",
            labels={"gpu.count": "2"},
        ),
        "cumulus.worker.v1.node",
    ),
]
IDS = [type(e).__name__ for e, _ in SAMPLES]


def test_samples_cover_every_event_type() -> None:
    covered = {type(e) for e, _ in SAMPLES}
    assert covered == set(ev.JOB_EVENT_TYPES) | set(ev.WORKER_EVENT_TYPES)


@pytest.mark.parametrize(("event", "tag"), SAMPLES, ids=IDS)
def test_event_round_trips_as_readable_json_with_its_type_tag(event: ev.Event, tag: str) -> None:
    data = ev.encode(event)
    as_json = json.loads(data)
    assert as_json["type"] == tag
    assert as_json["event_id"] == event.event_id
    back = ev.decode(data)
    assert type(back) is type(event)
    assert back == event


@pytest.mark.parametrize(("event", "tag"), SAMPLES, ids=IDS)
def test_unknown_fields_are_ignored_so_an_old_reader_survives(event: ev.Event, tag: str) -> None:
    as_json = json.loads(ev.encode(event))
    as_json["added_in_v2"] = {"nested": [1, 2, 3]}
    back = ev.decode(json.dumps(as_json).encode())
    assert type(back) is type(event)
    # compared as JSON: a Raw result keeps the sender's spacing
    assert json.loads(ev.encode(back)) == json.loads(ev.encode(event))


def test_each_event_gets_its_own_id_and_a_timestamp() -> None:
    a = ev.JobCancelled(job_id="j")
    b = ev.JobCancelled(job_id="j")
    assert a.event_id != b.event_id
    assert a.ts > 0


def test_a_job_without_a_worker_has_empty_worker_id() -> None:
    data = b'{"type":"cumulus.job.v1.cancel_requested","job_id":"j1"}'
    event = ev.decode(data)
    assert isinstance(event, ev.CancelRequested)
    assert (event.job_id, event.user, event.worker_id) == ("j1", "default", "")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"not json at all", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"type":"cumulus.job.v9.exploded","job_id":"j1"}', id="unknown-tag"),
        pytest.param(b'{"job_id":"j1","reason":"x"}', id="no-tag"),
        pytest.param(
            b'{"type":"cumulus.job.v1.queued","job_id":"j1","reason":"x"}', id="missing-position"
        ),
        pytest.param(b'{"type":"cumulus.job.v1.cancel","user":"alice"}', id="missing-job-id"),
        pytest.param(
            b'{"type":"cumulus.job.v1.queued","job_id":"j1","position":"first","reason":"x"}',
            id="wrong-type",
        ),
        pytest.param(b"[1, 2, 3]", id="array"),
    ],
)
def test_malformed_input_raises_malformed_event(data: bytes) -> None:
    with pytest.raises(ev.MalformedEvent, match="malformed event"):
        ev.decode(data)


def test_malformed_event_is_an_invalid_argument() -> None:
    with pytest.raises(ev.MalformedEvent) as info:
        ev.decode(b"{")
    assert info.value.code == "INVALID_ARGUMENT"


def test_failure_of_reports_the_error_for_the_job() -> None:
    job = ev.JobSubmitted(spec=SPEC, **JOB)
    failed = ev.failure_of(NotFound("No code package abc"), job, traceback="tb")
    assert isinstance(failed, ev.JobFailed)
    assert (failed.job_id, failed.user, failed.worker_id, failed.trace) == (
        "job1",
        "alice",
        "w1",
        "00-abc-def-01",
    )
    assert (failed.code, failed.message, failed.traceback) == (
        "NOT_FOUND",
        "No code package abc",
        "tb",
    )
    assert failed.status == "FAILED"
    assert failed.event_id != job.event_id


def test_failure_of_can_name_another_worker() -> None:
    job = ev.JobQueued(position=1, reason="full", **JOB)
    failed = ev.failure_of(InvalidArgument("bad"), job, worker_id="w2")
    assert (failed.worker_id, failed.code, failed.message) == ("w2", "INVALID_ARGUMENT", "bad")


def test_failure_round_trips() -> None:
    job = ev.JobSubmitted(spec=SPEC, **JOB)
    failed = ev.failure_of(InvalidArgument("bad"), job)
    assert ev.decode(ev.encode(failed)) == failed


def test_an_event_nested_too_deeply_is_malformed_not_a_crash() -> None:
    deep = b'{"type": "cumulus.job.v1.submitted", "extra": ' + b"[" * 50_000 + b"]" * 50_000
    with pytest.raises(ev.MalformedEvent, match="nested too deeply"):
        ev.decode(deep + b"}")
