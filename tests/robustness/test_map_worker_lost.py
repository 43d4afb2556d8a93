"""A warm map whose worker dies mid-map (kill -9 of its agent): no input is lost, each is
answered once, and the map finishes on the other worker."""

from __future__ import annotations

import asyncio
import collections
import time

import msgspec
import nats.errors
import nats.js.errors

from cumulus import AsyncClient
from services.runner.mapfeed import MapAnswers
from services.stack import Stack
from shared import subjects
from shared.views import JobInfo, JobStatus

INPUTS = 400


def work(x: int) -> int:
    import time as _time

    _time.sleep(0.03)
    return x * 3


async def _answers_stored(stack: Stack, user: str, job_id: str) -> list[tuple[str, int]]:
    """(worker, index) of every answer the RESULTS stream holds for the map."""
    nc = await stack.connect()
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"results.{user}.{job_id}.*.map", ordered_consumer=True)
        out: list[tuple[str, int]] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except nats.errors.TimeoutError:
                return out
            worker = msg.subject.split(".")[3]
            batch = msgspec.msgpack.decode(msg.data, type=MapAnswers)
            out += [(worker, index) for index, _ok, _value in batch.answers]
    finally:
        await nc.close()


async def _start_map(client: AsyncClient) -> tuple[asyncio.Task[list[int]], JobInfo]:
    """The map of `work` over INPUTS, started, and its job once it runs."""
    task = asyncio.create_task(
        client.map(work, range(INPUTS), gpu=0.5, duration=600, warm=2, timeout=180)
    )
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the map never ran"
        await asyncio.sleep(0.2)
        if running := await client.jobs(status=["RUNNING"]):
            return task, running[0]


async def _stored_once(stack: Stack, job_id: str) -> list[tuple[str, int]]:
    """The map's stored answers, after checking each input has exactly one."""
    stored = await _answers_stored(stack, "default", job_id)
    per_index = collections.Counter(index for _worker, index in stored)
    assert sorted(per_index) == list(range(INPUTS))
    assert set(per_index.values()) == {1}, "an input was answered (stored) more than once"
    return stored


async def test_a_lost_worker_mid_map_loses_no_input_and_answers_each_once(make_stack) -> None:
    stack: Stack = await make_stack(
        workers=["worker-1", "worker-2"],
        devices="1x16GiB",
        env={"CUMULUS_WORKER_HEARTBEAT_S": "0.5"},
    )
    async with AsyncClient(profile=stack.profile()) as client:
        task, job = await _start_map(client)
        await asyncio.sleep(2.0)  # some inputs answered, most not
        assert not task.done()
        victim = job.worker_id
        stack.kill9(f"runner-{victim}")
        stack.kill9(f"partitioner-{victim}")
        values = await task
        assert values == [x * 3 for x in range(INPUTS)]
        info = await _ended(client, job.job_id)
        assert info.status == JobStatus.COMPLETED
        assert info.worker_id != victim
    stored = await _stored_once(stack, job.job_id)
    by_worker = collections.Counter(worker for worker, _index in stored)
    assert by_worker[victim] > 0, "the lost worker answered nothing before it died"
    assert sum(n for w, n in by_worker.items() if w != victim) > 0
    assert await _queue_closed(stack, job.job_id), "the map's input queue outlived it"


async def test_a_runner_killed_mid_map_comes_back_to_it(make_stack) -> None:
    """kill -9 of the runner alone, restarted: the job process waits for it, the new runner
    reconnects, and the chunks the old one held come back from the queue."""
    stack: Stack = await make_stack(workers=["worker-1"], devices="1x16GiB")
    async with AsyncClient(profile=stack.profile()) as client:
        task, job = await _start_map(client)
        await asyncio.sleep(2.0)
        assert not task.done()
        stack.kill9("runner-worker-1")
        await asyncio.sleep(0.5)
        stack.procs["runner-worker-1"].start()
        assert await task == [x * 3 for x in range(INPUTS)]
        info = await _ended(client, job.job_id)
        assert info.status == JobStatus.COMPLETED
        assert info.attempt == job.attempt  # the same attempt, carried on
    await _stored_once(stack, job.job_id)


async def _ended(client: AsyncClient, job_id: str, within: float = 30.0) -> JobInfo:
    """The job's status once it has ended (its answers come before its end)."""
    deadline = time.monotonic() + within
    while True:
        info = await client.get_job(job_id).status()
        if info.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
            return info
        assert time.monotonic() < deadline, f"the map's job did not end: {info.status}"
        await asyncio.sleep(0.2)


async def _queue_closed(stack: Stack, job_id: str, within: float = 10.0) -> bool:
    nc = await stack.connect()
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                await js.consumer_info(subjects.MAPIN_STREAM, subjects.map_consumer(job_id))
            except nats.js.errors.NotFoundError:
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await nc.close()
