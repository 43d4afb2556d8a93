"""Warm maps through the real stack: one job, warm processes, inputs through a work queue."""

from __future__ import annotations

import asyncio
import io
import os
import time

import pytest

from cumulus import AsyncClient
from cumulus._map import InputError
from cumulus._packaging import package_function
from shared import events as ev
from shared.errors import InvalidArgument
from shared.views import JobInfo, JobStatus


def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


def pid_of(_: int) -> int:
    time.sleep(0.02)
    return os.getpid()


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"three is refused ({x})")
    return x


_CALLS: dict[int, int] = {}


def flaky(x: int) -> int:
    """Raises on the first call for each input in this process, then answers."""
    _CALLS[x] = _CALLS.get(x, 0) + 1
    if _CALLS[x] == 1:
        raise RuntimeError(f"first try of {x} fails")
    return x


def crash_on_two(x: int) -> int:
    if x == 2:
        os._exit(7)  # the warm process dies, as under the OOM killer
    return x


def slow(x: int) -> int:
    time.sleep(30)
    return x


async def test_warm_map_answers_every_input_in_order_from_few_processes(
    client: AsyncClient,
) -> None:
    values = await client.map(pid_of, range(40), gpu=0.1, duration=600, warm=3, timeout=60)
    assert len(values) == 40
    # One job, three warm processes: every input was answered by one of at most three pids.
    assert 1 <= len(set(values)) <= 3
    squares = await client.map(square, range(200), gpu=0.1, duration=600, warm=2, timeout=60)
    assert squares == [x * x for x in range(200)]


async def test_unordered_map_gives_every_answer_once(client: AsyncClient) -> None:
    values = await client.map(
        square, range(50), gpu=0.1, duration=600, warm=4, ordered=False, timeout=60
    )
    assert sorted(values) == [x * x for x in range(50)]


async def test_map_logs_say_which_input_printed_them(client: AsyncClient) -> None:
    out = io.StringIO()
    await client.map(square, [5, 6, 7], gpu=0.1, duration=600, warm=1, logs=out, timeout=60)
    lines = set(out.getvalue().splitlines())
    assert {"[input 0] squaring 5", "[input 1] squaring 6", "[input 2] squaring 7"} <= lines


async def test_a_failing_input_does_not_end_the_map(client: AsyncClient) -> None:
    values = await client.map(
        fail_on_three, range(6), gpu=0.1, duration=600, warm=2, return_exceptions=True
    )
    assert [v for i, v in enumerate(values) if i != 3] == [0, 1, 2, 4, 5]
    error = values[3]
    assert isinstance(error, InputError)
    assert error.index == 3
    assert error.remote_type == "ValueError"
    assert "three is refused (3)" in error.message
    assert "Traceback" in error.remote_traceback
    # Without return_exceptions, the failing input's error is raised (after all answered).
    with pytest.raises(InputError, match="three is refused"):
        await client.map(fail_on_three, range(6), gpu=0.1, duration=600, warm=2)


async def test_retries_try_a_raising_input_again(client: AsyncClient) -> None:
    values = await client.map(flaky, range(5), gpu=0.1, duration=600, warm=1, retries=1)
    assert values == list(range(5))
    failed = await client.map(
        flaky, range(5), gpu=0.1, duration=600, warm=1, return_exceptions=True
    )
    assert all(isinstance(v, InputError) for v in failed)


async def test_an_input_that_kills_its_process_is_answered_and_the_rest_go_on(
    client: AsyncClient,
) -> None:
    values = await client.map(
        crash_on_two, range(5), gpu=0.1, duration=600, warm=2, return_exceptions=True
    )
    assert [values[i] for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    assert isinstance(values[2], InputError)
    assert "died" in values[2].message
    assert "3 times" in values[2].message


async def test_a_cancelled_map_stops_promptly(client: AsyncClient) -> None:
    before = {job.job_id for job in await client.jobs(limit=1000)}
    task = asyncio.create_task(client.map(slow, range(4), gpu=0.1, duration=600, warm=2))
    deadline = time.monotonic() + 30
    running: list[JobInfo] = []
    while not running and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        running = [j for j in await client.jobs(status=["RUNNING"]) if j.job_id not in before]
    assert running, "the map's job never ran"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    job = client.get_job(running[0].job_id)
    started = time.monotonic()
    while (status := (await job.status()).status) != JobStatus.CANCELLED:
        assert time.monotonic() - started < 15, f"the map's job was not cancelled: {status}"
        await asyncio.sleep(0.2)


async def test_bad_map_requests_are_refused_with_the_field(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument, match="warm must be 1-64"):
        await client.map(square, range(3), gpu=0.1, warm=65)
    with pytest.raises(InvalidArgument, match="retries must be 0-10"):
        await client.map(square, range(3), gpu=0.1, warm=1, retries=11)
    assert await client.map(square, [], gpu=0.1, warm=2) == []
    # The gateway checks what an SDK sends, too.
    package = package_function(square, (), {}, (), "pickle")
    for spec, field in (
        (ev.MapSpec(warm=0, inputs=1), "map.warm must be 1-64"),
        (ev.MapSpec(warm=1, inputs=0), "map.inputs must be 1-"),
        (ev.MapSpec(warm=1, inputs=1, retries=-1), "map.retries must be 0-10"),
    ):
        with pytest.raises(InvalidArgument, match=field):
            await client.submit_package(package, map_spec=spec, gpu=0.1, duration=600)


@pytest.mark.docker
async def test_warm_map_in_a_container(make_stack) -> None:
    """The Docker backend: the map's host in the job container, its socket in the bind-mounted
    job directory, the worker's runner feeding it from outside."""
    from tests.security.test_docker_backend import docker_needed

    docker_needed()
    stack = await make_stack(workers=["docker-1"], devices="1x16GiB", backend="docker")
    async with AsyncClient(profile=stack.profile()) as client:
        out = io.StringIO()
        values = await client.map(
            square, range(300), gpu=0.1, duration=600, warm=3, logs=out, timeout=120
        )
        assert values == [x * x for x in range(300)]
        assert "[input 299] squaring 299" in out.getvalue().splitlines()
