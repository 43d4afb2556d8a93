"""One job through gateway → scheduler → partitioner → runner over a real JetStream."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client

from cumulus import AsyncClient, CumulusError, package_function
from shared import subjects


def add(a: int, b: int) -> int:
    return a + b


def chatty() -> str:
    print("first line")
    print("second line")
    return "done"


async def test_two_plus_two_comes_back(client: AsyncClient) -> None:
    assert await client.run(add, 2, 2, gpu=0.5, duration=600, logs=None, timeout=60) == 4


async def test_plain_subscriber_sees_the_whole_history_in_order(
    client: AsyncClient, nc: Client
) -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    done = asyncio.Event()

    async def collect(msg: object) -> None:
        subject = msg.subject  # type: ignore[attr-defined]
        seen.append((subject, json.loads(msg.data)))  # type: ignore[attr-defined]
        if subject.endswith(".partition_released"):
            done.set()

    job_id = "e2e-order-1"
    await nc.subscribe(f"jobs.*.{job_id}.>", cb=collect)
    await nc.subscribe(subjects.job_logs(job_id), cb=collect)  # its output: stream LOGS
    job = await client.submit_package(
        package_function(chatty), gpu=0.5, duration=600, job_id=job_id
    )
    assert await job.result(timeout=60) == "done"
    await asyncio.wait_for(done.wait(), 30)

    names = [subjects.parse_job_subject(s)[3] for s, _ in seen]
    expected = [
        "submitted",
        "scheduled",
        "partition_ready",
        "started",
        "log",
        "completed",
        "partition_released",
    ]
    assert [n for n in names if n in expected] == expected
    for subject, body in seen:
        user, jid, worker, name = subjects.parse_job_subject(subject)
        assert jid == job_id
        assert body["job_id"] == job_id
        assert body["type"] == f"cumulus.job.v1.{'scheduled' if name == 'scheduled' else name}"
        assert body["event_id"]
        assert body["ts"] > 0
        assert body["trace"].startswith("00-")
        if name != "submitted":
            assert worker == "worker-1"
    log_lines = [line for s, b in seen if s.startswith("logs.") for line in b["lines"]]
    assert [text for _, text in log_lines] == ["first line", "second line"]


async def test_events_replay_from_the_start_after_the_job_ended(client: AsyncClient) -> None:
    job = await client.submit(add, 20, 22, gpu=0.3, duration=600)
    assert await job.result(timeout=60) == 42
    # A late subscriber (e.g. after a reconnect) still gets everything from the first event.
    names = [type(e).__name__ async for e in job.events()]
    assert names[0] == "JobSubmitted"
    assert names[-1] == "JobCompleted"


async def test_status_reports_the_finished_job(client: AsyncClient) -> None:
    job = await client.submit(add, 1, 1, gpu=1, duration=600)
    assert await job.result(timeout=60) == 2
    status = await job.status()
    assert status.status == "COMPLETED"
    assert status.gpu == "1"
    assert status.worker_id == "worker-1"
    assert len(status.partition_ids) == 1


async def test_user_exception_comes_back_typed_with_traceback(client: AsyncClient) -> None:
    def boom() -> None:
        raise ValueError("bad input 17")

    job = await client.submit(boom, gpu=0.1, duration=600)
    with pytest.raises(CumulusError) as info:
        await job.result(timeout=60)
    assert info.value.code == "INTERNAL"
    assert "ValueError: bad input 17" in info.value.message
    assert "Remote traceback" in info.value.message
    assert "in boom" in info.value.message
    status = await job.status()
    assert status.status == "FAILED"
    assert status.error_code == "INTERNAL"


def big(n: int) -> str:
    print("making a big result")
    return "y" * n


async def test_a_result_larger_than_a_message_comes_back_whole(client: AsyncClient) -> None:
    value = await client.run(big, 3_000_000, gpu=0.1, duration=600, logs=None, timeout=60)
    assert value == "y" * 3_000_000


def last_line_without_newline() -> int:
    import sys

    print("line one")
    sys.stdout.write("no newline at the end")
    return 7


async def test_the_last_line_without_a_newline_is_delivered(client: AsyncClient) -> None:
    job = await client.submit(last_line_without_newline, gpu=0.1, duration=600)
    lines = [
        line.text async for e in job.events() if type(e).__name__ == "JobLog" for line in e.lines
    ]  # type: ignore[attr-defined]
    assert lines == ["line one", "no newline at the end"]
    assert await job.result(timeout=30) == 7
