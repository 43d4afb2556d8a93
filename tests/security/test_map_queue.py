"""Attacks on a warm map's input queue and answers (docs/map.md): another user can neither
feed a victim's map, nor read its inputs or answers, nor take them off its queue; the
victim's map answers every input with its own values."""

from __future__ import annotations

import asyncio
import time

import cloudpickle
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient
from services.runner.mapfeed import MapChunk
from services.stack import Stack
from shared import subjects
from shared.views import JobInfo
from tests.security.conftest import Identity, publish_denied, receives_nothing


def triple(x: int) -> int:
    import time as _time

    _time.sleep(0.1)
    return 3 * x


async def _running_map(client: AsyncClient, before: set[str]) -> JobInfo:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [j for j in await client.jobs(status=["RUNNING"]) if j.job_id not in before]
        if running:
            return running[0]
        await asyncio.sleep(0.2)
    raise AssertionError("the victim's map never ran")


async def test_bob_cannot_feed_read_or_drain_alices_map(
    stack: Stack, alice: AsyncClient, identity: object, admin: NatsClient
) -> None:
    before = {j.job_id for j in await alice.jobs(limit=1000)}
    victim = asyncio.create_task(
        alice.map(triple, range(40), gpu=0.1, duration=600, warm=1, timeout=120)
    )
    job = await _running_map(alice, before)
    queue = subjects.map_input("alice", job.job_id)
    forged = msgspec.msgpack.encode(MapChunk(first=0, inputs=[cloudpickle.dumps(((0,), {}))]))
    attacker: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
    # Feeding alice's queue (a forged chunk, or her end marker to cut her map short).
    await publish_denied(attacker, admin, queue, forged)
    await publish_denied(attacker, admin, queue, b"")
    # Reading her inputs or her answers.
    for subject in (queue, "mapin.>", f"results.alice.{job.job_id}.>", "results.>"):
        reader: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
        await receives_nothing(reader, subject)
    # Taking inputs off her queue (a worker's pull) or reading its state.
    thief: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
    consumer = subjects.map_consumer(job.job_id)
    for api in ("MSG.NEXT", "INFO", "DELETE"):
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await thief.nc.request(
                f"$JS.API.CONSUMER.{api}.{subjects.MAPIN_STREAM}.{consumer}",
                b'{"batch": 1}',
                timeout=1.0,
            )
    assert await thief.violations()
    # Through the gateway's replay: a filter under alice's results is refused.
    async with AsyncClient(profile=stack.profile("bob")) as bob:
        from shared.errors import InvalidArgument

        with pytest.raises(InvalidArgument):
            await bob._call(
                "watch",
                {"filter": f"results.alice.{job.job_id}.>", "deliver": bob.nc.new_inbox()},
                dict,
            )
    # Alice's map is unaffected: every input answered with her function's value.
    assert await victim == [3 * x for x in range(40)]
