"""kill -9 a service while 20 jobs are in flight: every job completes exactly once.

Exactly once means, per job: one result, one process launched, one partition created and
released, and one of each lifecycle event on the bus. For the scheduler, the allocation state
it rebuilds from its log is also compared with the state it reported before the kill.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import msgspec
import nats
import pytest

from cumulus import AsyncClient
from services.scheduler.state import rebuild
from services.stack import Stack
from shared import api, subjects
from tests.conftest import partitions_of

pytestmark = pytest.mark.slow

JOBS = 20


def work(i: int, seconds: float) -> int:
    import time as _time

    print(f"job {i} working")
    _time.sleep(seconds)
    return i * i


async def _scheduler_state(nc: nats.NATS) -> dict[str, object]:
    return await api.request(nc, "cumulus.scheduler.state", {}, dict)


async def _wait_started(nc: nats.NATS, count: int, timeout: float = 60) -> None:
    js = nc.jetstream()
    sub = await js.subscribe("jobs.*.*.*.started", ordered_consumer=True)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < count:
            msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            seen.add(subjects.parse_job_subject(msg.subject)[1])
    finally:
        await sub.unsubscribe()


async def _history(nc: nats.NATS) -> dict[str, collections.Counter[str]]:
    """Per job, how many events of each kind the JOBS stream holds."""
    js = nc.jetstream()
    sub = await js.subscribe("jobs.>", ordered_consumer=True)
    info = await js.stream_info(subjects.JOBS_STREAM)
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    got = 0
    try:
        while got < (info.state.messages or 0):
            msg = await sub.next_msg(timeout=10)
            got += 1
            _, job_id, _, name = subjects.parse_job_subject(msg.subject)
            counts[job_id][name] += 1
    finally:
        await sub.unsubscribe()
    return counts


def _launches(stack: Stack, worker: str) -> collections.Counter[str]:
    ledger = stack.data_dir / f"runner-{worker}" / "launches.log"
    return collections.Counter(line.split()[0] for line in ledger.read_text().splitlines())


async def _exactly_once(stack: Stack, nc: nats.NATS, job_ids: list[str]) -> None:
    # Releases follow results; give the partitioners a moment.
    deadline = time.monotonic() + 30
    while True:
        history = await _history(nc)
        if (
            all(history[j]["partition_released"] >= 1 for j in job_ids)
            or time.monotonic() > deadline
        ):
            break
        await asyncio.sleep(0.2)
    for job_id in job_ids:
        counts = history[job_id]
        for name in (
            "submitted",
            "scheduled",
            "partition_ready",
            "started",
            "completed",
            "partition_released",
        ):
            assert counts[name] == 1, f"{job_id}: {name} x{counts[name]} ({dict(counts)})"
        assert counts["failed"] == counts["cancelled"] == counts["timed_out"] == 0
    launches: collections.Counter[str] = collections.Counter()
    for worker in stack.workers:
        launches += _launches(stack, worker)
        assert partitions_of(stack, worker) == []
    assert {j: launches[j] for j in job_ids} == dict.fromkeys(job_ids, 1)
    state = await _scheduler_state(nc)
    allocation = state["allocation"]
    assert allocation["queue"] == []
    assert allocation["placements"] == {}
    for worker in allocation["workers"].values():  # type: ignore[index]
        assert all(held == {} for held in worker["devices"].values())


@pytest.mark.parametrize("victim", ["scheduler", "partitioner-worker-1", "runner-worker-1"])
async def test_kill_9_mid_flight_every_job_completes_exactly_once(make_stack, victim: str) -> None:
    # 2 workers x 2 devices hold 20 jobs of 0.1 .. 0.3: some run, some queue.
    stack: Stack = await make_stack(workers=["worker-1", "worker-2"], devices="2x16GiB")
    nc = await stack.connect()  # the operator reads the bus and the scheduler's state
    async with AsyncClient(profile=stack.profile()) as client:
        amounts = [0.1, 0.2, 0.3, 0.4] * (JOBS // 4)
        jobs = [
            await client.submit(work, i, 1.0, gpu=amounts[i], duration=600) for i in range(JOBS)
        ]
        await _wait_started(nc, 3)
        before = await _scheduler_state(nc) if victim == "scheduler" else None
        stack.kill9(victim)
        await asyncio.sleep(0.5)
        stack.procs[victim].start()
        results = await asyncio.gather(*(job.result(timeout=120) for job in jobs))
        assert results == [i * i for i in range(JOBS)]
        if before is not None:
            # The log holds exactly the state the scheduler reported before the kill.
            replayed = rebuild(stack.data_dir / "scheduler.sqlite", int(before["position"]))
            assert _json(replayed.allocation()) == before["allocation"]
            after = await _scheduler_state(nc)
            assert int(after["startup_position"]) >= int(before["position"])
        await _exactly_once(stack, nc, [j.job_id for j in jobs])
    await nc.close()
    stack.stop()
    # Nothing of the stack outlives it: a killed runner's zygote and its warm spare sandboxes
    # (which hold files under the data dir) end too.
    assert await _left_behind(stack.data_dir, within=20.0) == []


def _holders(root: Path) -> list[str]:
    """Processes with a file open under `root` (pid and command)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
            targets = [os.readlink(fd) for fd in fds]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(t.startswith(f"{root}/") for t in targets):
            found.append(f"{proc.name} {command}")
    return found


async def _left_behind(root: Path, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        left = _holders(root)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


async def test_scheduler_rebuilds_the_same_allocation_after_kill_9(make_stack) -> None:
    stack: Stack = await make_stack(workers=["worker-1", "worker-2"], devices="2x16GiB")
    nc = await stack.connect()  # the operator reads the bus and the scheduler's state
    async with AsyncClient(profile=stack.profile()) as client:
        # 20 jobs x 0.2 GPU fill the pool's 4 devices exactly; while they sleep the scheduler
        # has nothing to do, so its state cannot move between the snapshot and the kill.
        jobs = [await client.submit(work, i, 4.0, gpu=0.2, duration=600) for i in range(JOBS)]
        await _wait_started(nc, JOBS)
        before = await _settled_state(nc)
        stack.kill9("scheduler")
        stack.procs["scheduler"].start()
        await stack.wait_ready()
        after = await _scheduler_state(nc)
        assert after["startup_position"] == before["position"]
        assert after["startup_allocation"] == before["allocation"]
        placed = before["allocation"]["placements"]  # type: ignore[index]
        assert len(placed) == JOBS
        assert await asyncio.gather(*(j.result(timeout=60) for j in jobs)) == [
            i * i for i in range(JOBS)
        ]
        await _exactly_once(stack, nc, [j.job_id for j in jobs])
    await nc.close()


async def _settled_state(nc: nats.NATS, timeout: float = 20) -> dict[str, object]:
    """The scheduler's state once it has applied every event so far (the started ones too)."""
    deadline = time.monotonic() + timeout
    state = await _scheduler_state(nc)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        again = await _scheduler_state(nc)
        if again["position"] == state["position"]:
            return again
        state = again
    raise AssertionError("the scheduler never settled")


def _json(value: object) -> object:
    return msgspec.json.decode(msgspec.json.encode(value))
