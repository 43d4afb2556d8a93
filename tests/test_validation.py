"""Bad input gets the seed's code and message; nothing is lost and the services keep serving."""

from __future__ import annotations

import json

import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from cumulus import AsyncClient, CumulusError, package_function
from services.stack import Stack
from shared import api, subjects

BAD_AMOUNTS = [
    0, 2.3, 0.1482, 1.5, 9, -1, float("nan"), "abc", "NaN", True, None, "1e999999", "1e-999999"
]  # fmt: skip


def one() -> int:
    return 1


@pytest.fixture
async def code_ref(client: AsyncClient) -> str:
    return await client.upload(package_function(one))


@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
async def test_invalid_gpu_amount_is_rejected_with_the_seed_message(
    nc: Client, code_ref: str, amount: object
) -> None:
    body = {"code_ref": code_ref, "gpu": amount, "duration": 600}
    # Python's json writes NaN as the bare token NaN, as other clients may.
    msg = await nc.request(subjects.api("submit"), json.dumps(body).encode(), timeout=5)
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "INVALID_ARGUMENT"
    shown = "nan" if amount != amount else amount  # noqa: PLR0124 (NaN check)
    assert msg.headers["Nats-Service-Error"] == (
        f"Invalid GPU amount: {shown}. Must be 0.1-0.9 or whole number 1-8"
    )


@pytest.mark.parametrize("duration", [59, 86401, 0, -5, "abc", 60.5])
async def test_invalid_duration_is_rejected(
    client: AsyncClient, code_ref: str, duration: object
) -> None:
    request = api.SubmitRequest(code_ref=code_ref, gpu=0.5, duration=duration)
    with pytest.raises(CumulusError) as info:
        await api.request(client.nc, "submit", request, api.SubmitReply)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.message == f"Invalid duration: {duration}. Must be 60-86400 seconds"


@pytest.mark.parametrize("amount", [float("nan"), 2.3, "abc"], ids=repr)
async def test_sdk_rejects_bad_amounts_before_uploading(
    client: AsyncClient, amount: object
) -> None:
    with pytest.raises(CumulusError) as info:
        await client.submit(one, gpu=amount, duration=600)  # type: ignore[arg-type]
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.message.startswith(f"Invalid GPU amount: {amount}.")


async def test_rejected_submissions_leave_no_job_behind(client: AsyncClient, code_ref: str) -> None:
    request = api.SubmitRequest(code_ref=code_ref, gpu=2.3, duration=600, job_id="never-made")
    with pytest.raises(CumulusError):
        await api.request(client.nc, "submit", request, api.SubmitReply)
    with pytest.raises(CumulusError) as info:
        await api.request(client.nc, "status", api.JobRef(job_id="never-made"), dict)
    assert info.value.code == "NOT_FOUND"


async def test_malformed_requests_and_unknown_code_are_invalid_argument(nc: Client) -> None:
    msg = await nc.request(subjects.api("submit"), b"{not json", timeout=5)
    assert msg.headers
    assert msg.headers["Nats-Service-Error-Code"] == "INVALID_ARGUMENT"
    body = json.dumps({"code_ref": "0" * 64, "gpu": 0.5, "duration": 600}).encode()
    msg = await nc.request(subjects.api("submit"), body, timeout=5)
    assert msg.headers
    assert msg.headers["Nats-Service-Error-Code"] == "INVALID_ARGUMENT"
    assert "not found in the object store" in msg.headers["Nats-Service-Error"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"code_ref": "x", "gpu": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"code_ref": "x", "env": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}",
        b'{"code_ref": "x", "gpu": 0.5, "duration": ' + b"9" * 5_000 + b"}",
    ],
    ids=["deep list", "deep object", "huge number"],
)
async def test_pathological_bodies_are_invalid_argument_and_the_gateway_keeps_serving(
    nc: Client, client: AsyncClient, body: bytes
) -> None:
    msg = await nc.request(subjects.api("submit"), body, timeout=10)
    assert msg.headers
    assert msg.headers["Nats-Service-Error-Code"] == "INVALID_ARGUMENT"
    assert len(msg.headers["Nats-Service-Error"]) < 300  # the value is quoted, not echoed
    assert await client.run(one, gpu=0.1, duration=600, logs=None, timeout=60) == 1


async def test_too_many_gpus_for_the_pool_is_resource_exhausted(client: AsyncClient) -> None:
    with pytest.raises(CumulusError) as info:
        await client.run(one, gpu=8, duration=600, logs=None, timeout=30)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert info.value.message == (
        "No workers with sufficient GPU capacity (requested: 8, max available: 2)"
    )


async def test_malformed_event_is_set_aside_and_services_keep_serving(
    stack: Stack, client: AsyncClient, nc: Client
) -> None:
    js = nc.jetstream()
    # Only what is set aside from now on: other tests of the session stack set aside theirs.
    dead = await js.subscribe(
        "cumulus.dead.>",
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    # Garbage on subjects the scheduler, partitioner and runner each consume.
    for subject in (
        subjects.job("mallory", "junk1", "", "submitted"),
        subjects.job("mallory", "junk2", "worker-1", "scheduled"),
        subjects.job("mallory", "junk3", "worker-1", "partition_ready"),
    ):
        await js.publish(subject, b"\x00 this is not an event")
    services = set()
    for _ in range(10):
        try:
            msg = await dead.next_msg(timeout=5)
        except TimeoutError:
            break
        assert msg.data == b"\x00 this is not an event"
        services.add(msg.subject.rsplit(".", 1)[1])
        if services >= {"gateway", "scheduler", "partitioner", "runner"}:
            break
    assert services >= {"gateway", "scheduler", "partitioner", "runner"}
    assert await client.run(one, gpu=0.2, duration=600, logs=None, timeout=60) == 1
    for name, proc in stack.procs.items():
        assert proc.alive(), f"{name} died"
