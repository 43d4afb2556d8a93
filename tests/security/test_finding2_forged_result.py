"""Finding 2: a forged `completed` event with a pickled result ran code inside alice's client
when she called `job.result()`; it was sent from inside another user's job.

Now only the worker of the job's placement may publish under its worker token (NATS
permissions), nobody may publish a worker's event under `_`, and the SDK unpickles a value only
from a `completed` of the job's placement. The forged results below would create a marker file
when unpickled; it never exists, and alice gets her real value.
"""

from __future__ import annotations

import base64
import pickle
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev
from shared import subjects
from tests.security.conftest import Identity, publish_denied, running, sleeper, watch


class Payload:
    """Unpickling this creates `marker` (stands for any code the attacker wants run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def forged(job_id: str, worker: str, marker: Path) -> bytes:
    envelope = {
        "encoding": "pickle",
        "pickle": base64.b64encode(pickle.dumps(Payload(marker))).decode(),
    }
    event = ev.JobCompleted(
        job_id=job_id,
        user="alice",
        worker_id=worker,
        result=msgspec.Raw(msgspec.json.encode(envelope)),
    )
    return ev.encode(event)


async def placed_on(job: Any) -> str:
    async for event in job.events(follow=False):
        if isinstance(event, ev.WorkerSelected):
            return str(event.worker_id)
    raise AssertionError("the job was never placed")


async def test_bob_and_a_fake_worker_cannot_publish_alices_completed(
    stack: Stack, alice: AsyncClient, identity: Any, admin: NatsClient, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    job = await alice.submit(sleeper, 4, gpu=0.1, duration=600)
    await running(job)
    worker = await placed_on(job)
    stack.credentials("worker", "evil", ("evil",))
    stack.reload()
    for path in (stack.profile("bob"), stack.credentials("worker", "evil", ("evil",))):
        for token in (worker, subjects.NO_WORKER):
            attacker: Identity = await identity(path)
            subject = subjects.job("alice", job.job_id, token, "completed")
            await publish_denied(attacker, admin, subject, forged(job.job_id, token, marker))
    assert await job.result(timeout=60) == "alice's real value"
    assert not marker.exists()


async def test_a_completed_not_from_the_placement_is_never_unpickled(
    stack: Stack, alice: AsyncClient, identity: Any, admin: NatsClient, tmp_path: Path
) -> None:
    """A worker identity may publish under its own token only, so a forged `completed` can
    come only under a token that is not the job's placement: the worker `evil` itself, or the
    operator's identity (which may publish anything). Alice's SDK ignores both."""
    marker = tmp_path / "pwned"
    job = await alice.submit(sleeper, 6, gpu=0.1, duration=600)
    await running(job)
    assert await placed_on(job) != "evil"

    evil: Identity = await identity(stack.credentials("worker", "evil", ("evil",)))
    subject = subjects.job("alice", job.job_id, "evil", "completed")
    seen = await watch(admin, subject)
    await evil.nc.publish(subject, forged(job.job_id, "evil", marker))
    await evil.nc.flush()
    await admin.publish(subject, forged(job.job_id, "evil", marker))
    await admin.flush()

    # the job keeps running: neither the gateway nor the scheduler believe the forgery
    info = await job.status()
    assert info.status == "RUNNING", info
    # wait() ends with the real end, not the forged one: the job is over when it returns
    assert await job.wait(timeout=60) == "COMPLETED"
    info = await job.status()
    assert info.status == "COMPLETED", info
    assert await job.result(timeout=60) == "alice's real value"
    assert not marker.exists()
    assert len(seen.got) == 2  # the forgeries were published, and ignored
