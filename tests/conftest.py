"""Fixtures that start the real thing: nats-server with JetStream and the Cumulus services.

Every server is started on a free port and stopped by pid. `stack` is one embedded stack per
test session (jobs are isolated by their ids); tests that kill services build their own with
`make_stack`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from cumulus import AsyncClient
from services.stack import Stack

StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(scope="session", autouse=True)
def cumulus_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Profiles of the tests live in a directory of their own, never the user's ~/.cumulus."""
    home = tmp_path_factory.mktemp("cumulus-home")
    old = os.environ.get("CUMULUS_HOME")
    os.environ["CUMULUS_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("CUMULUS_HOME", None)
        else:
            os.environ["CUMULUS_HOME"] = old


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheelhouse the examples' requirements install from (`tinystats`), built offline."""
    out = tmp_path_factory.mktemp("wheelhouse")
    out.chmod(0o755)  # sandboxed jobs run as users of their own (services/runner/sandbox.py)
    subprocess.run(
        [sys.executable, str(ROOT / "examples/vendor/build_wheelhouse.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> AsyncIterator[Stack]:
    # The operator's wheelhouse (`container.wheelhouse`): a job may not set CUMULUS_* itself.
    s = Stack(
        data_dir=tmp_path_factory.mktemp("stack"),
        workers=["worker-1"],
        devices="2x16GiB",
        env={"CUMULUS_CONTAINER_WHEELHOUSE": str(wheelhouse)},
    )
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
    async with AsyncClient(profile=stack.profile()) as c:
        yield c


@pytest.fixture
async def nc(stack: Stack) -> AsyncIterator[Client]:
    conn = await stack.connect()  # the operator's identity: every subject
    try:
        yield conn
    finally:
        await conn.close()


def partitions_of(stack: Stack, worker: str) -> list[dict[str, Any]]:
    """The chronos partitions a stack's worker holds now, as `chronos_cli --json list` says."""
    out = subprocess.run(
        [
            sys.executable, "-m", "cumulus_core", "--json", "--state-dir",
            str(stack.data_dir / f"chronos-{worker}"), "list",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )  # fmt: skip
    return list(json.loads(out.stdout)["partitions"])
