"""The one error tree: declared attributes, the wire shape, rebuilding and pickling."""

from __future__ import annotations

import json
import pickle

import pytest

import cumulus_core
from services.partitioner.chronos import ChronosError, ChronosUnreachable
from shared import errors
from shared.errors import (
    CODES,
    ApiUnreachable,
    CumulusError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PartitionFailed,
    ResourceExhausted,
    Unavailable,
)

SAMPLES: list[CumulusError] = [
    errors.resources_exhausted("8", "2"),
    errors.ssh_failed("gpu-1"),
    errors.partition_failed("Not enough available capacity on device 0"),
    errors.deadline_exceeded(600),
    errors.invalid_duration(59),
    errors.InvalidGpuAmount(2.3),
    NotFound("Job j1 not found", resource_id="j1"),
    ApiUnreachable(
        "Cumulus API cumulus.api.default.submit did not answer",
        subject="cumulus.api.default.submit",
    ),
    errors.EventLogError("cannot write /data/x.sqlite", path="/data/x.sqlite"),
    errors.ConfigError("scheduler.backfill: 'greedy!'", key="scheduler.backfill", allowed=("a",)),
    Internal("boom", job_id="j9", remote_traceback="Traceback ..."),
]


def test_declared_attributes_are_plain_attributes() -> None:
    err = errors.resources_exhausted("8", "2")
    assert (err.requested, err.largest_free) == ("8", "2")
    assert err.message == "No workers with sufficient GPU capacity (requested: 8, max available: 2)"
    assert errors.ssh_failed("gpu-1").worker_id == "gpu-1"
    assert errors.ssh_failed().message == (
        "Failed to create Chronos partition on worker: SSH connection failed"
    )
    assert errors.partition_failed("x").detail == "x"
    assert errors.deadline_exceeded(600).duration_s == 600
    with pytest.raises(AttributeError):
        _ = errors.Unavailable("x").requested  # type: ignore[attr-defined]


@pytest.mark.parametrize("err", SAMPLES, ids=lambda e: type(e).__name__)
def test_to_dict_is_json_and_from_dict_rebuilds_the_code_and_attributes(err: CumulusError) -> None:
    wire = json.loads(json.dumps(err.to_dict()))
    assert wire["code"] == err.code
    assert wire["message"] == err.message
    assert wire["details"] == json.loads(json.dumps(err.details()))
    back = CumulusError.from_dict(wire)
    assert back.code == err.code
    assert back.message == err.message
    assert isinstance(err, type(back))  # the class of its code (subclasses travel as their base)
    for name, value in back.details().items():
        assert getattr(err, name) == value or list(getattr(err, name)) == value


@pytest.mark.parametrize("err", SAMPLES, ids=lambda e: type(e).__name__)
def test_pickling_keeps_the_code_message_and_attributes(err: CumulusError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, CumulusError)
    assert (back.code, back.message) == (err.code, err.message)
    assert back.details() == CumulusError.from_dict(err.to_dict()).details()


def test_resource_exhausted_survives_pickling_with_its_numbers() -> None:
    back = pickle.loads(pickle.dumps(errors.resources_exhausted("0.5", "0.3")))
    assert type(back) is ResourceExhausted
    assert (back.requested, back.largest_free) == ("0.5", "0.3")


def test_from_code_types_every_seed_code() -> None:
    assert {CumulusError.from_code(code, "m").code for code in CODES} == set(CODES)
    assert type(CumulusError.from_code("UNAVAILABLE", "m", {"worker_id": "w"})) is Unavailable
    assert CumulusError.from_code("NOT_FOUND", "m", {"resource_id": "p1"}).resource_id == "p1"  # type: ignore[attr-defined]


def test_unknown_code_is_internal_and_keeps_the_message() -> None:
    err = CumulusError.from_code("TEAPOT", "short and stout", {"spout": 1})
    assert type(err) is Internal
    assert (err.code, err.message, err.details()) == ("INTERNAL", "short and stout", {})


def test_unknown_and_ill_typed_details_are_dropped_not_fatal() -> None:
    err = CumulusError.from_code(
        "RESOURCE_EXHAUSTED", "m", {"requested": "8", "largest_free": "2", "colour": "blue"}
    )
    assert isinstance(err, ResourceExhausted)
    assert (err.requested, err.largest_free) == ("8", "2")
    assert not hasattr(err, "colour")
    # A peer that sends a detail this class does not take as a keyword still gets the type.
    odd = CumulusError.from_code("INVALID_ARGUMENT", "m", {"field": "gpu", "job_id": None})
    assert isinstance(odd, InvalidArgument)
    assert odd.message == "m"
    assert type(CumulusError.from_dict({})) is Internal
    assert CumulusError.from_dict({"code": "NOT_FOUND", "message": "m", "details": [1]}).code == (
        "NOT_FOUND"
    )


def test_job_id_and_remote_traceback_travel_with_every_error() -> None:
    err = DeadlineExceeded("late", duration_s=60, job_id="j1", remote_traceback="tb")
    back = CumulusError.from_dict(err.to_dict())
    assert isinstance(back, DeadlineExceeded)
    assert (back.job_id, back.remote_traceback, back.duration_s) == ("j1", "tb", 60)


def test_partition_failed_is_internal() -> None:
    err = errors.partition_failed("no capacity")
    assert isinstance(err, PartitionFailed)
    assert err.code == "INTERNAL"
    assert err.message == "Chronos partition creation failed: no capacity"


def test_chronos_driver_errors_live_in_the_shared_tree() -> None:
    assert ChronosError is CumulusError
    assert issubclass(ChronosUnreachable, Unavailable)
    err = ChronosUnreachable("SSH connection to root@h:22 failed: refused", worker_id="w1")
    assert (err.code, err.worker_id) == ("UNAVAILABLE", "w1")


@pytest.mark.parametrize(
    ("err", "code", "details"),
    [
        (cumulus_core.NotFound("partition_0042"), "NOT_FOUND", {"partition_id": "partition_0042"}),
        (
            cumulus_core.InsufficientCapacity(0, 5, 2),
            "RESOURCE_EXHAUSTED",
            {"device": 0, "requested_tenths": 5, "free_tenths": 2},
        ),
        (
            cumulus_core.InvalidDevice(2, 2),
            "INVALID_ARGUMENT",
            {"device": 2, "device_count": 2},
        ),
        (cumulus_core.InvalidAmount("0.25"), "INVALID_ARGUMENT", {"amount": "0.25"}),
        (cumulus_core.AmountExceedsDevice(20, "2"), "INVALID_ARGUMENT", {"tenths": 20}),
        (cumulus_core.InvalidDuration("1.5"), "INVALID_ARGUMENT", {"duration_s": "1.5"}),
        (cumulus_core.InvalidLabel(""), "INVALID_ARGUMENT", {"label": ""}),
        (cumulus_core.InvalidDeviceSpec("2xlots", "bad"), "INVALID_ARGUMENT", {"spec": "2xlots"}),
        (
            cumulus_core.DeviceUnavailable("nvidia", "no driver"),
            "UNAVAILABLE",
            {"backend": "nvidia"},
        ),
        (cumulus_core.StateError("/s", "bad"), "INTERNAL", {"path": "/s"}),
        (
            cumulus_core.StateRecovered("/s", "/s.corrupt", "bad"),
            "UNAVAILABLE",
            {"path": "/s", "moved_to": "/s.corrupt"},
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "",
)
def test_cumulus_core_errors_carry_their_attributes(
    err: cumulus_core.ChronosError, code: str, details: dict[str, object]
) -> None:
    assert err.details() == details
    wire = json.loads(json.dumps(err.to_dict()))
    assert wire == {"code": code, "message": str(err), "details": details}
    assert CumulusError.from_dict(wire).code == code


def test_a_job_end_becomes_the_typed_error_with_its_data() -> None:
    """What the SDK raises from `job.result()`: the worker a lost job ran on, the duration a
    timed-out job had, the job id; what a class does not declare is dropped."""
    from cumulus._jobs import job_error
    from shared import events as ev

    lost = job_error(
        ev.JobFailed(
            job_id="j1", user="u", worker_id="w7", code="UNAVAILABLE", message="worker w7 lost"
        )
    )
    assert isinstance(lost, Unavailable)
    assert (lost.worker_id, lost.job_id) == ("w7", "j1")

    failed = job_error(
        ev.JobFailed(job_id="j2", user="u", worker_id="w7", code="INTERNAL", message="boom")
    )
    assert type(failed) is Internal
    assert not hasattr(failed, "worker_id")

    late = job_error(
        ev.JobTimedOut(job_id="j3", user="u", worker_id="w7", message="late", duration_s=90)
    )
    assert isinstance(late, DeadlineExceeded)
    assert (late.duration_s, late.job_id) == (90, "j3")
