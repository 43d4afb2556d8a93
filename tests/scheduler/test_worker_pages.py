"""A fleet's worker list does not fit one reply: it comes in pages.

At 1,000 workers the `workers` reply was 1.2 MB, over the bus's 1 MiB, so `cumulus workers`
failed with RESOURCE_EXHAUSTED and the gateway's health check (which asked for the same list)
said the scheduler was NOT_SERVING (bench/fleet_scale.py). Real nats-server, scheduler and
gateway; the extra workers (8 GPUs each) are registrations published on the bus as a
worker's would be.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cumulus import AsyncClient
from shared import api, bus
from shared import events as ev
from tests.conftest import StackFactory

pytestmark = pytest.mark.slow

EXTRA = 1100


async def test_a_thousand_workers_list_in_pages_and_health_stays_serving(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(devices="2x16GiB")
    nc = await stack.connect()
    try:
        js = nc.jetstream()
        devices = [
            ev.DeviceInfo(index=i, name=f"Virtual GPU {i}", memory_bytes=16 << 30) for i in range(8)
        ]
        for i in range(EXTRA):
            worker = f"sim-{i:05d}"
            registered = ev.WorkerRegistered(
                worker_id=worker,
                hostname=f"host-{i:05d}.lab.example",
                devices=devices,
                labels={"gpu.count": "8", "rack": f"r{i % 40}"},
            )
            await bus.publish(js, registered)
        deadline = time.monotonic() + 60
        while True:
            first = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=5)
            if first["next"] and len(first["workers"]) + 1 < EXTRA:
                break  # the scheduler knows enough of them to need pages
            assert time.monotonic() < deadline, "the scheduler did not take the registrations"
            await asyncio.sleep(0.5)
        ids = [w["worker_id"] for w in first["workers"]]
        assert ids == sorted(ids)
        assert first["next"] == ids[-1]
        limited = await api.request(nc, "cumulus.scheduler.workers", {"limit": 3}, dict)
        assert [w["worker_id"] for w in limited["workers"]] == ids[:3]
        assert limited["next"] == ids[2]
    finally:
        await nc.close()
    async with AsyncClient(profile=stack.profile()) as client:
        deadline = time.monotonic() + 60
        while len(workers := await client.workers()) < EXTRA + 1:
            assert time.monotonic() < deadline, f"only {len(workers)} workers listed"
            await asyncio.sleep(0.5)
        listed = [w.worker_id for w in workers]
        assert len(listed) == len(set(listed)) == EXTRA + 1  # every one once, across pages
        assert "worker-1" in listed
        assert (await client.health()).scheduler == "SERVING"
