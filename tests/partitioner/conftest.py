"""Real parts for the partitioner tests: OpenSSH's sshd on 127.0.0.1 and a nats-server.

The sshd (`tests/partitioner/sshd.py`) gets host and client keys generated per session and
its own config, and is stopped by pid. Without /usr/sbin/sshd the SSH tests skip, saying
why, unless CI=true, where that is a failure (infra/ci/setup-sshd.sh installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from services.stack import Proc, free_port, nats_server_binary
from shared import bus as bus_mod
from shared import config as config_mod
from shared import events as ev
from shared import subjects
from shared.config import Config
from tests.partitioner.sshd import SSHD, Sshd, SshKeys, make_keys

__all__ = ["Recorder", "Sshd", "SshKeys", "make_config", "remote_chronos"]


def require_sshd() -> None:
    if SSHD.exists():
        return
    message = "OpenSSH's sshd is not installed (/usr/sbin/sshd); run infra/ci/setup-sshd.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the SSH tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> SshKeys:
    return make_keys(tmp_path_factory.mktemp("ssh-keys"))


@pytest.fixture
def sshd(ssh_keys: SshKeys, tmp_path: Path) -> Iterator[Sshd]:
    require_sshd()
    server = Sshd(ssh_keys, tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def remote_chronos(state_root: Path, devices: str = "2x16GiB") -> str:
    """The chronos_cli command an SSH worker runs: ours, on declared virtual devices.

    `{worker}` gives every agentless worker its own partition table, as separate machines
    would have.
    """
    return shlex.join(
        [
            sys.executable,
            "-m",
            "cumulus_core",
            "--backend",
            "virtual",
            "--devices",
            devices,
            "--state-dir",
            f"{state_root}/chronos-{{worker}}",
        ]
    )


# -- a nats-server with JetStream, for partitioners run in-process ------------------------


@pytest.fixture(scope="module")
async def nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    folder = tmp_path_factory.mktemp("nats")
    port = free_port()
    proc = Proc(
        "nats",
        [
            nats_server_binary(),
            "-js",
            "-sd",
            str(folder / "store"),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        dict(os.environ),
        folder / "nats.log",
    )
    proc.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            break
        except OSError:
            if time.monotonic() > deadline or not proc.alive():
                raise RuntimeError(
                    f"nats-server did not start; see {folder / 'nats.log'}"
                ) from None
            await asyncio.sleep(0.05)
    url = f"nats://127.0.0.1:{port}"
    # The control plane (gateway, scheduler) creates the streams and a worker's durable
    # consumers; a partitioner waits for the streams and asks for its consumers. Here this
    # fixture plays that part, through the scheduler's own function.
    nc = await nats.connect(url)
    js = nc.jetstream()
    await bus_mod.ensure_streams(js)

    async def make_consumer(msg: Any) -> None:
        worker_id = msg.subject.split(".")[2]
        request = msgspec.json.decode(msg.data, type=bus_mod.ConsumerRequest)
        await bus_mod.create_worker_consumer(js, worker_id, request)
        await msg.respond(b"{}")

    await nc.subscribe(subjects.consumer_request("*"), cb=make_consumer)
    try:
        yield url
    finally:
        await nc.close()
        proc.stop()


def make_config(nats_url: str, data_dir: Path, **env: str) -> Config:
    """A partitioner's configuration, as its CUMULUS_* environment would give it."""
    environ = {
        "CUMULUS_NATS_URL": nats_url,
        "CUMULUS_DATA_DIR": str(data_dir),
        "CUMULUS_WORKER_DEVICES": "2x16GiB",
        "CUMULUS_WORKER_DEVICE_SOURCE": "virtual",
        "CUMULUS_WORKER_HEARTBEAT_S": "0.5",
        "CUMULUS_WORKER_REAP_INTERVAL_S": "0",
    }
    environ.update(env)
    return config_mod.load(environ=environ)


class Recorder:
    """Every event published on `jobs.>` and `workers.>`, decoded, as it arrives."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        self.events.append(ev.decode(msg.data))
        self._changed.set()

    def of(self, kind: type[Any], **match: Any) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def wait(
        self, kind: type[Any], timeout: float = 20.0, count: int = 1, **match: Any
    ) -> Any:
        """The `count`-th event of `kind` matching `match`, once it has arrived."""
        await self.wait_until(lambda: len(self.of(kind, **match)) >= count, timeout)
        return self.of(kind, **match)[count - 1]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                names = [
                    type(e).__name__ for e in self.events if not isinstance(e, ev.WorkerHeartbeat)
                ]
                raise TimeoutError(f"condition not met within {timeout} s; saw {names}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return True


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[Client, Recorder]]:
    nc = await nats.connect(nats_url)
    recorder = Recorder()
    await nc.subscribe("jobs.>", cb=recorder.on_msg)
    await nc.subscribe("workers.>", cb=recorder.on_msg)
    try:
        yield nc, recorder
    finally:
        await nc.close()
