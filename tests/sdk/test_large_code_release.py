"""A large package (a big argument, a data file) leaves the code store once the last job using
it ended (`retention.large_code_bytes`, after `retention.large_code_grace_s`), so big inputs do
not fill their owner's `policy.stored_bytes` for `retention.code_ttl_s`; a small one stays for
reruns. A resubmit after the release uploads again by itself. Through the real stack, with the
threshold at 1 MiB and a one-second grace so a 2 MiB argument is large."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import nats.js.errors

from cumulus import AsyncClient, JobOptions
from services.stack import Stack
from shared import subjects
from tests.conftest import StackFactory

MIB = 1024 * 1024
OPTIONS = JobOptions(gpu=0.1, duration=600)


def hold(blob: bytes, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return len(blob)


async def stored(stack: Stack, user: str = "default") -> dict[str, int]:
    """The user's packages in the code store now: object name -> size."""
    nc = await stack.connect()
    try:
        store = await nc.jetstream().object_store(subjects.CODE_BUCKET)
        try:
            infos = await store.list()
        except nats.js.errors.NotFoundError:
            return {}
        return {
            i.name: i.size or 0 for i in infos if i.name.startswith(f"{user}.") and not i.deleted
        }
    finally:
        await nc.close()


async def large(stack: Stack) -> set[str]:
    return {name for name, size in (await stored(stack)).items() if size >= MIB}


async def until(check: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.25)
    return False


async def test_a_large_package_leaves_when_its_last_job_ends(make_stack: StackFactory) -> None:
    stack = await make_stack(
        env={
            "CUMULUS_RETENTION_LARGE_CODE_BYTES": "1MiB",
            "CUMULUS_RETENTION_LARGE_CODE_GRACE_S": "1",
        }
    )
    blob = os.urandom(2 * MIB)
    async with AsyncClient(profile=stack.profile()) as client:
        first = await client.submit_call(
            hold,
            (
                blob,
                0.5,
            ),
            options=OPTIONS,
        )
        # Other arguments (the seconds): a package of their own, which these two share.
        second = await client.submit_call(
            hold,
            (
                blob,
                6.0,
            ),
            options=OPTIONS,
        )
        third = await client.submit_call(
            hold,
            (
                blob,
                6.0,
            ),
            options=OPTIONS,
        )
        assert await first.result(timeout=60) == 2 * MIB
        packages = await large(stack)
        assert len(packages) == 2, packages  # the first's and the one the others share
        # The first's package leaves after its grace; the shared one stays while they run.
        assert await until(lambda: _count(stack, 1), within=15), "the first package stayed"
        assert await second.result(timeout=60) == 2 * MIB
        assert await third.result(timeout=60) == 2 * MIB
        assert await until(lambda: _count(stack, 0), within=15), "the shared package stayed"

        # A small package (the same function, a small argument) stays for reruns.
        small = await client.submit_call(
            hold,
            (
                b"x",
                0.0,
            ),
            options=OPTIONS,
        )
        assert await small.result(timeout=60) == 1
        await asyncio.sleep(2.5)  # past the grace
        assert any(size < MIB for size in (await stored(stack)).values())

        # The same client submits the released package again: uploaded again, it runs.
        again = await client.submit_call(
            hold,
            (
                blob,
                0.5,
            ),
            options=OPTIONS,
        )
        assert await again.result(timeout=60) == 2 * MIB


async def _count(stack: Stack, n: int) -> bool:
    return len(await large(stack)) == n
