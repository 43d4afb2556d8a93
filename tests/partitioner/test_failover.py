"""End to end: a stack with one SSH-driven worker and one local worker; sshd goes away.

The seed's promise: a worker whose SSH connection fails gets 3 creation attempts with 1 s
doubling backoff, then the job's placement fails UNAVAILABLE with "Failed to create Chronos
partition on worker: SSH connection failed", and the scheduler places it on another worker,
where it completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev
from shared.errors import ssh_failed
from tests.partitioner.conftest import Sshd, remote_chronos

pytestmark = [pytest.mark.ssh, pytest.mark.slow]


def pause(seconds: float) -> str:
    import time as _time

    _time.sleep(seconds)
    return "slept"


def two_plus_two() -> int:
    return 2 + 2


async def history(job: object) -> list[object]:
    return [e async for e in job.events()]  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
async def test_sshd_stopped_mid_run_fails_over_to_the_local_worker(
    sshd: Sshd, tmp_path: Path
) -> None:
    stack = Stack(
        data_dir=tmp_path / "stack",
        workers=["ssh-1", "local-1"],
        devices="1x16GiB",  # local-1: one device; ssh-1 declares two (its chronos_cli below)
        ssh_workers={"ssh-1": sshd.address},
        proc_env={
            "partitioner-ssh": {
                "CUMULUS_SSH_KEY_PATH": str(sshd.keys.client_key),
                "CUMULUS_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
                "CUMULUS_SSH_TIMEOUT": "3",
                "CUMULUS_SSH_CHRONOS_CLI": remote_chronos(tmp_path / "workers", "2x16GiB"),
            }
        },
    )
    try:
        await stack.start(timeout=60)
        async with AsyncClient(profile=stack.profile()) as client:
            # Two whole GPUs fit only on ssh-1: created and released over SSH.
            job = await client.submit(two_plus_two, gpu=2, duration=600)
            assert await job.result(timeout=60) == 4
            events = await history(job)
            ready = [e for e in events if isinstance(e, ev.PartitionReady)]
            assert [(e.worker_id, e.devices) for e in ready] == [("ssh-1", [0, 1])]
            await _released(stack, job.job_id)

            # Hold local-1's only device for a moment, so the next job goes to ssh-1 first.
            blocker = await client.submit(pause, 1.0, gpu=1, duration=600)
            await _started(blocker)
            assert (await blocker.status()).worker_id == "local-1"

            sshd.stop()  # the listener and the connection the partitioner holds
            job = await client.submit(two_plus_two, gpu=0.5, duration=600)
            assert await job.result(timeout=90) == 4
            assert await blocker.result(timeout=30) == "slept"

            events = await history(job)
            placed = [(e.worker_id, e.attempt) for e in events if isinstance(e, ev.WorkerSelected)]
            failed = [e for e in events if isinstance(e, ev.PartitionFailed)]
            assert placed[0] == ("ssh-1", 1)
            assert placed[-1][0] == "local-1"
            assert failed, "the placement on ssh-1 must fail"
            for failure in failed:
                assert failure.worker_id == "ssh-1"
                assert failure.code == "UNAVAILABLE"
                assert failure.message == ssh_failed().message
            assert failed[0].message == (
                "Failed to create Chronos partition on worker: SSH connection failed"
            )
            # 3 attempts with 1 s doubling: at least 1 + 2 s between placement and failure.
            first = next(e for e in events if isinstance(e, ev.WorkerSelected))
            assert failed[0].ts - first.ts >= 3.0
            done = [e for e in events if isinstance(e, ev.JobCompleted)]
            assert [e.worker_id for e in done] == ["local-1"]
    finally:
        stack.stop()


async def _started(job: object) -> None:
    async with contextlib.aclosing(job.events()) as events:  # type: ignore[attr-defined]
        async for event in events:
            if isinstance(event, ev.JobStarted):
                return
    raise AssertionError("the job ended without starting")


async def _released(stack: Stack, job_id: str, timeout: float = 30) -> None:
    """The job stream holds the job's partition_released (read as the operator: users have
    no JetStream access)."""
    deadline = time.monotonic() + timeout
    nc = await stack.connect()
    try:
        js = nc.jetstream()
        while time.monotonic() < deadline:
            try:
                await js.get_last_msg("JOBS", f"jobs.*.{job_id}.*.partition_released")
                return
            except Exception:
                await asyncio.sleep(0.2)
    finally:
        await nc.close()
    raise AssertionError(f"{job_id}: no partition_released within {timeout} s")
