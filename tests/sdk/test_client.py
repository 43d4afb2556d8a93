"""The SDK as a user drives it, against the embedded stack: blocking and asyncio clients, job
handles, `map`, `@remote`, typed errors and retries."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator

import pytest

from cumulus import (
    AsyncClient,
    Client,
    CumulusError,
    Internal,
    Job,
    JobInfo,
    JobOptions,
    JobStatus,
    RemoteFunction,
    ResourceExhausted,
    RetryPolicy,
    WorkerInfo,
    remote,
)
from services.stack import Stack


def square(x: int) -> int:
    return x * x


def talk(n: int) -> str:
    import sys

    for i in range(n):
        print(f"line {i}")
    print("a warning", file=sys.stderr)
    return "said"


def sleepy(seconds: float) -> str:
    import time as _time

    print("going to sleep", flush=True)
    _time.sleep(seconds)
    return "woke"


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


@pytest.fixture(scope="module")
def sync_client(stack: Stack) -> Iterator[Client]:
    with Client(profile=stack.profile()) as client:
        yield client


def test_run_prints_the_logs_live_and_returns_the_value(
    sync_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sync_client.run(talk, 3, gpu=0.2, duration=600) == "said"
    out, err = capsys.readouterr()
    assert out.splitlines() == ["line 0", "line 1", "line 2"]
    assert "a warning" in err


def test_run_quietly_or_into_a_stream(sync_client: Client) -> None:
    buffer = io.StringIO()
    assert sync_client.run(talk, 1, gpu=0.1, logs=buffer) == "said"
    assert buffer.getvalue().splitlines() == ["line 0", "a warning"]
    assert sync_client.run(square, 9, gpu=0.1, logs=False) == 81


def test_a_job_handle(sync_client: Client) -> None:
    job = sync_client.submit(talk, 2, gpu=0.3, duration=600)
    assert isinstance(job, Job)
    assert [line.text for line in job.logs(follow=True)] == ["line 0", "line 1", "a warning"]
    assert job.result(timeout=30) == "said"
    assert job.wait() is JobStatus.COMPLETED
    status = job.status()
    assert isinstance(status, JobInfo)
    assert status.status is JobStatus.COMPLETED
    assert status.status.is_terminal
    names = [type(e).__name__ for e in job.events()]
    assert names[0] == "JobSubmitted"
    assert names[-1] == "JobCompleted"
    assert [line.text for line in job.logs()] == ["line 0", "line 1", "a warning"]
    again = sync_client.get_job(job.job_id)
    assert again.result() == "said"


def test_result_timeout_leaves_the_job_running_and_cancel_stops_it(
    sync_client: Client,
) -> None:
    job = sync_client.submit(sleepy, 60, gpu=0.1, duration=600)
    with pytest.raises(TimeoutError, match="keeps running"):
        job.result(timeout=0.5)
    assert job.status().status in ("SUBMITTED", "QUEUED", "SCHEDULED", "PARTITIONED", "RUNNING")
    job.cancel()
    with pytest.raises(CumulusError) as info:
        job.result(timeout=30)
    assert info.value.code == "CANCELLED"
    assert job.status().status == "CANCELLED"


def test_a_failing_job_raises_the_typed_error_with_the_remote_traceback(
    sync_client: Client,
) -> None:
    with pytest.raises(Internal) as info:
        sync_client.run(fail_on, 3, 3, gpu=0.1, logs=False)
    assert info.value.code == "INTERNAL"
    assert "ValueError: bad input 3" in info.value.message
    assert "in fail_on" in info.value.remote_traceback


def test_map_over_100_inputs_on_a_tenth_each_keeps_the_input_order(
    sync_client: Client,
) -> None:
    started = time.monotonic()
    values = sync_client.map(square, range(100), gpu=0.1, duration=600, concurrency=25)
    assert values == [x * x for x in range(100)]
    assert time.monotonic() - started < 110


def test_map_raises_the_first_failure_or_returns_it_in_place(sync_client: Client) -> None:
    with pytest.raises(Internal, match="bad input 2"):
        sync_client.map(fail_on, [1, 2, 3], [2, 2, 2], gpu=0.1)
    values = sync_client.map(fail_on, [1, 2, 3], [2, 2, 2], gpu=0.1, return_exceptions=True)
    assert values[0] == 1
    assert values[2] == 3
    assert isinstance(values[1], Internal)


@remote(gpu=0.2, duration=600)
def cube(x: int) -> int:
    print(f"cubing {x}")
    return x**3


def test_remote_runs_here_when_called_and_there_with_remote(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert isinstance(cube, RemoteFunction)
    assert cube.__name__ == "cube"
    assert cube(2) == 8  # here
    here = capsys.readouterr().out
    with Client(profile=stack.profile()) as client:
        fn = cube.options(client=client)
        assert fn.remote(3) == 27
        assert "cubing 3" in capsys.readouterr().out
        assert fn.submit(4).result(timeout=60) == 64
        assert fn.map([1, 2, 3]) == [1, 8, 27]
        assert fn.options(gpu=1).remote(5) == 125
    assert here == "cubing 2\n"


async def test_remote_from_asyncio(stack: Stack) -> None:
    with Client(profile=stack.profile()) as client:
        assert await cube.options(client=client, logs=False).remote_async(6) == 216


async def test_async_map_and_handles(client: AsyncClient) -> None:
    assert await client.map(square, [3, 1, 2], gpu=0.1) == [9, 1, 4]
    job = await client.submit(talk, 1, gpu=0.1)
    lines = [line.text async for line in job.logs(follow=True)]
    assert lines == ["line 0", "a warning"]
    jobs = await client.jobs(limit=500)
    assert all(isinstance(j, JobInfo) for j in jobs)
    assert any(j.job_id == job.job_id for j in jobs)
    workers = await client.workers()
    assert isinstance(workers[0], WorkerInfo)
    assert workers[0].devices[0].free is not None


async def test_cancelling_an_async_run_cancels_the_job(client: AsyncClient) -> None:
    task = asyncio.ensure_future(client.run(sleepy, 60, gpu=0.1, logs=False))
    jobs: list[JobInfo] = []
    deadline = time.monotonic() + 30
    while not jobs and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        jobs = await client.jobs(status=["RUNNING"], limit=500)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    job = client.get_job(jobs[0].job_id)
    assert await job.wait(timeout=30) == "CANCELLED"


async def test_resource_exhausted_is_retried_with_backoff_then_raised(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.2, multiplier=2)
    assert policy.backoffs() == [0.2, 0.4]
    attempts: list[float] = []

    async def full_queue() -> None:  # "not now": a full queue may drain
        attempts.append(time.monotonic())
        raise ResourceExhausted("Job queue is full (5 jobs waiting); retry later")

    with (
        caplog.at_level(logging.WARNING, logger="cumulus"),
        pytest.raises(ResourceExhausted, match="queue is full"),
    ):
        await policy.call("submit", full_queue)
    assert len(attempts) == 3
    assert attempts[-1] - attempts[0] >= 0.6
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    # A job larger than any worker can never fit: raised at once (issue 15, bug 7).
    caplog.clear()
    async with AsyncClient(profile=stack.profile(), retry=policy) as c:
        started = time.monotonic()
        with (
            caplog.at_level(logging.WARNING, logger="cumulus"),
            pytest.raises(ResourceExhausted) as info,
        ):
            await c.run(square, 2, gpu=8, logs=False)
        assert time.monotonic() - started < 0.5
    assert info.value.message == (
        "No workers with sufficient GPU capacity (requested: 8, max available: 2)"
    )
    assert info.value.permanent
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_retry_policy_is_validated() -> None:
    with pytest.raises(CumulusError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    assert RetryPolicy().backoffs() == [1.0, 2.0]  # the seed's run_with_retry
    assert RetryPolicy(max_attempts=6, max_backoff_s=5).backoffs() == [1, 2, 4, 5, 5]


def test_an_invalid_gpu_amount_is_not_retried(sync_client: Client) -> None:
    started = time.monotonic()
    with pytest.raises(CumulusError) as info:
        sync_client.run(square, 1, gpu=2.3)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.message == "Invalid GPU amount: 2.3. Must be 0.1-0.9 or whole number 1-8"
    assert time.monotonic() - started < 1


def test_an_unreachable_cluster_is_unavailable() -> None:
    with pytest.raises(CumulusError) as info:
        Client("nats://127.0.0.1:1")
    assert info.value.code == "UNAVAILABLE"
    assert "cumulus up" in info.value.message


def test_job_options_are_one_validated_value(sync_client: Client) -> None:
    options = JobOptions(gpu=0.1, duration=600, requirements=["tinystats"], env={"A": "1"})
    assert options.requirements == ("tinystats",)
    assert options.tenths == 1
    assert options.replace(gpu=2).tenths == 20
    with pytest.raises(CumulusError, match="Invalid GPU amount: 0.15"):
        JobOptions(gpu=0.15)
    with pytest.raises(CumulusError, match="requirements must be a list"):
        JobOptions(requirements="numpy")
    assert sync_client.run_call(square, (4,), None, options.replace(requirements=())) == 16
    fn = remote(options=JobOptions(gpu=0.2, duration=600), client=sync_client)(square)
    assert fn.opts.job.gpu == 0.2
    assert fn.options(gpu=0.3).opts.job == JobOptions(gpu=0.3, duration=600)
