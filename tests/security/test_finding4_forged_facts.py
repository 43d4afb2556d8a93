"""Finding 4: forged facts were believed. A fake `workers.evil.registered` with 1,000 GPUs got
jobs placed on it; a fake `completed` freed capacity while the real job ran, and later jobs
failed.

Now only a worker identity publishes worker facts, each only under its own id (NATS
permissions), and every consumer sets aside (dead-letters, `cumulus.dead.<service>`) an event
whose fields disagree with its subject. Even the operator's identity, which may publish
anything, cannot make a service believe an event that contradicts its subject.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev
from shared import subjects
from tests.security.conftest import Identity, publish_denied, running, sleeper, watch


def add(a: int, b: int) -> int:
    return a + b


def phantom(worker_id: str) -> bytes:
    devices = [ev.DeviceInfo(index=i, name="phantom", memory_bytes=80 << 30) for i in range(1000)]
    return ev.encode(ev.WorkerRegistered(worker_id=worker_id, hostname="evil", devices=devices))


async def capacity(client: AsyncClient) -> dict[str, int]:
    return {w.worker_id: len(w.devices) for w in await client.workers()}


async def dead_letter(seen: Any, data: bytes, expected: set[str], within: float = 5.0) -> list[str]:
    """Subjects of the dead letters carrying `data`, once all of `expected` arrived (or after
    `within` seconds)."""
    found: list[str] = []
    for _ in range(int(within / 0.1)):
        found = sorted(m.subject for m in seen.got if m.data == data)
        if expected <= set(found):
            break
        await asyncio.sleep(0.1)
    return found


async def test_users_cannot_publish_worker_facts(
    stack: Stack, alice: AsyncClient, identity: Any, admin: NatsClient
) -> None:
    before = await capacity(alice)
    bob: Identity = await identity(stack.profile("bob"))
    await publish_denied(bob, admin, subjects.worker("evil", "registered"), phantom("evil"))
    await publish_denied(bob, admin, subjects.worker("worker-1", "registered"), phantom("worker-1"))
    assert await capacity(alice) == before
    assert "evil" not in before


async def test_a_worker_speaks_only_for_itself(
    stack: Stack, alice: AsyncClient, identity: Any, admin: NatsClient
) -> None:
    before = await capacity(alice)
    stack.credentials("worker", "evil", ("evil",))
    stack.reload()
    evil: Identity = await identity(stack.credentials("worker", "evil", ("evil",)))
    hb = ev.encode(ev.WorkerHeartbeat(worker_id="worker-1"))
    await publish_denied(evil, admin, subjects.worker("worker-1", "heartbeat"), hb)
    await publish_denied(
        evil, admin, subjects.worker("worker-1", "registered"), phantom("worker-1")
    )
    await publish_denied(
        evil, admin, subjects.worker("worker-1", "deregistered"), b'{"worker_id":"worker-1"}'
    )
    # nor any placement: only the scheduler places jobs
    await publish_denied(evil, admin, "jobs.alice.jx.evil.scheduled", b"{}")
    await publish_denied(evil, admin, "jobs.alice.jx._.submitted", b"{}")
    assert await capacity(alice) == before


async def test_a_worker_fact_that_contradicts_its_subject_is_set_aside(
    stack: Stack, alice: AsyncClient, admin: NatsClient
) -> None:
    before = await capacity(alice)
    dead = await watch(admin, "cumulus.dead.>")
    forged = phantom("worker-1")  # says worker-1, on evil2's subject
    await admin.publish(subjects.worker("evil2", "registered"), forged)
    await admin.flush()
    assert await dead_letter(dead, forged, {"cumulus.dead.scheduler"}) == ["cumulus.dead.scheduler"]
    after = await capacity(alice)
    assert after == before, after
    assert "evil2" not in after
    # scheduling goes on as before
    assert await alice.run(add, 1, 1, gpu=0.1, duration=600, logs=None, timeout=60) == 2


async def test_a_job_event_that_contradicts_its_subject_is_set_aside(
    stack: Stack, alice: AsyncClient, admin: NatsClient
) -> None:
    job = await alice.submit(sleeper, 5, gpu=0.1, duration=600)
    await running(job)
    other = "j" + "0" * 20
    forged = ev.encode(
        ev.JobCompleted(
            job_id=other,
            user="alice",
            worker_id="worker-1",
            result=msgspec.Raw(b'{"encoding":"json","data":"forged"}'),
        )
    )
    dead = await watch(admin, "cumulus.dead.>")
    await admin.publish(subjects.job("alice", job.job_id, "worker-1", "completed"), forged)
    await admin.flush()
    services = await dead_letter(dead, forged, {"cumulus.dead.scheduler", "cumulus.dead.gateway"})
    assert "cumulus.dead.scheduler" in services, services
    assert "cumulus.dead.gateway" in services, services
    info = await job.status()
    assert info.status == "RUNNING", info
    assert await job.result(timeout=60) == "alice's real value"
    # capacity was not freed early: the scheduler still books each job once
    assert await alice.run(add, 2, 2, gpu=0.1, duration=600, logs=None, timeout=60) == 4
