"""Attackers and their victims on a real stack: nats-server with nkey identities, SQLite, the
process backend's sandbox (and Docker where an engine is reachable).

Every attack here is one of issue 10's findings (1-7). NATS refuses a denied publish or
subscribe without raising in nats-py: the server's "Permissions Violation" reaches the
connection's error callback, and a denied request simply gets no answer. So each test asserts on
the effect: nothing arrived where the attacker aimed, the victim's job is unaffected, and the
violation was reported to the attacker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cumulus import AsyncClient
from services.stack import Stack
from shared import auth

QUIET_S = 1.0
"""How long an attack's target is watched for something to arrive."""


@dataclass
class Identity:
    """A connection as one identity, with the errors the server sent it."""

    nc: NatsClient
    errors: list[str] = field(default_factory=list)

    async def violations(self, within: float = 2.0) -> list[str]:
        """The permissions violations reported so far (waiting up to `within` for one)."""
        for _ in range(int(within / 0.05)):
            if self.permission_errors:
                break
            await asyncio.sleep(0.05)
        return self.permission_errors

    @property
    def permission_errors(self) -> list[str]:
        return [e.lower() for e in self.errors if "permissions violation" in e.lower()]


async def connect_as(stack: Stack, path: str) -> Identity:
    """A nats connection presenting the identity in credentials file `path`."""
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    creds = auth.load_credentials(path)
    nc = await nats.connect(
        stack.url,
        error_cb=error_cb,
        allow_reconnect=False,
        connect_timeout=5,
        **auth.connect_options(creds),
    )
    return Identity(nc, errors)


@pytest.fixture
async def identity(stack: Stack) -> AsyncIterator[Callable[..., Any]]:
    """`await identity(path)`: a connection as that identity, closed after the test."""
    made: list[Identity] = []

    async def make(path: str) -> Identity:
        ident = await connect_as(stack, path)
        made.append(ident)
        return ident

    try:
        yield make
    finally:
        for ident in made:
            with contextlib.suppress(Exception):
                await ident.nc.close()


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[NatsClient]:
    """The operator's connection: reads every subject, to check the victim is unaffected."""
    nc = await stack.connect()
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def alice(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(profile=stack.profile("alice")) as c:
        yield c


@pytest.fixture
async def bob(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(profile=stack.profile("bob")) as c:
        yield c


@dataclass
class Catcher:
    """Messages arriving on subjects the admin watches."""

    got: list[Msg] = field(default_factory=list)


async def watch(nc: NatsClient, *subjects: str) -> Catcher:
    catcher = Catcher()

    async def cb(msg: Msg) -> None:
        catcher.got.append(msg)

    for subject in subjects:
        await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return catcher


async def publish_denied(attacker: Identity, admin: NatsClient, subject: str, data: bytes) -> None:
    """`attacker` publishes `data` on `subject`: it never arrives there, and the server
    reports a permissions violation to the attacker. (The subject's rightful publisher may
    speak meanwhile, e.g. the real worker's heartbeat: only the attacker's bytes count.)"""
    seen = await watch(admin, subject)
    await attacker.nc.publish(subject, data)
    await attacker.nc.flush()
    await asyncio.sleep(QUIET_S)
    assert [m.subject for m in seen.got if m.data == data] == []
    violations = await attacker.violations()
    assert any("publish" in v and subject.lower() in v for v in violations), attacker.errors


async def receives_nothing(attacker: Identity, subject: str, within: float = QUIET_S) -> None:
    """`attacker` subscribes to `subject`: the server refuses it and nothing arrives."""
    got: list[str] = []

    async def cb(msg: Msg) -> None:
        got.append(msg.subject)

    sub = await attacker.nc.subscribe(subject, cb=cb)
    await attacker.nc.flush()
    await asyncio.sleep(within)
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    assert got == []
    violations = await attacker.violations()
    assert any("subscription" in v and subject.lower() in v for v in violations), attacker.errors


def sleeper(seconds: float) -> str:
    """A victim's job that runs for a while and prints as it goes."""
    import time

    for i in range(int(seconds * 4)):
        print(f"secret line {i}", flush=True)
        time.sleep(0.25)
    return "alice's real value"


async def running(job: Any, timeout: float = 60) -> None:
    """Until the job has started and printed."""
    from shared import events as ev

    async def wait() -> None:
        async for event in job.events():
            if isinstance(event, ev.JobLog):
                return

    await asyncio.wait_for(wait(), timeout)
