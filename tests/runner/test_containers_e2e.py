"""Jobs in real containers, end to end: SDK → gateway → scheduler → partitioner → runner on
the Docker engine and on Swarm. Each outcome is checked for what it leaves behind with the
Docker API: nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest

from cumulus import AsyncClient, CumulusError, DeadlineExceeded
from services.stack import Stack
from shared import bus
from shared import events as ev
from tests.runner.conftest import leftovers, make_wheel, need

pytestmark = [pytest.mark.docker, pytest.mark.slow]

KINDS = ["docker", "swarm"]


@pytest.fixture(scope="module", params=KINDS)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    kind: str = request.param
    need(kind)
    data = tmp_path_factory.mktemp(f"stack-{kind}")
    wheels = data / "wheels"
    make_wheel(wheels)
    s = Stack(
        data_dir=data,
        workers=[f"{kind}-1"],
        backend=kind,
        env={
            "CUMULUS_LIMITS_MIN_DURATION": "1",
            "CUMULUS_CONTAINER_WHEELHOUSE": str(wheels),
        },
    )
    try:
        await s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(profile=stack.profile()) as c:
        yield c


@pytest.fixture(scope="module")
def engine_() -> docker.DockerClient:
    need("docker")
    from services.runner.spec import engine

    return engine()


async def nothing_left(engine: docker.DockerClient, job_id: str, within: float = 5.0) -> None:
    found = leftovers(engine, job_id)
    for _ in range(int(within / 0.1)):  # removal is asynchronous on Swarm
        if not found:
            break
        await asyncio.sleep(0.1)
        found = leftovers(engine, job_id)
    assert found == []


async def started(job: Any, timeout: float = 30) -> None:
    async def wait() -> None:
        async for event in job.events():
            if isinstance(event, ev.JobLog):
                return

    await asyncio.wait_for(wait(), timeout)


def job_containers(engine: docker.DockerClient, job_id: str) -> list[Any]:
    return list(engine.containers.list(filters={"label": [f"cumulus.job={job_id}"]}))


def add(a: int, b: int) -> int:
    return a + b


def many_lines(n: int) -> str:
    for i in range(n):
        print(f"line {i}")
    return "printed"


def sleeper(seconds: float) -> str:
    import time as t

    print("sleeping", flush=True)
    t.sleep(seconds)
    return "woke"


def crash() -> None:
    import os

    print("going down", flush=True)
    os._exit(7)


def probe() -> dict[str, Any]:
    """What a job may do by default: network, writes, privileges."""
    import os
    import socket

    out: dict[str, Any] = {"uid": os.getuid()}
    for host in ("172.17.0.1", "1.1.1.1"):
        try:
            socket.create_connection((host, 4222 if host.startswith("172") else 443), 1).close()
            out[host] = "reached"
        except OSError as exc:
            out[host] = type(exc).__name__
    for path in ("/job/ok", "/tmp/ok", "/etc/evil", "/evil", "/usr/evil", "/home/evil"):
        try:
            with open(path, "w") as f:
                f.write("x")
            out[path] = "written"
        except OSError:
            out[path] = "refused"
    with open("/proc/self/status") as f:
        status = f.read()
    out["NoNewPrivs"] = [ln.split()[1] for ln in status.splitlines() if ln.startswith("NoNewPrivs")]
    out["CapEff"] = [ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff")]
    return out


def uses_probe_package() -> tuple[int, str, float]:
    import os

    import cumulus_probe  # type: ignore[import-not-found]

    ready = os.path.join(os.path.dirname(os.path.dirname(cumulus_probe.__file__)), ".cumulus-ready")
    return cumulus_probe.VALUE, cumulus_probe.__file__, os.stat(ready).st_mtime


async def test_two_plus_two(client: AsyncClient, engine_: docker.DockerClient) -> None:
    job = await client.submit(add, 2, 2, gpu=0.5, duration=600)
    assert await job.result(timeout=60) == 4
    status = await job.status()
    assert status.status == "COMPLETED"
    await nothing_left(engine_, job.job_id)


async def test_ten_thousand_lines_arrive_in_order(client: AsyncClient) -> None:
    job = await client.submit(many_lines, 10_000, gpu=0.1, duration=600)
    lines = [line.text async for line in job.logs(follow=True)]
    assert lines == [f"line {i}" for i in range(10_000)]
    assert await job.result(timeout=30) == "printed"


async def test_timeout_is_deadline_exceeded(
    client: AsyncClient, engine_: docker.DockerClient
) -> None:
    job = await client.submit(sleeper, 60, gpu=0.1, duration=2)
    with pytest.raises(CumulusError) as info:
        await job.result(timeout=60)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert "Job exceeded allocated duration of 2 seconds" in info.value.message
    assert isinstance(info.value, DeadlineExceeded)
    assert (info.value.duration_s, info.value.job_id) == (2, job.job_id)
    await nothing_left(engine_, job.job_id)


async def test_cancel_removes_the_container_within_2_s(
    client: AsyncClient, engine_: docker.DockerClient
) -> None:
    job = await client.submit(sleeper, 60, gpu=0.1, duration=600)
    await started(job)
    assert job_containers(engine_, job.job_id)
    asked = time.monotonic()
    await job.cancel()
    for _ in range(100):
        if not job_containers(engine_, job.job_id):
            break
        await asyncio.sleep(0.05)
    assert time.monotonic() - asked < 2.0
    assert await job.wait(timeout=30) == "CANCELLED"
    await nothing_left(engine_, job.job_id)


async def test_a_container_killed_from_outside_fails_clearly(
    client: AsyncClient, engine_: docker.DockerClient
) -> None:
    job = await client.submit(sleeper, 60, gpu=0.1, duration=600)
    await started(job)
    for container in job_containers(engine_, job.job_id):
        container.kill()
    with pytest.raises(CumulusError) as info:
        await job.result(timeout=30)
    assert info.value.code == "INTERNAL"
    assert "from outside" in info.value.message
    await nothing_left(engine_, job.job_id)


async def test_a_crashing_job_fails_and_leaves_nothing(
    client: AsyncClient, engine_: docker.DockerClient
) -> None:
    job = await client.submit(crash, gpu=0.1, duration=600)
    with pytest.raises(CumulusError) as info:
        await job.result(timeout=60)
    assert "exited with code 7" in info.value.message
    assert [line.text async for line in job.logs()] == ["going down"]
    await nothing_left(engine_, job.job_id)


async def test_isolated_by_default(client: AsyncClient) -> None:
    seen = await client.run(probe, gpu=0.1, duration=600, logs=None, timeout=60)
    assert seen["uid"] != 0
    assert seen["172.17.0.1"] != "reached"
    assert seen["1.1.1.1"] != "reached"
    assert seen["/job/ok"] == seen["/tmp/ok"] == "written"
    assert {seen[p] for p in ("/etc/evil", "/evil", "/usr/evil", "/home/evil")} == {"refused"}
    assert seen["NoNewPrivs"] == ["1"]
    assert seen["CapEff"] == ["0000000000000000"]


def _drop_env_volume(engine: docker.DockerClient, requirements: list[str]) -> None:
    from services.runner.jobdirs import requirements_key
    from services.runner.labels import LABEL_ENV

    key = requirements_key(requirements)
    deadline = time.monotonic() + 10  # the last job's container may still be going
    for volume in engine.volumes.list(filters={"label": [f"{LABEL_ENV}={key}"]}):
        while True:
            try:
                volume.remove(force=True)
                break
            except docker.errors.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


async def test_requirements_install_once_then_come_from_the_cache(
    client: AsyncClient, stack: Stack, engine_: docker.DockerClient
) -> None:
    _drop_env_volume(engine_, ["cumulus_probe==1.0"])
    began = time.time()
    first = await client.run(
        uses_probe_package,
        gpu=0.1,
        duration=600,
        requirements=["cumulus_probe==1.0"],
        logs=None,
        timeout=120,
    )
    second = await client.run(
        uses_probe_package,
        gpu=0.1,
        duration=600,
        requirements=["cumulus_probe==1.0"],
        logs=None,
        timeout=120,
    )
    assert first[0] == second[0] == 42
    assert first[1].startswith("/env/site/")
    assert first[2] >= began - 1  # installed by this test's first job…
    assert second[2] == first[2]  # …and the second imported that very install
    _drop_env_volume(engine_, ["cumulus_probe==1.0"])


async def test_a_revoked_placement_is_killed_without_an_outcome(
    client: AsyncClient, stack: Stack, engine_: docker.DockerClient
) -> None:
    job = await client.submit(sleeper, 60, gpu=0.1, duration=600)
    await started(job)
    status = await job.status()
    revoked = ev.PlacementRevoked(
        job_id=job.job_id,
        user=status.user,
        worker_id=stack.workers[0],
        attempt=1,
        reason="test: worker lost",
    )
    scheduler = await stack.connect("scheduler", "scheduler")  # only it revokes placements
    try:
        await scheduler.jetstream().publish(bus.subject_of(revoked), ev.encode(revoked))
    finally:
        await scheduler.close()
    await nothing_left(engine_, job.job_id)
    names = [type(e).__name__ async for e in job.events(follow=False)]
    assert not any(n in names for n in ("JobCompleted", "JobFailed", "JobCancelled"))


async def test_runner_crash_mid_job_then_exactly_one_result_and_nothing_left(
    client: AsyncClient, stack: Stack, engine_: docker.DockerClient
) -> None:
    job = await client.submit(sleeper, 2, gpu=0.1, duration=600)
    await started(job)
    runner = f"runner-{stack.workers[0]}"
    stack.kill9(runner)
    stack.procs[runner].start()
    assert await job.result(timeout=60) == "woke"
    names = [type(e).__name__ async for e in job.events(follow=False)]
    assert names.count("JobCompleted") == 1
    assert names.count("JobStarted") == 1
    await nothing_left(engine_, job.job_id)
