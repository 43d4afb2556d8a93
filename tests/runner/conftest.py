"""Fixtures for the runner's tests: real backends, a real Docker engine and Swarm.

A test marked `docker` skips, with the reason shown, only where no engine can be reached and
CI is not "true"; in CI a missing engine, Swarm or job image is a failure, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from services.runner import spec
from services.runner.labels import label_filter

IMAGE = "cumulus-job:latest"


def _problem(kind: str) -> str | None:
    """Why `kind` cannot run here, or None."""
    if kind == "process":
        return None
    if not spec.reachable():
        return "no Docker engine reachable (sudo infra/ci/setup-docker.sh)"
    client = spec.engine(timeout=10)
    try:
        try:
            client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            return f"the job image {IMAGE} is missing (infra/images/build-images.sh)"
        if kind == "swarm" and client.info()["Swarm"]["LocalNodeState"] != "active":
            return "Swarm is not active (docker swarm init --advertise-addr 127.0.0.1)"
    finally:
        client.close()
    return None


def need(kind: str) -> None:
    problem = _problem(kind)
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{kind} backend needed in CI: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    need("docker")
    client = spec.engine()
    yield client
    client.close()


def leftovers(client: docker.DockerClient, job_id: str) -> list[str]:
    """Services, containers and volumes of `job_id` still on the engine."""
    # The low-level calls list without inspecting each item, which races with removal.
    wanted = label_filter(job_id=job_id)
    api = client.api
    found = [f"container {c['Names']}" for c in api.containers(all=True, filters=wanted)]
    if client.info()["Swarm"]["LocalNodeState"] == "active":
        found += [f"service {s['Spec']['Name']}" for s in api.services(filters=wanted)]
    found += [f"volume {v['Name']}" for v in api.volumes(filters=wanted)["Volumes"] or []]
    return found


def make_wheel(where: Path, name: str = "cumulus_probe", version: str = "1.0") -> Path:
    """A tiny pure-Python wheel made by hand: requirements tests need no index."""
    import base64
    import hashlib
    import zipfile

    where.mkdir(parents=True, exist_ok=True)
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel
