"""`cumulus worker`: a worker host's partitioner and runner in one process, against a real
stack of central services (secure: nkey identities) with no worker of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cumulus import AsyncClient
from services.stack import Stack
from shared import api, auth

CUMULUS = str(Path(sys.executable).parent / "cumulus")


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
async def central(tmp_path: Path) -> AsyncIterator[Stack]:
    """nats-server, gateway and scheduler only: workers come from outside, as on a fleet."""
    stack = Stack(data_dir=tmp_path / "central", workers=[], secure=True)
    try:
        await stack.start()
        yield stack
    finally:
        stack.stop()


def agent_env(stack: Stack, worker: str, creds: str, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    env.update(
        {
            "CUMULUS_HOME": os.environ.get("CUMULUS_HOME", str(data / "home")),
            "CUMULUS_NATS_URL": stack.url,
            "CUMULUS_NATS_CREDENTIALS": creds,
            "CUMULUS_WORKER_ID": worker,
            "CUMULUS_DATA_DIR": str(data),
            "CUMULUS_WORKER_DEVICES": "2x16GiB",
            "CUMULUS_WORKER_DEVICE_SOURCE": "virtual",
            "CUMULUS_WORKER_BACKEND": "process",
            "CUMULUS_WORKER_HEARTBEAT_S": "1",
            "CUMULUS_LOGGING_FORMAT": "text",
        }
    )
    return env


def start_agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [CUMULUS, "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


async def ready_workers(stack: Stack) -> set[str]:
    nc = await stack.connect()
    try:
        reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=2.0)
    finally:
        await nc.close()
    return {w["worker_id"] for w in reply["workers"] if w["status"] == "ready"}


async def wait_registered(stack: Stack, worker: str, proc: subprocess.Popen[bytes]) -> float:
    """Seconds until the scheduler lists `worker` as ready (the agent must stay alive)."""
    began = time.monotonic()
    while time.monotonic() - began < 30:
        assert proc.poll() is None, "the agent exited before it registered"
        try:
            if worker in await ready_workers(stack):
                return time.monotonic() - began
        except Exception:  # the scheduler may be busy; ask again
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{worker} not listed by the scheduler within 30 s")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


async def test_agent_runs_a_job_end_to_end_and_stops_on_sigterm(
    central: Stack, tmp_path: Path
) -> None:
    worker = "agent-w1"
    creds = central.credentials("worker", worker, (worker,))
    central.reload()
    log = tmp_path / "agent.log"
    proc = start_agent(agent_env(central, worker, creds, tmp_path / "agent"), log)
    try:
        await wait_registered(central, worker, proc)
        async with AsyncClient(profile=central.profile()) as client:
            result = await client.run(add, 2, 3, gpu=0.5, duration=600, logs=None, timeout=60)
        assert result == 5
        began = time.monotonic()
        code = stop(proc)
        took = time.monotonic() - began
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert took < 15, f"SIGTERM took {took:.1f} s"
    # One process served both roles: its own event logs, one per service.
    assert (tmp_path / "agent" / f"partitioner-{worker}.sqlite").exists()
    assert (tmp_path / "agent" / f"runner-{worker}.sqlite").exists()


async def test_agent_exits_non_zero_when_its_credentials_are_refused(
    central: Stack, tmp_path: Path
) -> None:
    # An identity the bus has never been told about: a key of another installation.
    stranger = auth.AuthDir(tmp_path / "elsewhere", url=central.url)
    creds = str(stranger.ensure("worker", "agent-w2", ("agent-w2",)))
    log = tmp_path / "refused.log"
    proc = start_agent(agent_env(central, "agent-w2", creds, tmp_path / "agent2"), log)
    try:
        code = proc.wait(timeout=60)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert code == 1, text
    assert "refused the credentials" in text, text
    assert "agent-w2" not in await ready_workers(central)


def test_agent_with_a_bad_configuration_exits_2_before_it_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    env["CUMULUS_WORKER_BACKEND"] = "kubernetes"
    done = subprocess.run(
        [CUMULUS, "worker"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "worker.backend" in done.stderr
