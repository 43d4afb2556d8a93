"""The client side survives the cluster's restarts: nothing lost, nothing repeated.

A gateway killed with SIGKILL and started again while `run()` waits does not lose the result
or repeat a log line; a submit made while the gateway is down is retried (UNAVAILABLE) until it
is back, and is still one job. A restarted nats-server resumes the event stream where it was.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from cumulus import AsyncClient, RetryPolicy
from services.stack import Stack
from tests.conftest import StackFactory

pytestmark = pytest.mark.slow

PATIENT = RetryPolicy(max_attempts=8, initial_backoff_s=0.5, max_backoff_s=2)


def count_slowly(n: int, pause: float) -> int:
    import time as _time

    for i in range(n):
        print(f"tick {i}", flush=True)
        _time.sleep(pause)
    return n


async def _until_running(client: AsyncClient, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = await client.jobs(status=["RUNNING"])
        if running:
            return running[0].job_id
        await asyncio.sleep(0.1)
    raise AssertionError("no job started")


async def test_a_gateway_killed_and_restarted_during_run_loses_nothing(
    make_stack: StackFactory,
) -> None:
    stack: Stack = await make_stack()
    out = io.StringIO()
    async with AsyncClient(profile=stack.profile(), retry=PATIENT) as client:
        run = asyncio.ensure_future(client.run(count_slowly, 12, 0.25, gpu=0.5, logs=out))
        job_id = await _until_running(client)
        stack.kill9("gateway")
        await asyncio.sleep(1.5)  # the job goes on; the client's API is gone meanwhile
        stack.restart("gateway")
        assert await asyncio.wait_for(run, 60) == 12
        assert out.getvalue().splitlines() == [f"tick {i}" for i in range(12)]
        status = await client.get_job(job_id).status()  # retried until the gateway answers
        assert status.status == "COMPLETED"


async def test_a_submit_while_the_gateway_is_down_is_retried_until_it_is_back(
    make_stack: StackFactory,
) -> None:
    stack: Stack = await make_stack()
    async with AsyncClient(profile=stack.profile(), retry=PATIENT) as client:
        stack.kill9("gateway")

        async def bring_back() -> None:
            await asyncio.sleep(2)
            stack.restart("gateway")

        back = asyncio.ensure_future(bring_back())
        assert await asyncio.wait_for(client.run(count_slowly, 2, 0, gpu=0.1, logs=False), 60) == 2
        await back
        assert len(await client.jobs()) == 1  # retried submits are the same job


async def test_the_event_stream_resumes_after_nats_restarts(make_stack: StackFactory) -> None:
    stack: Stack = await make_stack()
    out = io.StringIO()
    async with AsyncClient(profile=stack.profile(), retry=PATIENT) as client:
        run = asyncio.ensure_future(client.run(count_slowly, 16, 0.25, gpu=0.5, logs=out))
        await _until_running(client)
        stack.kill9("nats")
        await asyncio.sleep(1)
        stack.restart("nats")
        assert await asyncio.wait_for(run, 90) == 16
        assert out.getvalue().splitlines() == [f"tick {i}" for i in range(16)]
