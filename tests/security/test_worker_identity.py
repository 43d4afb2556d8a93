"""A worker identity reads only its own work.

A worker may create and use only its own durable consumers (`partitioner-W`, `runner-W`); the
question here is what it may put *in* them: a worker that names its durable with a filter over
every user's jobs would read everyone's specs and logs, which its role does not allow
(`jobs.*.*.W.…` only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import pickle
from hashlib import sha256
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev
from shared import subjects
from tests.security.conftest import Identity, running, sleeper
from tests.security.test_finding2_forged_result import Payload


async def test_a_worker_cannot_read_every_users_jobs_through_its_own_durable(
    stack: Stack, alice: AsyncClient, identity: Any
) -> None:
    job = await alice.submit(sleeper, 3, gpu=0.1, duration=600)
    await running(job)
    stack.credentials("worker", "evil", ("evil",))
    stack.reload()
    evil: Identity = await identity(stack.credentials("worker", "evil", ("evil",)))
    js = evil.nc.jetstream(timeout=2)
    got: list[str] = []
    for durable in ("runner-evil", "partitioner-evil"):
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            sub = await js.pull_subscribe(
                f"jobs.alice.{job.job_id}.>", durable=durable, stream=subjects.JOBS_STREAM
            )
            for msg in await sub.fetch(10, timeout=2):
                got.append(msg.subject)
    assert got == [], got
    assert await job.result(timeout=60) == "alice's real value"


def big_value(seconds: float) -> bytes:
    """A result too large for an event (it travels as `result` parts), after a while."""
    import time

    print("working", flush=True)
    time.sleep(seconds)
    return b"alice" * 100_000


async def test_a_worker_cannot_replace_another_workers_large_result(
    stack: Stack, alice: AsyncClient, identity: Any, tmp_path: Path
) -> None:
    """A result over 256 KiB travels as `result` parts under the placed worker's own subject
    (`results.alice.<job>.worker-1.<attempt>`).
    `evil` (a worker identity) cannot publish under worker-1's token; the parts and the
    completed it may publish under its own token carry a pickle that would create a marker
    file, and alice's client never decodes them: it gets her real value."""
    marker = tmp_path / "pwned"
    envelope = {
        "ok": True,
        "encoding": "pickle",
        "pickle": base64.b64encode(pickle.dumps(Payload(marker))).decode(),
    }
    forged = msgspec.json.encode(envelope)
    job = await alice.submit(big_value, 3, gpu=0.1, duration=600)
    await running(job)
    stack.credentials("worker", "evil", ("evil",))
    stack.reload()
    evil: Identity = await identity(stack.credentials("worker", "evil", ("evil",)))
    digest = {"ok": True, "parts": 1, "size": len(forged), "sha256": sha256(forged).hexdigest()}
    common = {"job_id": job.job_id, "user": "alice"}
    for worker in ("worker-1", "evil"):
        part = ev.JobResultPart(
            worker_id=worker, attempt=1, index=0, count=1, data=forged, **common
        )
        done = ev.JobCompleted(
            worker_id=worker, result=msgspec.Raw(msgspec.json.encode(digest)), **common
        )
        # the part on the worker's result subject (stream RESULTS), and, since alice's SDK
        # believes a subject only with the body that matches it, under `jobs.` as well
        for subject, event in (
            (subjects.result("alice", job.job_id, worker, 1), part),
            (subjects.job("alice", job.job_id, worker, "result"), part),
            (subjects.job("alice", job.job_id, worker, "completed"), done),
        ):
            await evil.nc.publish(subject, ev.encode(event))
    await evil.nc.flush()
    assert any("worker-1" in str(e) for e in await evil.violations(1.0))
    value = await job.result(timeout=60)
    assert not marker.exists(), "evil's result was unpickled"
    assert value == b"alice" * 100_000
