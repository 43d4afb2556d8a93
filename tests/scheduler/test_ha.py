"""Scheduler high availability: a standby takes over, and a stale scheduler is fenced off.

Real nats-server, real scheduler processes (`Stack(schedulers=2)`: `scheduler` is instance
`a` and takes the lease at start, `scheduler-b` stands by), a short lease (2 s) so each test
stays short. What a user would notice is asserted: every job completes once with its value,
no job is placed or run twice, and the capacity the scheduler shows matches what runs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from cumulus import AsyncClient
from services.stack import Stack
from shared import api, bus, subjects
from shared import events as ev
from tests.conftest import StackFactory, partitions_of

pytestmark = pytest.mark.slow

TTL_S = 2.0
WORKER = "worker-1"


def square(i: int) -> int:
    import time as _time

    _time.sleep(0.5)
    return i * i


def hold(seconds: float) -> str:
    import time as _time

    _time.sleep(seconds)
    return "held"


class Seen:
    """Every message on `jobs.>` as published (core NATS, live), decoded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def on_msg(self, msg: Any) -> None:
        self.events.append((msg.subject, ev.decode(msg.data)))

    def of(self, kind: type[Any], job_id: str = "") -> list[Any]:
        return [
            e
            for _, e in self.events
            if isinstance(e, kind) and (not job_id or getattr(e, "job_id", "") == job_id)
        ]

    def per_job(self, kind: type[Any]) -> collections.Counter[str]:
        return collections.Counter(e.job_id for e in self.acted_on() if isinstance(e, kind))

    def acted_on(self) -> list[Any]:
        """The events as a consumer takes them: a decision stamped with an epoch older than
        the latest election marker before it is a superseded scheduler's, fenced."""
        known, out = 0, []
        for _, event in self.events:
            if not ev.stale(event, known):
                out.append(event)
            known = ev.epoch_after(known, event)
        return out

    def fenced(self) -> list[Any]:
        kept = {id(e) for e in self.acted_on()}
        return [e for _, e in self.events if id(e) not in kept]


async def ha_stack(make_stack: StackFactory) -> Stack:
    return await make_stack(
        schedulers=2, env={"CUMULUS_SCHEDULER_LEASE_TTL_S": str(TTL_S)}, devices="2x16GiB"
    )


async def until_role(stack: Stack, name: str, roles: tuple[str, ...], timeout: float) -> float:
    """Seconds until scheduler `name` answers with one of `roles` (AssertionError after
    `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if (await stack.role(name, timeout=0.5))["role"] in roles:
                return time.monotonic() - started
        except Exception:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} not {roles} within {timeout} s")


def exactly_once(seen: Seen, job_ids: list[str]) -> None:
    """Every job placed once, started once, completed once, nothing else ended it."""
    placed = seen.per_job(ev.WorkerSelected)
    started = seen.per_job(ev.JobStarted)
    completed = seen.per_job(ev.JobCompleted)
    for job_id in job_ids:
        assert placed[job_id] == 1, f"{job_id} placed {placed[job_id]} times"
        assert started[job_id] == 1, f"{job_id} started {started[job_id]} times"
        assert completed[job_id] == 1, f"{job_id} completed {completed[job_id]} times"
    assert not [e for e in seen.of(ev.JobFailed) if e.job_id in job_ids]


async def watching(stack: Stack) -> tuple[Client, Seen]:
    nc = await stack.connect()
    seen = Seen()
    await nc.subscribe("jobs.>", cb=seen.on_msg)
    return nc, seen


async def test_a_standby_takes_over_when_the_active_scheduler_is_killed(
    make_stack: StackFactory,
) -> None:
    stack = await ha_stack(make_stack)
    assert (await stack.role("scheduler"))["role"] == "leader"
    assert (await stack.role("scheduler-b"))["role"] == "follower"
    nc, seen = await watching(stack)
    try:
        async with AsyncClient(profile=stack.profile()) as client:
            jobs = [await client.submit(square, i, gpu=0.5, duration=120) for i in range(4)]
            stack.procs["scheduler"].kill9()
            killed = time.monotonic()
            # Submitted while nobody decides: the gateway takes them, the new leader places them.
            jobs += [await client.submit(square, i, gpu=0.5, duration=120) for i in range(4, 8)]
            takeover = await until_role(stack, "scheduler-b", ("leader",), TTL_S + 8)
            print(f"takeover after SIGKILL: {time.monotonic() - killed:.2f} s (lease {TTL_S} s)")
            assert time.monotonic() - killed < TTL_S + 5, takeover
            values = [await job.result(timeout=60) for job in jobs]
            assert values == [i * i for i in range(8)]
            # The killed one, restarted, follows: it decides nothing from here on.
            stack.procs["scheduler"].start()
            await until_role(stack, "scheduler", ("follower",), 30)
            later = await client.submit(square, 9, gpu=0.5, duration=120)
            assert await later.result(timeout=60) == 81
        epoch = (await stack.role("scheduler-b"))["epoch"]
        assert epoch == 2
        assert [e.epoch for e in seen.of(ev.WorkerSelected, later.job_id)] == [epoch]
        exactly_once(seen, [j.job_id for j in [*jobs, later]])
        log = (stack.data_dir / "logs" / "scheduler.log").read_text()
        assert "set aside" in log  # it led epoch 1, the lease says 2: its log may not be trusted
        assert (await stack.role("scheduler"))["role"] == "follower"
    finally:
        await nc.close()


async def test_a_paused_scheduler_is_fenced_and_stops_when_it_wakes(
    make_stack: StackFactory,
) -> None:
    stack = await ha_stack(make_stack)
    nc, seen = await watching(stack)
    old = stack.procs["scheduler"]
    try:
        async with AsyncClient(profile=stack.profile()) as client:
            jobs = [await client.submit(square, i, gpu=0.5, duration=120) for i in range(3)]
            assert old.popen is not None
            os.kill(old.pid, signal.SIGSTOP)
            try:
                jobs += [await client.submit(square, i, gpu=0.5, duration=120) for i in range(3, 6)]
                await until_role(stack, "scheduler-b", ("leader",), TTL_S + 8)
                await asyncio.sleep(0.5)
            finally:
                os.kill(old.pid, signal.SIGCONT)
            returncode = await asyncio.to_thread(old.popen.wait, 30)
            assert returncode == 1
            values = [await job.result(timeout=60) for job in jobs]
            assert values == [i * i for i in range(6)]
        log = old.log_path.read_text()
        assert "superseded" in log
        assert "epoch 2" in log
        print(f"published by the paused scheduler after the new marker: {len(seen.fenced())}")
        exactly_once(seen, [j.job_id for j in jobs])
    finally:
        await nc.close()


async def workers_view(nc: Client) -> dict[str, Any]:
    """What the leader shows as allocated and free, per worker and device."""
    reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=5)
    return {w["worker_id"]: w["devices"] for w in reply["workers"]}


async def test_a_forged_stale_placement_is_ignored_everywhere(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await ha_stack(make_stack)
    nc, seen = await watching(stack)
    try:
        stack.procs["scheduler"].kill9()
        await until_role(stack, "scheduler-b", ("leader",), TTL_S + 8)
        async with AsyncClient(profile=stack.profile()) as client:
            job = await client.submit(hold, 4.0, gpu=0.5, duration=120)
            deadline = time.monotonic() + 30
            while not seen.of(ev.JobStarted, job.job_id):
                assert time.monotonic() < deadline, "the job did not start"
                await asyncio.sleep(0.05)
            placed = seen.of(ev.WorkerSelected, job.job_id)[0]
            assert placed.epoch == 2
            before = await workers_view(nc)
            # As the superseded scheduler (epoch 1) would publish it: the job again, on the
            # other device, as a newer attempt; and a revocation of the running attempt.
            other = [d for d in range(2) if d not in placed.devices]
            forged: list[ev.Event] = [
                ev.WorkerSelected(
                    job_id=job.job_id,
                    user=placed.user,
                    worker_id=WORKER,
                    spec=placed.spec,
                    devices=other,
                    tenths=placed.tenths,
                    attempt=placed.attempt + 1,
                    epoch=1,
                ),
                ev.PlacementRevoked(
                    job_id=job.job_id,
                    user=placed.user,
                    worker_id=WORKER,
                    attempt=placed.attempt,
                    reason="forged",
                    epoch=1,
                ),
            ]
            js = nc.jetstream()
            for event in forged:
                await bus.publish(js, event)
            await asyncio.sleep(1.0)
            labels = sorted(p["label"] for p in partitions_of(stack, WORKER))
            assert labels == [f"{job.job_id}.{placed.attempt}"], labels
            assert await workers_view(nc) == before
            assert await job.result(timeout=60) == "held"
            status = await job.status()
            assert status.attempt == placed.attempt
        assert seen.per_job(ev.JobStarted)[job.job_id] == 1
        assert seen.per_job(ev.JobCompleted)[job.job_id] == 1
        assert not seen.of(ev.PartitionReleased, job.job_id) or all(
            e.attempt == placed.attempt for e in seen.of(ev.PartitionReleased, job.job_id)
        )
        # The worker's services each counted what they fenced. The leader never read it: once
        # leading, its job consumer leaves decisions out (its own, a superseded scheduler's);
        # its view of the devices above stayed as it was.
        for name in ("partitioner-worker-1", "runner-worker-1"):
            text = (stack.data_dir / "logs" / f"{name}.log").read_text()
            assert "fenced" in text, name
    finally:
        await nc.close()


async def test_one_scheduler_takes_the_lease_at_once_and_publishes_its_marker(
    make_stack: StackFactory,
) -> None:
    started = time.monotonic()
    stack = await make_stack()
    took = time.monotonic() - started
    print(f"single-scheduler stack ready in {took:.2f} s")
    nc = await stack.connect()
    try:
        kv = await nc.jetstream().key_value(subjects.LEASE_BUCKET)
        entry = await kv.get(subjects.LEASE_KEY)
        lease = json.loads(entry.value or b"{}")
        assert lease["epoch"] == 1
        assert (await stack.role("scheduler"))["role"] == "leader"
        assert lease["holder"] == (await stack.role("scheduler"))["holder"]
        msg = await nc.jetstream().get_last_msg(subjects.JOBS_STREAM, subjects.ELECTED)
        marker = ev.decode(msg.data or b"")
        assert isinstance(marker, ev.SchedulerElected)
        assert (marker.epoch, marker.holder) == (1, lease["holder"])
    finally:
        await nc.close()
    # A clean stop gives the lease up; a restart takes it back at once, with the next epoch.
    stack.restart("scheduler")
    await stack.wait_ready(30)
    assert (await stack.role("scheduler"))["epoch"] == 2
