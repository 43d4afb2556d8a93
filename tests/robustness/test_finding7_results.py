"""Issue 11, finding 7: a function returning 300 MB ended FAILED ("Job ended without a result …
exited with code 0") and the runner peaked at 1 GB RSS.

The in-job runner wrote the result as one stdout line of base64 JSON, which the runner read
whole, decoded, re-encoded and staged as result parts in one SQLite transaction. Now a large
result goes to a file in the job's directory, which the runner publishes part by part (a few
parts in memory at once, hashed as it goes), and the client gathers them into a temporary file
that it unpickles from. A result over `worker.max_result_bytes` ends the job FAILED with
RESOURCE_EXHAUSTED and a message that says so, whatever the job claims about its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient
from cumulus._jobs import _Gathered
from job_image.runner import FRAME
from services.runner import handlers
from services.runner.backend import DROPPED, MAX_FRAME, FileTail
from services.runner.results import ResultError, TooLarge, open_result
from services.stack import Stack
from shared import subjects
from shared.errors import ResourceExhausted
from tests.conftest import StackFactory

MiB = 1024 * 1024
BIG = 120 * MiB
RUNNER_GROWTH = 64 * MiB
"""How much the runner's peak RSS may grow while it delivers a BIG result (it was ~4x the
result before: the frame, its base64, the JSON and the parts' events)."""
TOO_LARGE = re.compile(
    r"The result is (?P<size>\d+\.\d) MiB; the most a job may return is 8\.0 MiB "
    r"\(worker\.max_result_bytes\): write large outputs to storage and return a path"
)


def random_bytes(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def text_of(n: int) -> str:
    return "x" * n


def liar(n: int) -> str:
    """Writes an `n`-byte result file itself and frames it as a small one, then exits."""
    import os
    import sys

    from job_image import runner

    frame = sys._getframe()
    while "nonce" not in frame.f_locals:
        assert frame.f_back is not None
        frame = frame.f_back
    nonce, job_dir = frame.f_locals["nonce"], frame.f_locals["job_dir"]
    with open(Path(job_dir) / runner.RESULT_FILE, "wb") as out:
        out.write(b"x" * n)
    claim = {"ok": True, "file": True, "payload": "pickle", "size": 10}
    os.write(1, runner.frame(nonce, claim) + f"{runner.end_marker(nonce)}\n".encode())
    os.write(2, f"{runner.end_marker(nonce)}\n".encode())
    os._exit(0)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def _reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS (proc(5): clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _stack(make_stack: StackFactory, backend: str = "process", **env: str) -> Stack:
    return await make_stack(
        workers=["worker-1"],
        devices="2x16GiB",
        backend=backend,
        env={"CUMULUS_LIMITS_MIN_DURATION": "1", **env},
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_120_mb_result_comes_back_exact_with_the_runner_small(
    make_stack: StackFactory,
) -> None:
    stack = await _stack(make_stack)
    runner = stack.procs["runner-worker-1"].pid
    expected = hashlib.sha256(random_bytes(BIG, 7)).hexdigest()
    async with AsyncClient(profile=stack.profile()) as client:
        warm = await client.submit(text_of, 10, gpu=0.1, duration=300)
        assert await warm.result(timeout=60) == "x" * 10
        _reset_peak(runner)
        before = _status_kib(runner, "VmRSS")
        started = time.monotonic()
        job = await client.submit(random_bytes, BIG, 7, gpu=0.1, duration=300)
        value = await job.result(timeout=300)
        took = time.monotonic() - started
    peak = _status_kib(runner, "VmHWM")
    assert isinstance(value, bytes)
    assert len(value) == BIG
    assert hashlib.sha256(value).hexdigest() == expected
    grew = peak - before
    assert grew < RUNNER_GROWTH, (
        f"the runner's RSS peaked {grew / MiB:.0f} MiB above its {before / MiB:.0f} MiB "
        f"while delivering {BIG / MiB:.0f} MiB in {took:.1f} s"
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_runner_killed_while_it_publishes_a_result_publishes_it_again(
    make_stack: StackFactory,
) -> None:
    """kill -9 of the runner once the first parts are on the bus: after its restart it reads
    the frame and the file again and publishes every part again; the bus drops the copies."""
    stack = await _stack(make_stack)
    n = 100 * MiB
    expected = hashlib.sha256(random_bytes(n, 5)).hexdigest()
    nc = await stack.connect()
    try:
        js = nc.jetstream()
        async with AsyncClient(profile=stack.profile()) as client:
            job = await client.submit(random_bytes, n, 5, gpu=0.1, duration=300)
            deadline = time.monotonic() + 120
            seen = 0
            while seen < 10:
                assert time.monotonic() < deadline, "no result part within 120 s"
                await asyncio.sleep(0.01)
                seen = (await js.stream_info(subjects.RESULTS_STREAM)).state.messages
            stack.kill9("runner-worker-1")
            stack.restart("runner-worker-1")
            value = await job.result(timeout=300)
            kept = (await js.stream_info(subjects.RESULTS_STREAM)).state.messages
    finally:
        await nc.close()
    assert hashlib.sha256(value).hexdigest() == expected
    # n is a whole number of parts; the pickle's few bytes around the value make one more
    assert seen < kept == handlers.part_count(n) + 1, (seen, kept)


async def test_a_result_over_the_maximum_fails_saying_so(make_stack: StackFactory) -> None:
    stack = await _stack(make_stack, CUMULUS_WORKER_MAX_RESULT_BYTES="8m")
    async with AsyncClient(profile=stack.profile()) as client:
        job = await client.submit(text_of, 12 * MiB, gpu=0.1, duration=300)
        with pytest.raises(ResourceExhausted) as raised:
            await job.result(timeout=120)
        small = await client.submit(text_of, 6 * MiB, gpu=0.1, duration=300)
        value = await small.result(timeout=120)
        liar_job = await client.submit(liar, 12 * MiB, gpu=0.1, duration=300)
        with pytest.raises(ResourceExhausted) as lied:
            await liar_job.result(timeout=120)
    found = TOO_LARGE.match(raised.value.message)
    assert found is not None, raised.value.message
    assert found["size"] == "12.0"
    assert value == "x" * (6 * MiB)
    found = TOO_LARGE.match(lied.value.message)
    assert found is not None, lied.value.message
    assert found["size"] == "12.0"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_large_result_from_a_container(make_stack: StackFactory) -> None:
    from tests.runner.conftest import need

    need("docker")
    stack = await _stack(make_stack, backend="docker", CUMULUS_WORKER_MAX_RESULT_BYTES="64m")
    n = 20 * MiB
    expected = hashlib.sha256(random_bytes(n, 3)).hexdigest()
    async with AsyncClient(profile=stack.profile()) as client:
        job = await client.submit(random_bytes, n, 3, gpu=0.1, duration=300)
        value: Any = await job.result(timeout=240)
        over = await client.submit(text_of, 70 * MiB, gpu=0.1, duration=300)
        with pytest.raises(ResourceExhausted) as raised:
            await over.result(timeout=240)
    assert hashlib.sha256(value).hexdigest() == expected
    assert "The result is 70.0 MiB; the most a job may return is 64.0 MiB" in (raised.value.message)


# -- the parts, without a stack ---------------------------------------------------------------


def test_a_frame_longer_than_any_the_job_writes_is_dropped_not_logged(tmp_path: Path) -> None:
    """An old image's (or a job's own) multi-megabyte frame: never read whole, never logged."""
    out = tmp_path / "stdout.log"
    out.write_bytes(b"before\n" + f"{FRAME} n0nce ".encode() + b"A" * (3 * MAX_FRAME) + b"\nafter")
    tail = FileTail(out)
    got: list[str] = []
    for _ in range(20):
        got += tail.read(final=True, limit=64 * 1024)
    assert got == ["before", DROPPED, "after"]
    assert tail.offset == out.stat().st_size


def test_the_result_file_is_a_plain_file_of_the_jobs_own(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"the host's")
    (tmp_path / "link").symlink_to(secret)
    (tmp_path / "hard").hardlink_to(secret)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "hard", "fifo", "missing"):
        with pytest.raises(ResultError) as raised:
            open_result(tmp_path / name, 1 << 20)
        assert raised.value.code == "INTERNAL"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(TooLarge) as over:
        open_result(big, 1000)
    assert over.value.size == 1001
    source, size = open_result(big, 1001)
    with source:
        assert (size, source.read()) == (1001, b"x" * 1001)


def test_parts_are_joined_in_order_once_each() -> None:
    data = os.urandom(5000)
    pieces = [data[i : i + 1000] for i in range(0, 5000, 1000)]
    with contextlib.closing(_Gathered(5)) as parts:
        for index in (0, 2, 1, 1, 0, 4, 3, 4):
            parts.add(index, pieces[index])
        assert parts.complete
        assert parts.size == 5000
        assert parts.sha256() == hashlib.sha256(data).hexdigest()
        parts.file.seek(0)
        assert parts.file.read() == data
