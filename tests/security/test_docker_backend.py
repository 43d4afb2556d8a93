"""Findings 3 and 5 on the Docker backend: a job in a container cannot reach the bus, and the
variables Cumulus owns are refused whatever the backend (the gateway decides, before any
backend sees the job).

Skips, with the reason shown, where no Docker engine or job image is reachable, except in CI
(CI=true), where that is a failure.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cumulus import AsyncClient, InvalidArgument
from services.stack import Stack
from tests.runner.conftest import need


def probe(port: int) -> dict[str, Any]:
    """From inside the job: every way to the host's nats-server."""
    import os
    import socket

    reached = {}
    for host in ("127.0.0.1", "172.17.0.1", "host.docker.internal"):
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                reached[host] = s.recv(64).decode(errors="replace")
        except OSError as exc:
            reached[host] = f"refused: {exc}"
    leaked = sorted(k for k in os.environ if k.startswith(("CUMULUS_NATS", "NATS_")))
    return {"uid": os.getuid(), "reached": reached, "env": leaked}


def docker_needed() -> None:
    """Skip (fail in CI) without an engine; the engine probe leaves its socket to the GC."""
    try:
        need("docker")
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture(scope="module")
async def docker_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    docker_needed()
    s = Stack(
        data_dir=tmp_path_factory.mktemp("stack-docker"), workers=["docker-1"], backend="docker"
    )
    try:
        await s.start()
        yield s
    finally:
        s.stop()


async def test_a_container_job_cannot_reach_the_bus(docker_stack: Stack) -> None:
    async with AsyncClient(profile=docker_stack.profile("bob")) as bob:
        found = await bob.run(
            probe, docker_stack.port, gpu=0.1, duration=600, logs=None, timeout=120
        )
    assert found["uid"] != 0, found
    assert found["env"] == [], found
    for host, what in found["reached"].items():
        assert what.startswith("refused"), (host, what)


@pytest.mark.parametrize(
    "name", ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUMULUS_NETWORK"]
)
async def test_owned_variables_are_refused_on_the_docker_backend(
    docker_stack: Stack, name: str
) -> None:
    async with AsyncClient(profile=docker_stack.profile("bob")) as bob:
        with pytest.raises(InvalidArgument) as refused:
            await bob.submit(probe, 1, gpu=0.1, duration=600, env={name: "0,1"})
    assert name in str(refused.value)
