"""One writer per service database, with real processes: a second scheduler on the same data
directory exits at once, naming the file and the first one's pid; the first keeps serving."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from services.stack import Proc, free_port, nats_server_binary
from shared import api

pytestmark = pytest.mark.slow


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = Proc(
        "nats",
        [nats_server_binary(), "-js", "-sd", str(tmp_path / "nats"), "-a", "127.0.0.1"]
        + ["-p", str(port)],
        dict(os.environ),
        tmp_path / "nats.log",
    )
    server.start()
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.stop()


def scheduler_env(nats_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    env.update(CUMULUS_NATS_URL=nats_url, CUMULUS_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    return env


async def answers(nats_url: str, timeout: float) -> bool:
    """True once `cumulus.scheduler.workers` is answered within `timeout`."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(nats_url)
    try:
        while time.monotonic() < deadline:
            try:
                await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=1.0)
                return True
            except Exception:
                await asyncio.sleep(0.1)
        return False
    finally:
        await nc.close()


@pytest.fixture
async def first(nats_url: str, tmp_path: Path) -> AsyncIterator[Proc]:
    proc = Proc(
        "scheduler",
        [sys.executable, "-m", "services.scheduler"],
        scheduler_env(nats_url, tmp_path / "data"),
        tmp_path / "scheduler-1.log",
    )
    proc.start()
    try:
        assert await answers(nats_url, 30), (tmp_path / "scheduler-1.log").read_text()
        yield proc
    finally:
        proc.stop()


async def test_a_second_scheduler_on_the_same_data_exits_and_the_first_keeps_serving(
    first: Proc, nats_url: str, tmp_path: Path
) -> None:
    second = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.scheduler"],
        env=scheduler_env(nats_url, tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    db = tmp_path / "data" / "scheduler.sqlite"
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert lines[-1] == (
        f"cumulus scheduler: event log {db} is in use by another process (pid {first.pid}): "
        "stop that process first, or give this one its own data directory"
    )
    assert first.alive()
    assert await answers(nats_url, 5)
