"""The lease holder notices every lapse, also one that happened while a renewal was in flight.

Found by bench/placement_rate.py on a loaded host: a renewal sent while the lease was still
valid came back only after the event loop had spent longer than the lease on batches, so the
submissions consumed in between were not decided (the lease had run out), and the holder,
having seen the lease valid before the renewal, never took the owed decisions: 964 of 10,000
jobs stayed pending for good. Real nats-server, the real key-value bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from services.scheduler.app import DECISIONS, Scheduler
from services.scheduler.lease import Lease
from services.stack import Proc, free_port, nats_server_binary
from shared import config as config_mod
from shared import subjects

pytestmark = pytest.mark.slow


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = Proc(
        "nats",
        [nats_server_binary(), "-js", "-sd", str(tmp_path / "nats"), "-a", "127.0.0.1"]
        + ["-p", str(port)],
        dict(os.environ),
        tmp_path / "nats.log",
    )
    server.start()
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.stop()


async def _quiet(exc: Exception) -> None:
    """A refused connect while the server starts is expected; the retry says the rest."""


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = await nats.connect(
                nats_url, connect_timeout=1, allow_reconnect=False, error_cb=_quiet
            )
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        yield conn
    finally:
        await conn.close()


class StalledRenewal(Lease):
    """A holder whose next renewal is held up until its lease has run out, as a renewal is
    whose reply waits behind a long batch."""

    stall = False

    async def renew(self) -> bool:
        if self.stall:
            self.stall = False
            await asyncio.sleep(max(0.0, self.valid_until - time.monotonic()) + 0.05)
        return await super().renew()


async def keep_for(lease: Lease, seconds: float) -> int:
    """Run the holder's renewals for `seconds`; how often it found the lease regained."""
    regained = 0

    def count() -> None:
        nonlocal regained
        regained += 1

    task = asyncio.create_task(lease.keep(count))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return regained


async def test_a_lapse_while_the_renewal_was_in_flight_is_noticed(nc: Client) -> None:
    lease = StalledRenewal(nc.jetstream(), "a", ttl_s=1.0, replicas=1)
    await lease.open()
    assert await lease.campaign(lambda: 0) == 1
    lease.stall = True
    assert await keep_for(lease, 2.0) == 1
    assert lease.valid()


async def test_renewals_in_time_are_not_taken_for_a_lapse(nc: Client) -> None:
    lease = Lease(nc.jetstream(), "a", ttl_s=6.0, replicas=1)
    await lease.open()
    await lease.campaign(lambda: 0)
    assert await keep_for(lease, 2.0) == 0
    assert lease.valid()


async def test_a_leader_reads_no_decisions_back(nats_url: str, nc: Client, tmp_path: Path) -> None:
    """Its own decisions are applied when taken: once leading, the job consumer leaves the
    decisions out (half of a burst's traffic)."""
    env = {
        "CUMULUS_NATS_URL": nats_url,
        "CUMULUS_DATA_DIR": str(tmp_path / "data"),
        "CUMULUS_INSTANCE": "a",
    }
    scheduler = Scheduler(config_mod.load(environ=env))
    js = nc.jetstream()
    try:
        await scheduler.start()
        deadline = time.monotonic() + 30
        while scheduler.role() != "leader":
            assert time.monotonic() < deadline, scheduler.role()
            await asyncio.sleep(0.05)
        info = await js.consumer_info(subjects.JOBS_STREAM, "scheduler-jobs-a")
        narrowed = info.config.filter_subjects or []
        assert subjects.ELECTED in narrowed
        assert subjects.job("*", "*", "*", "submitted") in narrowed
        assert not [f for f in narrowed if f.rsplit(".", 1)[-1] in DECISIONS]
    finally:
        await scheduler.stop()
    # A restart creates the consumer anew from `consumers()`, so it follows every decision
    # until it leads again.
    assert {f.rsplit(".", 1)[-1] for f in scheduler.consumers()[1].filters} >= set(DECISIONS)
