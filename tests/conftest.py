"""Fixtures that start the real thing: nats-server with JetStream and the Cumulus services.

Every server is started on a free port and stopped by pid. `stack` is one embedded stack per
test session (jobs are isolated by their ids); tests that kill services build their own with
`make_stack`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from cumulus import AsyncClient
from services.stack import Stack

StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    s = Stack(data_dir=tmp_path_factory.mktemp("stack"), workers=["worker-1"], devices="2x16GiB")
    try:
        await s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    made: list[Stack] = []

    async def make(**kwargs: Any) -> Stack:
        s = Stack(data_dir=tmp_path / f"stack{len(made)}", **kwargs)
        made.append(s)
        await s.start()
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(stack.url) as c:
        yield c


@pytest.fixture
async def nc(stack: Stack) -> AsyncIterator[Client]:
    conn = await nats.connect(stack.url)
    try:
        yield conn
    finally:
        await conn.close()
