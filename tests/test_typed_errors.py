"""Errors that cross the gateway API come back typed, with their declared attributes.

A submit too large for the pool is refused by the scheduler's admission check, travels
scheduler -> gateway -> client as a reply, and arrives as `ResourceExhausted` with `requested`
and `largest_free`: two process boundaries, no word of the message read.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import api, subjects
from shared.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    CumulusError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)


def script_package() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("cumulus.json", json.dumps({"kind": "script", "entry": "main.py"}))
        archive.writestr("main.py", "print('hello')\n")
    return buf.getvalue()


@pytest.fixture
async def code_ref(nc: Client) -> str:
    data = script_package()
    ref = hashlib.sha256(data).hexdigest()
    store = await nc.jetstream().object_store(subjects.CODE_BUCKET)
    await store.put(subjects.code_object("default", ref), data)  # as if `default` uploaded it
    return ref


def submit(code_ref: str, gpu: object) -> api.SubmitRequest:
    return api.SubmitRequest(code_ref=code_ref, gpu=gpu, duration=600, entrypoint="main.py")


async def test_resource_exhausted_keeps_requested_and_largest_free(
    nc: Client, code_ref: str
) -> None:
    with pytest.raises(ResourceExhausted) as info:
        await api.request(nc, "submit", submit(code_ref, 8), api.SubmitReply)
    err = info.value
    assert err.message == "No workers with sufficient GPU capacity (requested: 8, max available: 2)"
    assert (err.requested, err.largest_free) == ("8", "2")
    # The client's copy survives pickling (a process pool, a result cache) with its numbers.
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ResourceExhausted
    assert (again.requested, again.largest_free) == ("8", "2")


async def test_the_reply_carries_the_error_in_headers_and_body(nc: Client, code_ref: str) -> None:
    body = msgspec.json.encode(submit(code_ref, 8))
    msg = await nc.request(subjects.api("submit"), body, timeout=10)
    assert msg.headers is not None
    assert msg.headers[ERROR_CODE_HEADER] == "RESOURCE_EXHAUSTED"
    assert msg.headers[ERROR_HEADER].startswith("No workers with sufficient GPU capacity")
    assert json.loads(msg.data) == {
        "error": {
            "code": "RESOURCE_EXHAUSTED",
            "message": msg.headers[ERROR_HEADER],
            "details": {"requested": "8", "largest_free": "2", "permanent": True},
        }
    }


async def test_invalid_gpu_amount_names_its_field(nc: Client, code_ref: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await api.request(nc, "submit", submit(code_ref, 2.3), api.SubmitReply)
    assert info.value.field == "gpu"
    assert info.value.message == "Invalid GPU amount: 2.3. Must be 0.1-0.9 or whole number 1-8"


async def test_unknown_job_is_not_found(nc: Client) -> None:
    with pytest.raises(NotFound) as info:
        await api.request(nc, "status", api.JobRef(job_id="never-made-typed"), dict)
    assert info.value.code == "NOT_FOUND"
    assert "never-made-typed" in info.value.message


async def test_a_reply_without_details_still_types_the_error(nc: Client) -> None:
    """An older service answers with the headers only: the code alone picks the class."""

    async def old_service(msg: Msg) -> None:
        headers = {ERROR_CODE_HEADER: "NOT_FOUND", ERROR_HEADER: "gone"}
        await nc.publish(msg.reply, b"", headers=headers)

    sub = await nc.subscribe("typed-errors.old-api", cb=old_service)
    try:
        with pytest.raises(NotFound) as info:
            await api.request(nc, "typed-errors.old-api", {}, dict, timeout=10)
    finally:
        await sub.unsubscribe()
    assert (info.value.message, info.value.resource_id) == ("gone", "")
    with pytest.raises(CumulusError) as teapot:
        await _answer_with(nc, {ERROR_CODE_HEADER: "TEAPOT", ERROR_HEADER: "short"}, b"[1]")
    assert (type(teapot.value).__name__, teapot.value.message) == ("Internal", "short")


async def _answer_with(nc: Client, headers: dict[str, str], body: bytes) -> None:
    async def service(msg: Msg) -> None:
        await nc.publish(msg.reply, body, headers=headers)

    sub = await nc.subscribe("typed-errors.any-api", cb=service)
    try:
        await api.request(nc, "typed-errors.any-api", {}, dict, timeout=10)
    finally:
        await sub.unsubscribe()
