"""A client follows the jobs it submits through one feed (cumulus/_jobs.py `Feed`), not one
replay per job: a burst of handles all complete with no watch per job, and where the feed
cannot be trusted (a route that overflowed, a feed that stopped, a job submitted before) a
handle goes on with the job's own replay, losing and repeating nothing.
"""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from typing import Any

import pytest

import cumulus._jobs as jobs_mod
from cumulus import AsyncClient, package_function
from services.stack import Stack
from shared import subjects
from shared.errors import InvalidArgument

BURST = 300
"""Submissions in the burst test (1,000 run by bench/utilisation.py --seconds 0 --jobs 1000)."""


def echo(x: int) -> int:
    return x


def nap(seconds: float) -> float:
    import time

    print("napping", flush=True)
    time.sleep(seconds)
    return seconds


def chatty(n: int) -> int:
    for i in range(n):
        print(f"line {i} " + "x" * 60, flush=True)
    return n


def _counting(client: AsyncClient) -> Counter[str]:
    """Count the client's API calls by operation (a watch of one job counts as `watch-job`)."""
    calls: Counter[str] = Counter()
    call = client._call

    async def counted(op: str, body: Any, reply_type: Any, retry: Any = None) -> Any:
        is_job = op == "watch" and isinstance(body, dict) and "job_id" in body
        calls["watch-job" if is_job else op] += 1
        return await call(op, body, reply_type, retry)

    client._call = counted  # type: ignore[method-assign]
    return calls


async def test_a_burst_of_submissions_with_a_handle_each_all_complete_through_one_feed(
    stack: Stack,
) -> None:
    async with AsyncClient(profile=stack.profile()) as client:
        calls = _counting(client)
        jobs = await asyncio.gather(
            *(client.submit(echo, i, gpu=0.1, duration=600) for i in range(BURST))
        )
        values = await asyncio.wait_for(
            asyncio.gather(*(job.result(timeout=600) for job in jobs)), 600
        )
        assert values == list(range(BURST))
        assert calls["submit"] == BURST
        assert calls["watch-job"] == 0  # every handle followed its job through the feed
        assert calls["watch"] == 2  # the feed: one watch of jobs.<user>.>, one of logs.<user>.>


async def test_a_route_that_overflows_goes_on_with_the_jobs_replay_losing_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_mod, "ROUTE_BYTES", 4096)  # the job's output is larger
    out = io.StringIO()
    async with AsyncClient(profile=stack.profile()) as client:
        calls = _counting(client)
        assert await client.run(chatty, 200, gpu=0.1, logs=out) == 200
        assert calls["watch-job"] >= 1
    expected = [f"line {i} " + "x" * 60 for i in range(200)]
    assert out.getvalue().splitlines() == expected  # each line once, in order


async def test_handles_go_on_with_the_jobs_replay_when_the_feed_stops(stack: Stack) -> None:
    async with AsyncClient(profile=stack.profile()) as client:
        job = await client.submit(chatty, 3, gpu=0.1)
        assert client._feed is not None
        await client._feed.close()  # the routes are dropped: their readers ask the gateway
        out = io.StringIO()
        assert await job.result(timeout=60, logs=out) == 3
        assert len(out.getvalue().splitlines()) == 3
        # the next submit starts a new feed
        assert await client.run(echo, 7, gpu=0.1, logs=None) == 7


async def _lose_job_watches(stack: Stack) -> list[str]:
    """Remove every watch consumer over the job stream, as a server's death takes its R1
    consumers (those over the output stream keep beating). The names removed."""
    admin = await stack.connect()
    try:
        js = admin.jetstream()
        names = [
            c.name
            for c in await js.consumers_info(subjects.JOBS_STREAM)
            if c.name.startswith("watch-")
        ]
        for name in names:
            await js.delete_consumer(subjects.JOBS_STREAM, name)
        return names
    finally:
        await admin.close()


async def test_a_feed_that_loses_its_job_consumer_hands_its_jobs_to_their_replay(
    stack: Stack,
) -> None:
    async with AsyncClient(profile=stack.profile()) as client:
        job = await client.submit(nap, 3.0, gpu=0.1)
        assert await _lose_job_watches(stack)  # the feed's, its output one still beating
        # The feed hears nothing from its job consumer: within SILENT_S it starts again and
        # the handle goes on with the job's own replay, long before its route would give up.
        assert await job.result(timeout=25) == 3.0
        assert await client.run(echo, 8, gpu=0.1, logs=None, timeout=30) == 8


async def test_a_jobs_replay_that_loses_its_event_consumer_starts_again(stack: Stack) -> None:
    async with AsyncClient(profile=stack.profile()) as client:
        job = client.get_job((await client.submit(nap, 4.0, gpu=0.1)).job_id)  # no route
        out = io.StringIO()
        waiting = asyncio.create_task(job.result(timeout=40, logs=out))
        deadline = asyncio.get_running_loop().time() + 20
        while "napping" not in out.getvalue():  # its replay (events and output) has begun
            assert asyncio.get_running_loop().time() < deadline, "no output within 20 s"
            await asyncio.sleep(0.1)
        assert await _lose_job_watches(stack)  # the feed's and the replay's event consumer
        assert await waiting == 4.0
        assert out.getvalue().splitlines() == ["napping"]


async def test_a_submit_of_a_job_id_used_before_follows_the_jobs_replay(stack: Stack) -> None:
    package = package_function(echo, (5,))
    async with AsyncClient(profile=stack.profile()) as client:
        first = await client.submit_package(package, gpu=0.1, job_id="feed-again-1")
        assert await first.result(timeout=60) == 5
        again = await client.submit_package(package, gpu=0.1, job_id="feed-again-1")
        assert again._route is None  # not SUBMITTED: its route would lack the beginning
        assert await again.result(timeout=60) == 5
        events = [e.name async for e in again.events()]
        assert events.count("submitted") == 1
        assert events.count("completed") == 1


async def test_a_feed_watch_of_another_users_jobs_is_refused(stack: Stack) -> None:
    async with AsyncClient(profile=stack.profile()) as client:
        inbox = client.nc.new_inbox()
        for head in ("jobs", "logs"):
            with pytest.raises(InvalidArgument, match="your own jobs"):
                await client.request(
                    "watch",
                    {"filter": f"{head}.someone-else.>", "deliver": inbox, "after_last": True},
                )
