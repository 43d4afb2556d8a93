"""Three hosts as nested Docker engines in one Swarm, with a local registry: what the fleet test
stands on. A job image reaches every node by digest; a runner talking to the manager's engine
runs a job on another host's node and leaves nothing behind; a stopped engine is seen down
and comes back ready.

Run: .venv/bin/python -m pytest -q -s tests/fleet/test_hosts.py (the figures are printed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cumulus import package_function
from services.runner.backend import Backend, Exit, Launch
from services.runner.config import make_backend
from shared.config import load
from shared.errors import ConfigError
from tests.fleet.hosts import Hosts, hosts_for, wait_for
from tests.runner.test_backend_contract import Run

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(300)]

FLEET_PREFIX = "cuf-h3t"
JOB_IMAGE = "cumulus-job:latest"


@pytest.fixture(scope="module")
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    yield from hosts_for(request)


def report(what: str, seconds: float) -> None:
    print(f"[fleet] {what}: {seconds:.2f} s")


def test_three_hosts_form_one_swarm_with_labels_and_a_registry(hosts: Hosts) -> None:
    t = hosts.timings
    report("3 engines up", t.engines)
    report("swarm init + 2 joins + labels", t.swarm)
    report("registry trusted by every engine (daemon.json + SIGHUP)", t.registry)
    report("everything up", t.total)
    nodes = hosts.manager.nodes.list()
    assert sorted(n.attrs["Description"]["Hostname"] for n in nodes) == [
        hosts.hostname(i) for i in hosts.indices
    ]
    assert all(n.attrs["Status"]["State"] == "ready" for n in nodes)
    for i in hosts.indices:
        labels = hosts.node_labels(i)
        assert labels["gpu.count"] == "2"
        assert labels["gpu.0.name"] == "Virtual GPU"
        assert labels["gpu.1.memory"] == "40960"
        assert labels["chronos.installed"] == "true"
        assert labels["ssh.address"] == hosts.host(i).ip
        probe = (
            f"import urllib.request as u; print(u.urlopen('http://{hosts.registry}/v2/').status)"
        )
        got = hosts.exec(i, f'python3 -c "{probe}"')
        assert got.strip() == "200"


@pytest.fixture(scope="module")
def job_image(hosts: Hosts) -> str:
    """The job image pushed once and pulled by digest on hosts 1 and 3; host 2
    is left to Swarm, which pulls it by digest when the job's service is placed there."""
    reference = hosts.push(JOB_IMAGE)
    report(f"push {JOB_IMAGE} once", hosts.timings.pushes[JOB_IMAGE])
    for i, took in hosts.pull_all(reference, [1, 3]).items():
        report(f"pull by digest on host {i}", took)
    return reference


def test_the_job_image_reaches_every_node_by_digest(hosts: Hosts, job_image: str) -> None:
    registry, digest = job_image.split("/", 1)[0], job_image.rsplit("@", 1)[1]
    assert registry == hosts.registry
    assert digest.startswith("sha256:")
    for i in (1, 3):
        image = hosts.client(i).images.get(job_image)
        assert job_image in image.attrs["RepoDigests"]
    assert not hosts.client(2).images.list(name=job_image.split("@", 1)[0])


@pytest.fixture
def on_manager(hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> str:
    """The runner's engine is host 1's (the manager), not the node its jobs run on."""
    monkeypatch.setenv("DOCKER_HOST", hosts.docker_url(1))
    return hosts.docker_url(1)


def greet(seconds: float) -> int:
    import time as t

    print("hello from host 2", flush=True)
    t.sleep(seconds)
    return 2 + 2


async def test_a_runner_on_another_engine_runs_a_job_pinned_to_its_own_node(
    hosts: Hosts, job_image: str, on_manager: str
) -> None:
    root: Path = hosts.host_dir(2) / "runner"
    config = load(
        environ={
            "CUMULUS_WORKER_BACKEND": "swarm",
            "CUMULUS_WORKER_ID": "fleet-h2",
            "CUMULUS_DATA_DIR": str(hosts.host_dir(2) / "data"),
            "CUMULUS_CONTAINER_IMAGE": job_image,
            "CUMULUS_CONTAINER_SWARM_NODE": hosts.hostname(2),  # a hostname resolves to its ID
        }
    )
    backend = make_backend(config, root, root / "launches.log")
    try:
        started = time.monotonic()
        run = await Run(backend).start(greet, 1.5)
        await run.follow(timeout=60, stop_after=1)
        report(
            "first pinned job: start -> first output line (Swarm pulls the image on host 2)",
            time.monotonic() - started,
        )
        assert [n for n in hosts.containers(2) if n.startswith("cumulus-")], hosts.containers(2)
        assert not [n for n in hosts.containers(3) if n.startswith("cumulus-")]
        await run.follow(timeout=60)
        report("first pinned job: start -> ended, result read", time.monotonic() - started)
        assert run.out() == ["hello from host 2"]
        assert run.value() == 4
        ended = await ended_of(backend, run)
        assert ended.code == 0
        tasks = hosts.manager.api.tasks(filters={"service": run.handle})
        assert [task["NodeID"] for task in tasks] == [hosts.node_id(2)]
        image = hosts.client(2).images.get(job_image)  # pulled by digest by Swarm on host 2
        assert job_image in image.attrs["RepoDigests"]
        await backend.kill(run.job_id, 1, run.handle)
        await backend.cleanup(run.job_id, 1)
    finally:
        await backend.close()  # type: ignore[attr-defined]
    await asyncio.to_thread(nothing_left, hosts)


async def ended_of(backend: Backend, run: Run, within: float = 15) -> Exit:
    """How the job ended, as the backend reports it (the task's state, polled)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (ended := await backend.exited(run.job_id, 1, run.handle)) is not None:
            return ended
        await asyncio.sleep(0.1)
    raise AssertionError(f"the backend did not report the end of {run.job_id} in {within} s")


async def test_a_job_with_requirements_is_refused_clearly_when_docker_host_is_the_manager(
    hosts: Hosts, job_image: str, on_manager: str
) -> None:
    """The older way (DOCKER_HOST = a manager on another host): its environment volume would
    be made on the manager, not on the node the job runs on. The fix the message names,
    container.swarm_manager, runs it: tests/fleet/test_agent_on_host.py."""
    root = hosts.host_dir(3) / "runner"
    config = load(
        environ={
            "CUMULUS_WORKER_BACKEND": "swarm",
            "CUMULUS_WORKER_ID": "fleet-h3",
            "CUMULUS_CONTAINER_IMAGE": job_image,
            "CUMULUS_CONTAINER_SWARM_NODE": hosts.node_id(3),
        }
    )
    backend = make_backend(config, root, root / "launches.log")
    try:
        launch = Launch(
            job_id="reqs",
            attempt=1,
            package=package_function(greet, (0.0,)),
            nonce="n" * 32,
            env={},
            requirements=["cumulus_probe"],
        )
        with pytest.raises(RuntimeError, match="container.swarm_manager at the manager"):
            await backend.start(launch)
    finally:
        await backend.close()  # type: ignore[attr-defined]
    await asyncio.to_thread(nothing_left, hosts)


def test_a_worker_engine_or_an_unknown_node_is_a_config_error(
    hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an operator who set DOCKER_HOST, container.swarm_manager(_tls) or
    container.swarm_node wrong is told at start."""
    root = hosts.host_dir(2) / "runner-bad"
    environ = {"CUMULUS_WORKER_BACKEND": "swarm", "CUMULUS_WORKER_ID": "fleet-bad"}
    monkeypatch.setenv("DOCKER_HOST", hosts.docker_url(2))  # a Swarm worker's engine
    with pytest.raises(ConfigError, match="is a Swarm worker") as worker:
        make_backend(load(environ=environ), root, root / "launches.log")
    assert worker.value.key == "container.swarm_manager"
    environ["CUMULUS_CONTAINER_SWARM_MANAGER"] = hosts.docker_url(3)  # not a manager either
    with pytest.raises(ConfigError, match="is not a Swarm manager") as worker:
        make_backend(load(environ=environ), root, root / "launches.log")
    assert worker.value.key == "container.swarm_manager"
    environ["CUMULUS_CONTAINER_SWARM_MANAGER_TLS"] = str(root / "no-certs")
    with pytest.raises(ConfigError, match="lacks ca.pem, cert.pem, key.pem") as worker:
        make_backend(load(environ=environ), root, root / "launches.log")
    assert worker.value.key == "container.swarm_manager_tls"
    del environ["CUMULUS_CONTAINER_SWARM_MANAGER"], environ["CUMULUS_CONTAINER_SWARM_MANAGER_TLS"]
    monkeypatch.setenv("DOCKER_HOST", hosts.docker_url(1))
    environ["CUMULUS_CONTAINER_SWARM_NODE"] = "no-such-node"
    with pytest.raises(ConfigError, match="no Swarm node 'no-such-node'"):
        make_backend(load(environ=environ), root, root / "launches.log")


def nothing_left(hosts: Hosts, within: float = 20) -> None:
    """No service in the Swarm, no container on any engine (Swarm removes a task's container
    on its node a second or two after the service; the claim's marker goes within a second)."""

    def clean() -> bool:
        return not hosts.services() and not any(hosts.containers(i) for i in hosts.indices)

    try:
        wait_for("nothing left on the hosts", clean, within, every=0.25)
    except Exception:
        found = {i: hosts.containers(i) for i in hosts.indices}
        raise AssertionError(f"left: services {hosts.services()}, containers {found}") from None


def test_a_stopped_engine_is_seen_down_then_ready_again(hosts: Hosts) -> None:
    started = time.monotonic()
    hosts.stop_engine(3)
    report("stop host 3's engine", time.monotonic() - started)
    report("node seen down after the stop", hosts.wait_node(3, "down", timeout=60))
    assert not hosts.engine_running(3)
    assert hosts.node_state(2) == "ready"
    started = time.monotonic()
    hosts.start_engine(3)
    report("engine started -> node ready", time.monotonic() - started)
    assert hosts.node_state(3) == "ready"
    assert hosts.node_labels(3)["gpu.count"] == "2"  # the Swarm kept its labels
