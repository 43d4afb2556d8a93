"""Issue 11, finding 4: a worker's partitioner paused (SIGSTOP) long enough to be declared lost.

Seen before: in 1 of 2 runs a job ran twice (two `completed`), capacity was over-booked, jobs
failed wrongly and a job directory leaked: the resumed partitioner made partitions for attempts
already revoked, and the runner had ignored a revoke that came before it knew the job.

Here the pause is made to land while creates are under way (chronos_cli takes 1.5 s to
create, as on a busy host), with two jobs already running. Fencing by attempt must give: every
job ends exactly once (the running ones failed UNAVAILABLE, their worker lost; the others
completed with their value, each run once); no attempt starts after its revocation; and, once
all is over, the scheduler holds nothing, no partition is left and no job directory either.
The reaper is off, so nothing left behind is tidied away unseen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from cumulus import AsyncClient
from services.runner.jobdirs import JobDirs
from services.stack import Stack
from shared import api, subjects
from shared import events as ev
from tests.conftest import StackFactory, partitions_of

pytestmark = pytest.mark.slow

WORKER = "worker-1"
CREATE_DELAY_S = 1.5


def hold(seconds: float) -> str:
    import time as _time

    _time.sleep(seconds)
    return "held"


def square(i: int) -> int:
    import time as _time

    _time.sleep(1.0)
    return i * i


def slow_chronos(folder: Path) -> Path:
    """Our chronos_cli, taking CREATE_DELAY_S to create a partition."""
    path = folder / "slow-chronos"
    path.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" create "*) sleep {CREATE_DELAY_S};; esac\n'
        f'exec {sys.executable} -m cumulus_core "$@"\n'
    )
    path.chmod(0o755)
    return path


class Seen:
    """Job events as they are published (core NATS: live, for waiting on them)."""

    def __init__(self) -> None:
        self.events: list[ev.JobEvent] = []

    async def on_msg(self, msg: Any) -> None:
        event = ev.decode(msg.data)
        if isinstance(event, ev.JobEvent):
            self.events.append(event)

    def jobs_with(self, kind: type[ev.JobEvent]) -> set[str]:
        return {e.job_id for e in self.events if isinstance(e, kind)}

    async def until(self, kind: type[ev.JobEvent], jobs: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not jobs <= self.jobs_with(kind):
            if time.monotonic() > deadline:
                missing = sorted(jobs - self.jobs_with(kind))
                raise AssertionError(f"no {kind.name} within {timeout} s for {missing}")
            await asyncio.sleep(0.05)


async def history(nc: Client) -> list[tuple[int, ev.JobEvent]]:
    """Every event of the JOBS stream, with its stream sequence."""
    js = nc.jetstream()
    info = await js.stream_info(subjects.JOBS_STREAM)
    sub = await js.subscribe("jobs.>", ordered_consumer=True)
    out: list[tuple[int, ev.JobEvent]] = []
    got = 0
    try:
        while got < (info.state.messages or 0):
            msg = await sub.next_msg(timeout=10)
            got += 1
            event = ev.decode(msg.data)
            if isinstance(event, ev.SchedulerElected):
                continue  # the scheduler's election marker: no job's
            assert isinstance(event, ev.JobEvent)
            out.append((msg.metadata.sequence.stream, event))
    finally:
        await sub.unsubscribe()
    return out


def job_dirs_left(stack: Stack) -> list[str]:
    """The attempts' directories (`<job>.<attempt>`) the process backend still has."""
    found = JobDirs(stack.data_dir / f"runner-{WORKER}" / "jobs").scan()
    return sorted(f"{job_id}.{attempt}" for job_id, attempt in found)


async def allocation(nc: Client) -> dict[str, Any]:
    state = await api.request(nc, "cumulus.scheduler.state", {}, dict)
    return dict(state["allocation"])


def held(alloc: dict[str, Any]) -> dict[str, Any]:
    """What the scheduler still counts as taken: placements and devices' shares."""
    devices = {
        f"{w}/{d}": jobs
        for w, info in alloc["workers"].items()
        for d, jobs in info["devices"].items()
        if jobs
    }
    return {"placements": alloc["placements"], "devices": devices, "queue": alloc["queue"]}


async def settled(nc: Client, stack: Stack, timeout: float) -> dict[str, Any]:
    """Until nothing is held anywhere (or `timeout`): what is still held."""
    deadline = time.monotonic() + timeout
    while True:
        left = {
            "scheduler": held(await allocation(nc)),
            "partitions": [p["label"] for p in partitions_of(stack, WORKER)],
            "job_dirs": job_dirs_left(stack),
        }
        if time.monotonic() > deadline or (
            left["partitions"] == []
            and left["job_dirs"] == []
            and left["scheduler"] == {"placements": {}, "devices": {}, "queue": []}
        ):
            return left
        await asyncio.sleep(0.3)


async def test_a_paused_partitioner_never_makes_a_job_run_twice(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack(
        workers=[WORKER],
        devices="2x16GiB",
        env={
            "CUMULUS_WORKER_CHRONOS_CLI": str(slow_chronos(tmp_path)),
            "CUMULUS_WORKER_HEARTBEAT_S": "0.5",
            # Lost after 7 s without a heartbeat: the paused partitioner's pull request
            # (5 s) has expired by then, so it reads the revokes only after it resumed.
            "CUMULUS_SCHEDULER_HEARTBEAT_MISSES": "14",
            "CUMULUS_WORKER_REAP_INTERVAL_S": "0",
        },
    )
    nc = await stack.connect()
    seen = Seen()
    await nc.subscribe("jobs.>", cb=seen.on_msg)
    partitioner = stack.procs[f"partitioner-{WORKER}"]
    try:
        async with AsyncClient(profile=stack.profile()) as client:
            running = [await client.submit(hold, 60.0, gpu=0.2, duration=600) for _ in range(2)]
            await seen.until(ev.JobStarted, {j.job_id for j in running}, timeout=30)
            waiting = [await client.submit(square, i, gpu=0.3, duration=600) for i in range(4)]
            await seen.until(ev.WorkerSelected, {j.job_id for j in waiting}, timeout=15)
            await asyncio.sleep(0.3)  # the partitioner takes them; their creates are under way
            everyone = {j.job_id for j in [*running, *waiting]}
            os.kill(partitioner.pid, signal.SIGSTOP)
            try:
                # Lost: every attempt there is revoked while the partitioner sleeps.
                await seen.until(ev.PlacementRevoked, everyone, timeout=20)
                started_before = seen.jobs_with(ev.JobStarted)
                await asyncio.sleep(1.0)  # the runner has read the revokes
            finally:
                os.kill(partitioner.pid, signal.SIGCONT)
            results = await asyncio.gather(
                *(j.result(timeout=60) for j in waiting), return_exceptions=True
            )
            ends = await asyncio.gather(
                *(j.result(timeout=30) for j in running), return_exceptions=True
            )
        left = await settled(nc, stack, timeout=30)
        events = await history(nc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(partitioner.pid, signal.SIGCONT)
        await nc.close()

    by_job: dict[str, list[tuple[int, ev.JobEvent]]] = collections.defaultdict(list)
    for seq, event in events:
        by_job[event.job_id].append((seq, event))
    for job_id in everyone:
        mine = by_job[job_id]
        ends_of = [e for _, e in mine if isinstance(e, ev.Terminal)]
        assert len(ends_of) == 1, f"{job_id} ended {[e.name for e in ends_of]}"
        _no_attempt_after_its_revocation(job_id, mine)

    # The jobs that ran when their worker was lost failed, saying so; the others ran once.
    for job, end in zip(running, ends, strict=True):
        assert getattr(end, "code", None) == "UNAVAILABLE", (job.job_id, end)
        assert "was lost while running the job" in getattr(end, "message", "")
    for i, (job, got) in enumerate(zip(waiting, results, strict=True)):
        if job.job_id in started_before:  # it had started after all: lost while running
            assert getattr(got, "code", None) == "UNAVAILABLE", (job.job_id, got)
        else:
            assert got == i * i, (job.job_id, got)
    completed = collections.Counter(e.job_id for _, e in events if isinstance(e, ev.JobCompleted))
    assert all(n <= 1 for n in completed.values()), completed
    assert left == {
        "scheduler": {"placements": {}, "devices": {}, "queue": []},
        "partitions": [],
        "job_dirs": [],
    }


def _no_attempt_after_its_revocation(job_id: str, mine: list[tuple[int, ev.JobEvent]]) -> None:
    """No attempt is reported started after its revocation, and an attempt starts only once
    every earlier attempt that started was revoked (never two at once). (A revoked attempt's
    end would be a second end: counted above.)"""
    revoked_at = {e.attempt: seq for seq, e in mine if isinstance(e, ev.PlacementRevoked)}
    for seq, event in mine:
        if isinstance(event, ev.JobStarted):
            if event.attempt in revoked_at:
                assert seq < revoked_at[event.attempt], f"{job_id}: started after its revoke"
            for earlier in range(1, event.attempt):
                started_earlier = any(
                    isinstance(e, ev.JobStarted) and e.attempt == earlier for _, e in mine
                )
                if started_earlier:
                    assert revoked_at.get(earlier, seq) < seq, f"{job_id}: two attempts at once"
