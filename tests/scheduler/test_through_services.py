"""The seed's integration scenarios through the real services (nats-server, four services).

Jobs hold their GPU share until the test creates a file, so the test decides when each ends.
A sandboxed job cannot see the test's files, so these stacks run jobs unsandboxed
(`worker.sandbox: none`): they are about placement; tests/security and tests/runner cover the
sandbox.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cumulus import AsyncClient, CumulusError, package_function
from services.stack import Stack
from shared import api

pytestmark = pytest.mark.slow

UNSANDBOXED = {"CUMULUS_WORKER_SANDBOX": "none"}


def hold(flag: str, seconds: float = 60.0) -> str:
    """Run until `flag` exists; return where the job ran (worker:devices)."""
    import os
    import time as _time

    deadline = _time.time() + seconds
    while not os.path.exists(flag) and _time.time() < deadline:
        _time.sleep(0.02)
    return f"{os.environ['CUMULUS_WORKER_ID']}:{os.environ['CUDA_VISIBLE_DEVICES']}"


async def wait_status(job: Any, wanted: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = msgspec.json.decode(msgspec.json.encode(await job.status()))  # as JSON
        if status["status"] == wanted:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{job.job_id} stayed {status['status']}, wanted {wanted}: {status}"
            )
        await asyncio.sleep(0.05)


async def workers(client: AsyncClient) -> dict[str, Any]:
    reply = await api.request(client.nc, "workers", {}, dict)
    return {w["worker_id"]: w for w in reply["workers"]}


async def test_half_and_three_tenths_share_a_gpu_and_the_next_half_waits(
    make_stack: Any, tmp_path: Path
) -> None:
    stack: Stack = await make_stack(devices="1x16GiB", env=UNSANDBOXED)
    async with AsyncClient(profile=stack.profile()) as client:
        a = await client.submit(hold, str(tmp_path / "a"), gpu=0.5, duration=600)
        b = await client.submit(hold, str(tmp_path / "b"), gpu=0.3, duration=600)
        sa = await wait_status(a, "RUNNING")
        sb = await wait_status(b, "RUNNING")
        assert sa["devices"] == sb["devices"] == [0]
        c = await client.submit(hold, str(tmp_path / "c"), gpu=0.5, duration=600)
        sc = await wait_status(c, "QUEUED")
        assert sc["queue_position"] == 1
        assert sc["waiting_reason"] == "waiting for 0.5 GPU; largest free now is 0.2"
        device = (await workers(client))["worker-1"]["devices"][0]
        assert (device["allocated"], device["free"]) == ("0.8", "0.2")
        assert set(device["jobs"]) == {a.job_id, b.job_id}
        (tmp_path / "a").touch()
        assert await a.result(timeout=30) == "worker-1:0"
        await wait_status(c, "RUNNING")
        (tmp_path / "b").touch()
        (tmp_path / "c").touch()
        assert await c.result(timeout=30) == "worker-1:0"
        assert await b.result(timeout=30) == "worker-1:0"


async def test_jobs_spread_over_two_workers(make_stack: Any, tmp_path: Path) -> None:
    stack: Stack = await make_stack(
        workers=["worker-1", "worker-2"], devices="1x16GiB", env=UNSANDBOXED
    )
    async with AsyncClient(profile=stack.profile()) as client:
        jobs = [
            await client.submit(hold, str(tmp_path / "go"), gpu=0.5, duration=600) for _ in range(4)
        ]
        for job in jobs:
            await wait_status(job, "RUNNING")
        pool = await workers(client)
        for worker in ("worker-1", "worker-2"):
            device = pool[worker]["devices"][0]
            assert device["allocated"] == "1"
            assert len(device["jobs"]) == 2
        (tmp_path / "go").touch()
        where = await asyncio.gather(*(j.result(timeout=30) for j in jobs))
        assert sorted(where) == ["worker-1:0", "worker-1:0", "worker-2:0", "worker-2:0"]


async def test_two_gpus_take_contiguous_free_devices_and_eight_is_refused_at_once(
    make_stack: Any, tmp_path: Path
) -> None:
    stack: Stack = await make_stack(devices="4x16GiB", env=UNSANDBOXED)
    async with AsyncClient(profile=stack.profile()) as client:
        one = await client.submit(hold, str(tmp_path / "go"), gpu=1, duration=600)
        await wait_status(one, "RUNNING")
        half = await client.submit(hold, str(tmp_path / "go"), gpu=0.5, duration=600)
        await wait_status(half, "RUNNING")
        two = await client.submit(hold, str(tmp_path / "go"), gpu=2, duration=600)
        status = await wait_status(two, "RUNNING")
        assert status["devices"] == [2, 3]
        code_ref = await client.upload(package_function(hold, (str(tmp_path / "go"),)))
        started = time.monotonic()
        request = api.SubmitRequest(code_ref=code_ref, gpu=8, duration=600)
        with pytest.raises(CumulusError) as info:
            await api.request(client.nc, "submit", request, api.SubmitReply)
        assert time.monotonic() - started < 1
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert info.value.message == (
            "No workers with sufficient GPU capacity (requested: 8, max available: 4)"
        )
        (tmp_path / "go").touch()
        assert await two.result(timeout=30) == "worker-1:2,3"
        assert await one.result(timeout=30) == "worker-1:0"
        assert await half.result(timeout=30) == "worker-1:1"


async def test_a_lost_worker_fails_its_running_job_and_its_waiting_job_moves(
    make_stack: Any, tmp_path: Path
) -> None:
    stack: Stack = await make_stack(
        workers=["worker-1", "worker-2"],
        devices="1x16GiB",
        # Lost after 6 silent half-seconds: quick, yet no live worker under CI load misses 6.
        env={
            "CUMULUS_WORKER_HEARTBEAT_S": "0.5",
            "CUMULUS_SCHEDULER_HEARTBEAT_MISSES": "6",
            **UNSANDBOXED,
        },
    )
    async with AsyncClient(profile=stack.profile()) as client:
        first = await client.submit(hold, str(tmp_path / "first"), gpu=1, duration=600)
        s1 = await wait_status(first, "RUNNING")
        second = await client.submit(hold, str(tmp_path / "second"), gpu=1, duration=600)
        s2 = await wait_status(second, "RUNNING")
        victim = s2["worker_id"]
        survivor = s1["worker_id"]
        assert {victim, survivor} == {"worker-1", "worker-2"}
        # The victim's node goes away: its agent stops heartbeating, its runner is gone.
        stack.kill9(f"runner-{victim}")
        stack.kill9(f"partitioner-{victim}")
        with pytest.raises(CumulusError) as info:
            await second.result(timeout=30)
        assert info.value.code == "UNAVAILABLE"
        assert f"Worker {victim} was lost while running the job" in info.value.message
        pool = await workers(client)
        assert pool[victim]["status"] == "down"
        assert "no heartbeat" in pool[victim]["down_reason"]
        # A job that can only wait (the survivor is full) is not sent to the lost worker.
        third = await client.submit(hold, str(tmp_path / "third"), gpu=1, duration=600)
        await wait_status(third, "QUEUED")
        (tmp_path / "first").touch()
        (tmp_path / "third").touch()
        assert await third.result(timeout=30) == f"{survivor}:0"
        assert await first.result(timeout=30) == f"{survivor}:0"
        (tmp_path / "second").touch()  # the orphaned process of the lost worker may exit
