"""Issue 11, finding 6: two stacks with the same worker id on one Docker engine.

The second stack's runner removed, as its own leftovers, every container labelled with its
worker id: it killed the first stack's running job within 3 s of starting. Now everything a
runner makes carries the owner label of its own stack (a random id kept in its data
directory) and its cleanup touches only those; and a runner whose worker id a live stack
holds on the same engine is refused at start with one line saying so (exit status 2). A
crash of the holder does not block its own restart, and once it stops the id is free.

The process backend keeps everything under its own data directory: two process stacks with
the same worker id leave each other alone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev
from tests.runner.conftest import leftovers, need

JOB_S = 25
"""How long the first stack's job sleeps: longer than the second stack takes to start."""


def sleeper(seconds: float) -> str:
    import time as t

    print("sleeping", flush=True)
    t.sleep(seconds)
    return "woke"


def add(a: int, b: int) -> int:
    return a + b


def _stack(data_dir: Path, worker: str, backend: str) -> Stack:
    return Stack(
        data_dir=data_dir,
        workers=[worker],
        backend=backend,
        env={"CUMULUS_LIMITS_MIN_DURATION": "1"},
    )


async def _running(job: Any, timeout: float = 60) -> None:
    """Until the job's first line arrives: its container (or process) runs."""

    async def wait() -> None:
        async for event in job.events():
            if isinstance(event, ev.JobLog):
                return

    await asyncio.wait_for(wait(), timeout)


async def _start_refused(stack: Stack) -> str:
    """Start `stack`; what the user sees when it is refused ("" when it started)."""
    try:
        await stack.start(timeout=90)
    except RuntimeError as exc:
        return str(exc)
    return ""


async def _nothing_left(job_id: str, within: float = 10.0) -> list[str]:
    from services.runner.spec import engine

    client = engine()
    try:
        deadline = time.monotonic() + within
        found = leftovers(client, job_id)
        while found and time.monotonic() < deadline:  # Swarm removes asynchronously
            await asyncio.sleep(0.2)
            found = leftovers(client, job_id)
        return found
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["docker", "swarm"])
async def test_a_second_stack_with_the_same_worker_id_is_refused_and_kills_nothing(
    kind: str, tmp_path: Path
) -> None:
    need(kind)
    worker = f"twin-{secrets.token_hex(3)}"
    first = _stack(tmp_path / "first", worker, kind)
    second = _stack(tmp_path / "second", worker, kind)
    runner = f"runner-{worker}"
    try:
        await first.start()
        async with AsyncClient(profile=first.profile()) as client:
            job = await client.submit(sleeper, JOB_S, gpu=0.1, duration=600)
            await _running(job)
            began = time.monotonic()
            refused = await _start_refused(second)
            took = time.monotonic() - began
            # The holder's runner crashes; its restart (same data dir, same owner) is not
            # blocked by the claim it left, and it adopts its running job again.
            first.kill9(runner)
            first.restart(runner)
            # What the first stack's user sees: the job ran to its end, untouched.
            assert await job.result(timeout=120) == "woke"
            assert took + 3 < JOB_S, f"inconclusive: the second stack took {took:.1f} s"
            assert first.procs[runner].alive()
            # What the second stack's operator sees: a refusal naming the id and the holder.
            assert refused, "a second stack started with a worker id a live stack holds"
            # Its partitioner (before registering the worker) or its runner exits with 2.
            refused_by = refused.split(" exited with 2")[0]
            assert refused_by in (runner, f"partitioner-{worker}"), refused
            said = (second.data_dir / "logs" / f"{refused_by}.log").read_text()
            assert f"worker id {worker} is in use on this Docker engine" in said
            assert str(first.data_dir) in said
            assert "set worker.id" in said
            assert await _nothing_left(job.job_id) == []
        second.stop()
        # Once the holder has stopped, the id is free: the second stack starts and runs jobs.
        first.stop()
        await second.start()
        async with AsyncClient(profile=second.profile()) as client:
            job = await client.submit(add, 2, 3, gpu=0.1, duration=60)
            assert await job.result(timeout=90) == 5
            assert await _nothing_left(job.job_id) == []
    finally:
        second.stop()
        first.stop()


@pytest.mark.slow
async def test_process_stacks_with_the_same_worker_id_leave_each_other_alone(
    tmp_path: Path,
) -> None:
    worker = f"twin-{secrets.token_hex(3)}"
    first = _stack(tmp_path / "first", worker, "process")
    second = _stack(tmp_path / "second", worker, "process")
    try:
        await first.start()
        async with AsyncClient(profile=first.profile()) as client:
            job = await client.submit(sleeper, 8, gpu=0.1, duration=600)
            await _running(job)
            await second.start()
            async with AsyncClient(profile=second.profile()) as other:
                assert await other.run(add, 1, 2, gpu=0.1, duration=60, logs=None) == 3
            assert await job.result(timeout=60) == "woke"
    finally:
        second.stop()
        first.stop()
