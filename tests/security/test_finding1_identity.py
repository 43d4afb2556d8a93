"""Finding 1: no authentication on NATS or the API. An anonymous connection cancelled another
user's job, listed every user's jobs, submitted as anyone, and read everyone's logs.

Now every connection is an nkey identity, a user publishes only `cumulus.api.<itself>.>` and
reads only `jobs.<itself>.>` and its private inbox, and the gateway takes the user from the
subject. Bob attacks alice's running job every way the finding did; it keeps running.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient, InvalidArgument, NotFound, PermissionDenied
from services.stack import Stack
from shared import api, subjects
from tests.security.conftest import (
    Identity,
    publish_denied,
    receives_nothing,
    running,
    sleeper,
)


def add(a: int, b: int) -> int:
    return a + b


async def refused(url: str, **options: Any) -> str:
    """Why nats-server refused a connection ("" if it accepted it)."""
    nc = NatsClient()
    try:
        await nc.connect(
            url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **options
        )
    except nats.errors.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await nc.close()  # also the socket of a refused connection
    return ""


async def test_anonymous_connection_is_refused(stack: Stack) -> None:
    why = await refused(stack.url)
    assert "Authorization" in why, why


async def test_a_key_the_server_does_not_know_is_refused(stack: Stack) -> None:
    from shared import auth

    why = await refused(stack.url, nkeys_seed_str=auth.new_seed())
    assert "Authorization" in why, why


async def test_bob_cannot_cancel_list_or_submit_as_alice(
    stack: Stack, alice: AsyncClient, bob: AsyncClient, identity: object, admin: NatsClient
) -> None:
    job = await alice.submit(sleeper, 15, gpu=0.1, duration=600)
    try:
        await running(job)
        attacker: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
        body = json.dumps({"job_id": job.job_id}).encode()

        # alice's API subjects are hers alone
        await publish_denied(attacker, admin, subjects.api("cancel", "alice"), body)
        # through bob's own subject, alice's job does not exist
        with pytest.raises(NotFound):
            await bob._call("cancel", {"job_id": job.job_id}, dict)
        with pytest.raises(NotFound):
            await bob._call("status", {"job_id": job.job_id}, dict)
        assert job.job_id not in [j.job_id for j in await bob.jobs(limit=1000)]
        assert all(j.user == "bob" for j in await bob.jobs(limit=1000))
        # a listing asking for alice's jobs by field is refused, not answered
        with pytest.raises(PermissionDenied):
            await bob._call("jobs", {"user": "alice"}, dict)

        # submitting as alice: by field refused, by subject denied
        forged = {"code_ref": "0" * 64, "user": "alice", "gpu": 0.1, "duration": 600}
        with pytest.raises(PermissionDenied):
            await api.request(attacker.nc, "submit", forged, dict, user="bob", timeout=5)
        await publish_denied(
            attacker, admin, subjects.api("submit", "alice"), json.dumps(forged).encode()
        )

        # the victim's job is untouched
        info = await job.status()
        assert info.status == "RUNNING", info
    finally:
        await job.cancel()


async def test_bob_cannot_read_alices_logs(
    stack: Stack, alice: AsyncClient, bob: AsyncClient, identity: object
) -> None:
    job = await alice.submit(sleeper, 15, gpu=0.1, duration=600)
    try:
        await running(job)
        for pattern in (f"jobs.alice.{job.job_id}.>", "jobs.alice.>", "jobs.>", "jobs.*.>"):
            attacker: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
            await receives_nothing(attacker, pattern)

        # replay through bob's own watch: alice's job is not found under jobs.bob.>
        with pytest.raises(NotFound):
            await bob._call("watch", {"job_id": job.job_id, "deliver": bob.nc.new_inbox()}, dict)
        # a filter outside jobs.bob.> is refused
        with pytest.raises(InvalidArgument):
            await bob._call(
                "watch", {"filter": "jobs.alice.>", "deliver": bob.nc.new_inbox()}, dict
            )
        # bob's own job, delivered into alice's inbox (hoping she would act on it): refused
        own = await bob.submit(add, 1, 2, gpu=0.1, duration=600)
        assert await own.result(timeout=60) == 3
        with pytest.raises(InvalidArgument):
            await bob._call("watch", {"job_id": own.job_id, "deliver": "_INBOX.user.alice.x"}, dict)
        with pytest.raises(InvalidArgument):
            await bob._call("watch", {"job_id": own.job_id, "deliver": "jobs.bob.x.y.z"}, dict)
        info = await job.status()
        assert info.status == "RUNNING", info
    finally:
        await job.cancel()


async def test_bob_cannot_sniff_replies(stack: Stack, alice: AsyncClient, identity: object) -> None:
    for pattern in ("_INBOX.>", "_INBOX.user.alice.>", "_INBOX.gateway.>", ">"):
        attacker: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
        got: list[str] = []

        async def cb(msg: object, got: list[str] = got) -> None:
            got.append(msg.subject)  # type: ignore[attr-defined]

        await attacker.nc.subscribe(pattern, cb=cb)
        await attacker.nc.flush()
        for _ in range(3):  # alice's requests get replies meanwhile
            await alice.health()
        await asyncio.sleep(0.5)
        assert got == []
        assert any(pattern.lower() in v for v in await attacker.violations()), attacker.errors


async def test_bob_gets_no_jetstream_api(stack: Stack, identity: object) -> None:
    attacker: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
    for subject in (
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.JOBS",
        "$JS.API.STREAM.MSG.GET.JOBS",
        "$JS.API.STREAM.PURGE.JOBS",
        "$JS.API.STREAM.DELETE.JOBS",
        "$JS.API.CONSUMER.CREATE.JOBS",
    ):
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attacker.nc.request(subject, b"{}", timeout=1.0)
    assert len(await attacker.violations()) >= 1


async def test_bob_cannot_rewrite_the_schedulers_durable_consumer(
    stack: Stack, alice: AsyncClient, identity: object, admin: NatsClient
) -> None:
    js = admin.jetstream()
    consumers = [c for c in await js.consumers_info(subjects.JOBS_STREAM) if c.name]
    ours = [c for c in consumers if c.name.startswith("scheduler")]
    assert ours, [c.name for c in consumers]
    before = {c.name: msgspec.to_builtins(c.config.as_dict()) for c in ours}

    attacker: Identity = await identity(stack.profile("bob"))  # type: ignore[operator]
    for c in ours:
        # A consumer create names the durable: with the right to create, an existing one is
        # updated in place (its filter narrowed to the attacker's jobs) and the scheduler
        # would never see another job.
        rewrite = {
            "stream_name": subjects.JOBS_STREAM,
            "config": {
                **before[c.name],
                "filter_subject": "jobs.bob.>",
                "filter_subjects": None,
            },
        }
        for subject in (
            f"$JS.API.CONSUMER.CREATE.{subjects.JOBS_STREAM}.{c.name}.jobs.bob.>",
            f"$JS.API.CONSUMER.CREATE.{subjects.JOBS_STREAM}.{c.name}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.JOBS_STREAM}.{c.name}",
            f"$JS.API.CONSUMER.DELETE.{subjects.JOBS_STREAM}.{c.name}",
        ):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await attacker.nc.request(subject, json.dumps(rewrite).encode(), timeout=1.0)
    assert await attacker.violations()

    after = {
        c.name: msgspec.to_builtins(c.config.as_dict())
        for c in await js.consumers_info(subjects.JOBS_STREAM)
        if c.name in before
    }
    assert after == before
    # and the scheduler still places jobs
    assert await alice.run(add, 2, 3, gpu=0.1, duration=600, logs=None, timeout=60) == 5
