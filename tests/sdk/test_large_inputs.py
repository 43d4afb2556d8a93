"""Inputs larger than one message, far larger than the old 64 MiB code limit: a function called
with a 100 MiB argument and a script whose working directory holds a 100 MiB data file run
through the real stack, on the process backend and (marked `docker`) the Docker engine. The
gateway spools the upload to its disk and streams it into the object store, the runner streams
it into its package cache: neither holds it whole in memory (their peak RSS, read from /proc,
grows far less than the package), and no spool file is left. A package over
`limits.max_code_bytes` is refused before anything is stored, with a message that says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

import nats.js.errors
import pytest

from cumulus import AsyncClient, InvalidArgument, JobOptions
from cumulus._client import UPLOAD_CHUNK
from cumulus._packaging import code_ref, package_function
from services.runner import jobdirs
from services.runner.jobdirs import PackageCache
from services.stack import Stack
from shared import api, subjects
from tests.conftest import StackFactory

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
SIZE = 100 * MIB
"""Over the old limit (64 MiB), so the old code refuses it."""
OPTIONS = JobOptions(gpu=0.1, duration=600)


def digest(blob: bytes) -> tuple[str, int]:
    return hashlib.sha256(blob).hexdigest(), len(blob)


SCRIPT = """\
import hashlib
h, n = hashlib.sha256(), 0
with open("data.bin", "rb") as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
print("data", h.hexdigest(), n, flush=True)
"""


def peak_rss(stack: Stack, name: str) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{stack.procs[name].pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {name}")


def spooled(stack: Stack) -> list[str]:
    """Files left in the gateway's upload spool."""
    return sorted(p.name for p in (stack.data_dir / "gateway.uploads").iterdir())


async def stored_names(stack: Stack) -> list[str]:
    admin = await stack.connect()
    try:
        store = await admin.jetstream().object_store(subjects.CODE_BUCKET)
        try:
            return [info.name for info in await store.list() if not info.deleted]
        except nats.js.errors.NotFoundError:
            return []
    finally:
        await admin.close()


async def _run_large_argument(client: AsyncClient) -> None:
    blob = os.urandom(SIZE)
    value = await client.run_call(digest, (blob,), None, OPTIONS, logs=False)
    assert tuple(value) == (hashlib.sha256(blob).hexdigest(), SIZE)


async def test_a_100_mib_argument_and_data_file_reach_the_job(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack(workers=["worker-1"], devices="1x16GiB")
    runner = "runner-worker-1"
    async with AsyncClient(profile=stack.profile()) as client:
        # one small job first: both services' memory at work, before the large ones
        assert tuple(await client.run_call(digest, (b"x",), None, OPTIONS, logs=False))[1] == 1
        before = {name: peak_rss(stack, name) for name in ("gateway", runner)}

        await _run_large_argument(client)

        work = tmp_path / "work"
        work.mkdir()
        (work / "main.py").write_text(SCRIPT)
        data = os.urandom(SIZE)
        (work / "data.bin").write_bytes(data)
        job = await client.submit_script(work / "main.py", (), OPTIONS, working_dir=work)
        assert await job.result(timeout=300) is None
        lines = [line.text async for line in job.logs()]
        assert f"data {hashlib.sha256(data).hexdigest()} {SIZE}" in lines

    assert spooled(stack) == []
    for name, was in before.items():
        grew = peak_rss(stack, name) - was
        # Holding one 100 MiB package whole (let alone its base64 chunks and copies) would
        # grow the peak by more than the package itself.
        assert grew < SIZE // 2, f"{name}'s peak RSS grew {grew / MIB:.0f} MiB"


@pytest.mark.docker
async def test_a_100_mib_argument_on_the_docker_backend(make_stack: StackFactory) -> None:
    from tests.security.test_docker_backend import docker_needed

    docker_needed()
    stack = await make_stack(workers=["docker-1"], devices="1x16GiB", backend="docker")
    async with AsyncClient(profile=stack.profile()) as client:
        await _run_large_argument(client)
    assert spooled(stack) == []


async def test_a_package_over_the_limit_is_refused_and_not_stored(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(env={"CUMULUS_LIMITS_MAX_CODE_BYTES": str(2 * MIB)})
    package = package_function(digest, (os.urandom(3 * MIB),))
    async with AsyncClient(profile=stack.profile()) as client:
        with pytest.raises(InvalidArgument) as refused:
            await client.upload(package)
        with pytest.raises(InvalidArgument):
            await client.run_call(digest, (os.urandom(3 * MIB),), None, OPTIONS, logs=False)
    message = refused.value.message
    assert message.startswith(f"Code package is {len(package)} bytes; the limit is {2 * MIB}")
    assert "limits.max_code_bytes" in message
    assert subjects.code_object("default", code_ref(package)) not in await stored_names(stack)
    assert spooled(stack) == []

    # An upload in progress is on the gateway's disk; one that fails its checks leaves nothing.
    fake = os.urandom(UPLOAD_CHUNK + 10)
    claimed = hashlib.sha256(b"something else").hexdigest()
    nc = await stack.connect("user", "default")
    try:
        for offset in (0, UPLOAD_CHUNK):
            body = {
                "code_ref": claimed,
                "size": len(fake),
                "offset": offset,
                "data": fake[offset : offset + UPLOAD_CHUNK],
            }
            if offset == 0:
                reply = await api.request(nc, "upload", body, dict, user="default")
                assert reply["stored"] is False
                assert len(spooled(stack)) == 1
                continue
            with pytest.raises(InvalidArgument, match="does not match its code_ref"):
                await api.request(nc, "upload", body, dict, user="default")
    finally:
        await nc.close()
    assert spooled(stack) == []
    assert subjects.code_object("default", claimed) not in await stored_names(stack)

    # A stored package carries its kind: a submit to any replica need not fetch it to know it.
    small = package_function(digest, (b"small",))
    async with AsyncClient(profile=stack.profile()) as client:
        ref = await client.upload(small)
    admin = await stack.connect()
    try:
        store = await admin.jetstream().object_store(subjects.CODE_BUCKET)
        info = await store.get_info(subjects.code_object("default", ref))
    finally:
        await admin.close()
    assert info.headers == {"Cumulus-Package-Kind": ["function"]}


async def test_the_package_cache_is_bounded_and_fetches_each_package_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[str] = []

    def source(name: str, fail: bool = False) -> Any:
        async def fetch(into: BinaryIO) -> None:
            fetched.append(name)
            into.write(name.encode() * 100)
            await asyncio.sleep(0.01)
            if fail:
                raise OSError("the bus went away")

        return fetch

    cache = PackageCache(tmp_path / "packages", limit=650)
    first, again = await asyncio.gather(
        cache.get("a.1", source("a.1")), cache.get("a.1", source("a.1"))
    )
    assert first == again
    assert fetched == ["a.1"]  # two launches, one fetch
    assert first.read_bytes() == b"a.1" * 100
    with pytest.raises(OSError, match="went away"):
        await cache.get("b.2", source("b.2", fail=True))
    assert sorted(p.name for p in cache.root.iterdir()) == ["a.1"]  # no partial file
    await cache.get("c.3", source("c.3"))
    await cache.get("d.4", source("d.4"))

    def held() -> list[str]:
        return sorted(p.name for p in cache.root.iterdir())

    # over the limit, but all were used just now: a launch may be about to copy any of them
    assert held() == ["a.1", "c.3", "d.4"]
    monkeypatch.setattr(jobdirs, "HOLD_S", 0.0)
    await cache.get("a.1", source("a.1"))  # used again: the most recent
    await cache.get("e.5", source("e.5"))
    assert held() == ["a.1", "e.5"]  # the least recently used went first, down to the limit
    (cache.root / "f.6.1234.part").write_bytes(b"cut short")
    cache = PackageCache(cache.root, limit=650)  # a restarted runner keeps the whole ones
    assert held() == ["a.1", "e.5"]
    await cache.get("e.5", source("e.5"))
    assert fetched == ["a.1", "b.2", "c.3", "d.4", "e.5"]
