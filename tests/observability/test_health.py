"""A supervisor can tell whether each service is alive and ready (shared/health.py).

Through a real embedded stack with metrics on: `cumulus health --service NAME` over the bus (as
an operator; a user's profile may not ask), `/healthz` and `/readyz` on each process's metrics
port, systemd's READY=1 and WATCHDOG=1 on $NOTIFY_SOCKET; then with the bus away (nats-server
stopped by pid) every process stays alive but is not ready, and the CLI answers from the
metrics port; a stopped service makes the check exit 1 with one line, within its timeout. In
this process: a service whose event loop is stuck is not alive on /healthz.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.stack import Stack
from shared import health, metrics
from shared.config import Config
from shared.service import EventService

CUMULUS = str(Path(sys.executable).parent / "cumulus")
SERVICES = {
    "scheduler": "scheduler",
    "gateway": "gateway",
    "partitioner-worker-1": "partitioner",
    "runner-worker-1": "runner",
}
"""The stack's processes with a metrics port -> the service each runs."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, dict[str, Any]]:
    """GET `url`: its status and JSON body (a 503 too)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def _read(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


@pytest.fixture(scope="module")
def notify_socket() -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notification socket."""
    path = Path(tempfile.mkdtemp(prefix="notify-")) / "sd.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the least: full in a few seconds
    sock.settimeout(0.5)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        path.parent.rmdir()


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, notify_socket: socket.socket
) -> AsyncIterator[Stack]:
    """A stack with a metrics port per process; its scheduler runs as under systemd's
    `Type=notify` with `WatchdogSec=`."""
    notify = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "3000000"}
    s = Stack(
        data_dir=tmp_path_factory.mktemp("health"),
        env={"CUMULUS_METRICS_PORT": str(_free_port())},
        proc_env={"scheduler": notify},
    )
    try:
        await s.start()
        yield s
    finally:
        s.stop()


def cli(stack: Stack, *args: str, profile: str = "") -> subprocess.CompletedProcess[str]:
    """`cumulus --profile <operator> health …` as a supervisor runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    env["CUMULUS_HOME"] = os.environ.get("CUMULUS_HOME", "")
    profile = profile or stack.credentials("admin", "admin")
    return subprocess.run(
        [CUMULUS, "--profile", profile, "health", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def port_of(stack: Stack, name: str) -> int:
    return stack.metrics_ports[name]


async def test_every_service_of_a_running_stack_is_ready_over_the_bus(stack: Stack) -> None:
    done = cli(stack, "--service", "scheduler", "--ready")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("scheduler default: ready (lag 0"), done.stdout
    asked = (
        ("gateway", "", "gateway"),
        ("partitioner", "", "partitioner-worker-1"),  # the roll call: every instance answers
        ("runner", "worker-1", "runner-worker-1"),  # this one process
    )
    for service, instance, proc in asked:
        args = ["--service", service, "--ready", "--json"]
        done = cli(stack, *args, *(["--instance", instance] if instance else []))
        assert done.returncode == 0, (service, done.stdout, done.stderr)
        answer = json.loads(done.stdout)
        assert answer["ok"] is True
        assert answer["via"] == "nats"
        [report] = answer["instances"]
        assert report["service"] == service
        assert report["ready"] is True
        assert report["pid"] == stack.procs[proc].pid
    done = cli(stack, "--service", "runner", "--instance", "worker-9", "--timeout", "2")
    assert done.returncode == 1
    assert "no runner worker-9 answers on cumulus.health.runner.worker-9" in done.stderr


def test_a_worker_agent_answers_for_its_worker_with_its_own_credentials(
    stack: Stack, tmp_path: Path
) -> None:
    """`cumulus worker` (partitioner and runner in one process) and the check its systemd
    unit runs: `--config` names the bus, the worker's own credentials, its id, its port."""
    creds = stack.credentials("worker", "agent-1", ("agent-1",))
    stack.reload()
    port = _free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"metrics_port: {port}\n"
        f"nats: {{url: '{stack.url}', credentials: '{creds}'}}\n"
        "worker: {id: agent-1, devices: 2x16GiB, device_source: virtual, backend: process}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [CUMULUS, "worker", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        check = [CUMULUS, "health", "--service", "worker", "--config", str(config), "--ready"]
        done = subprocess.run(
            [*check, "--wait", "60"], env=env, capture_output=True, text=True, timeout=90
        )
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert done.stdout.startswith("worker agent-1: ready"), done.stdout
        status, body = get(f"http://127.0.0.1:{port}/readyz?service=worker")
        assert status == 200
        assert sorted(r["service"] for r in body["services"]) == ["partitioner", "runner"]

        agent.terminate()
        agent.wait(timeout=30)
        done = subprocess.run(
            [*check, "--timeout", "2"], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1
        assert "no worker agent-1 answers" in done.stderr, done.stderr
        assert f"nothing answers at http://127.0.0.1:{port}" in done.stderr
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)


async def test_a_user_may_not_ask_and_is_told_why(stack: Stack) -> None:
    done = cli(stack, "--service", "scheduler", "--timeout", "1", profile=stack.profile())
    assert done.returncode == 1
    assert "may this profile ask" in done.stderr, done.stderr


async def test_metrics_ports_answer_healthz_and_readyz(stack: Stack) -> None:
    for name, service in SERVICES.items():
        base = f"http://127.0.0.1:{port_of(stack, name)}"
        status, body = get(f"{base}/healthz")
        assert status == 200, body
        assert [r["service"] for r in body["services"]] == [service]
        assert body["services"][0]["live"] is True
        assert body["services"][0]["pid"] == stack.procs[name].pid
        status, body = get(f"{base}/readyz")
        assert status == 200, body
        assert body["services"][0]["ready"] is True
        assert body["services"][0]["lag"], "a ready service says its consumers' lag"
        scraped = await asyncio.to_thread(_read, f"{base}/metrics")
        assert b"cumulus_events_applied_total" in scraped  # /metrics as before
    status, body = get(f"http://127.0.0.1:{port_of(stack, 'gateway')}/readyz?service=runner")
    assert status == 404
    assert "gateway" in body["error"]


async def test_systemd_hears_ready_then_the_watchdog(
    stack: Stack, notify_socket: socket.socket
) -> None:
    heard: set[bytes] = set()
    deadline = time.monotonic() + 15
    while {b"READY=1", b"WATCHDOG=1"} - heard and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            heard.add(notify_socket.recv(64))
    assert {b"READY=1", b"WATCHDOG=1"} <= heard

    # Nobody reads the socket now: its queue fills, and the scheduler must not wait on it.
    await asyncio.sleep(5)
    status, body = await asyncio.to_thread(
        get, f"http://127.0.0.1:{port_of(stack, 'scheduler')}/healthz"
    )
    assert status == 200
    assert body["services"][0]["loop_s"] < 2 * health.TICK_S + 0.5
    assert cli(stack, "--service", "scheduler", "--ready").returncode == 0


async def test_with_the_bus_away_services_stay_alive_but_are_not_ready(stack: Stack) -> None:
    scheduler = f"http://127.0.0.1:{port_of(stack, 'scheduler')}"
    stack.procs["nats"].stop()  # by pid; the stack's watchdog leaves a server stopped on purpose
    try:
        deadline = time.monotonic() + 30
        while (status := get(f"{scheduler}/readyz"))[0] == 200:
            assert time.monotonic() < deadline, "still ready 30 s after the bus went away"
            await asyncio.sleep(0.2)
        status, body = get(f"{scheduler}/readyz")
        assert status == 503
        assert "not connected to the bus" in body["services"][0]["problems"]
        for name in SERVICES:
            status, body = get(f"http://127.0.0.1:{port_of(stack, name)}/healthz")
            assert status == 200, (name, body)
            assert body["services"][0]["live"] is True

        done = cli(stack, "--service", "scheduler", "--timeout", "2")
        assert done.returncode == 1
        assert "cannot reach the bus" in done.stderr
        assert "--url http://" in done.stderr

        done = cli(stack, "--service", "scheduler", "--url", scheduler)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("scheduler default: alive")
        assert f"answered by {scheduler}" in done.stdout

        done = cli(stack, "--service", "scheduler", "--ready", "--url", scheduler)
        assert done.returncode == 1
        assert "NOT READY: not connected to the bus" in done.stdout
    finally:
        stack.procs["nats"].start()
    done = cli(stack, "--service", "scheduler", "--ready", "--wait", "30")
    assert done.returncode == 0, (done.stdout, done.stderr)


async def test_a_stopped_service_fails_the_check_with_one_line(stack: Stack) -> None:
    port = port_of(stack, "scheduler")
    stack.procs["scheduler"].stop()
    done = cli(stack, "--service", "scheduler", "--timeout", "2")
    assert done.returncode == 1
    assert done.stderr.startswith("cumulus health: scheduler: no scheduler answers"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    done = cli(stack, "--service", "scheduler", "--url", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert "nothing answers at" in done.stderr, done.stderr

    # The others are unaffected.
    assert cli(stack, "--service", "gateway").returncode == 0


UP_METRICS = """
import sys, time
from shared import metrics
metrics.watch_nats(int(sys.argv[2]))
metrics.start(int(sys.argv[1]))
print("serving", flush=True)
time.sleep(120)
"""
"""What `cumulus up` does for its own metrics port (cumulus/cli/up.py serve_metrics)."""


@pytest.mark.parametrize("bus", ["up", "away"])
def test_the_up_process_is_ready_while_its_nats_server_is(stack: Stack, bus: str) -> None:
    port = _free_port()
    monitor = stack.monitor_port if bus == "up" else _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", UP_METRICS, str(port), str(monitor)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "serving"
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        assert [r["service"] for r in body["services"]] == ["nats"]
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        if bus == "up":
            assert status == 200, body
        else:
            assert status == 503
            assert "nats-server does not answer" in body["services"][0]["problems"][0]
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # and its stdout closed


class Probe(EventService[dict[str, Any]]):
    """A service with nothing to consume, run in this process."""

    name = "probe"

    def new_state(self) -> dict[str, Any]:
        return {}


async def test_a_stuck_event_loop_is_not_alive(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "STALL_S", 1.0)
    monkeypatch.setattr(health, "READY_WAIT_S", 1.0)
    probe = Probe(Config(data_dir=str(tmp_path)))
    await probe.start(await stack.connect())
    port = _free_port()
    metrics.start(port)
    base = f"http://127.0.0.1:{port}"
    try:
        assert (await asyncio.to_thread(get, f"{base}/healthz?service=probe"))[0] == 200

        def later() -> tuple[tuple[int, Any], tuple[int, Any]]:
            time.sleep(2.0)
            return get(f"{base}/healthz?service=probe"), get(f"{base}/readyz?service=probe")

        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(later)
            time.sleep(4.0)  # noqa: ASYNC251  # the event loop stuck here, on purpose
            (live, body), (ready, rbody) = asked.result()
        assert live == 503, body
        assert "has not turned" in body["services"][0]["problems"][0]
        assert ready == 503
        assert "did not answer" in rbody["services"][0]["problems"][-1]

        await asyncio.sleep(health.TICK_S + 0.5)
        assert (await asyncio.to_thread(get, f"{base}/healthz?service=probe"))[0] == 200
    finally:
        await probe.stop()
