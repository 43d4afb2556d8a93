"""Issue 11, finding 9 (the bus side): growth was unbounded. The JOBS stream had no limits and
held every output line (~155 B each) and every large result next to the job history the
services replay; the code bucket had no TTL.

Now JOBS drops its oldest events past `retention.jobs_max_age_s` / `jobs_max_bytes`, output
lives in a stream of its own (LOGS: `logs.<user>.<job>.<worker>`, `retention.logs_*`), large
results in another (RESULTS: `results.<user>.<job>.<worker>.<attempt>`, `retention.results_*`),
and the code bucket expires packages after `retention.code_ttl_s`. An existing stream is
brought to the configured limits when the control plane starts. A job's output and its large
result still reach the SDK whole and in order, and a watch replays both; when old output
drops out of LOGS, the job's history stays and status still answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev
from shared import subjects
from shared.config import RetentionConfig
from shared.errors import InvalidArgument
from tests.conftest import StackFactory
from tests.security.conftest import connect_as, publish_denied, receives_nothing

LINES = 2000
BIG = 1_500_000
"""Characters of a result too large for one message (it travels as parts)."""


def chatty(n: int) -> int:
    for i in range(n):
        print(f"line {i:04d} " + "x" * 40)
    return n


def big(n: int) -> str:
    print("making a big result")
    return "y" * n


def expected_lines(n: int) -> list[str]:
    return [f"line {i:04d} " + "x" * 40 for i in range(n)]


async def subject_counts(js: JetStreamContext, stream: str, subject: str) -> dict[str, int]:
    """Messages per subject that `stream` holds under `subject`."""
    info = await js.stream_info(stream, subjects_filter=subject)
    return dict(info.state.subjects or {})


# -- the session stack (default retention) ----------------------------------------------


async def test_output_and_large_results_leave_the_job_stream(
    client: AsyncClient, nc: NatsClient
) -> None:
    """A job's 2,000 lines reach run() whole and in order, all of them before it returns,
    and sit in LOGS; its history in JOBS has no output; a result over 1 MiB comes back whole
    from RESULTS."""
    out = io.StringIO()
    job = await client.submit(chatty, LINES, gpu=0.1, duration=600)
    assert await job.result(timeout=120, logs=out) == LINES
    assert out.getvalue().splitlines() == expected_lines(LINES)

    js = nc.jetstream()
    history = await subject_counts(js, subjects.JOBS_STREAM, subjects.job_all(job.job_id))
    assert history, "the job's history is in JOBS"
    assert not [s for s in history if s.endswith((".log", ".result"))], history
    output = await subject_counts(js, subjects.LOGS_STREAM, subjects.job_logs(job.job_id))
    assert list(output) == [subjects.log("default", job.job_id, "worker-1")]

    value = await client.run(big, BIG, gpu=0.1, duration=600, logs=False, timeout=120)
    assert value == "y" * BIG
    jobs = await client.jobs(limit=1)
    parts = await subject_counts(js, subjects.RESULTS_STREAM, f"results.*.{jobs[0].job_id}.>")
    assert sum(parts.values()) >= 2, parts
    history = await subject_counts(js, subjects.JOBS_STREAM, subjects.job_all(jobs[0].job_id))
    assert not [s for s in history if s.endswith(".result")], history


async def test_a_watch_replays_events_output_and_result(client: AsyncClient) -> None:
    """After the job ended, a new handle replays its events and every output line (from two
    streams) and the value of its large result (from a third)."""
    job = await client.submit(chatty, LINES, gpu=0.1, duration=600)
    assert await job.wait(timeout=120) == "COMPLETED"
    again = client.get_job(job.job_id)
    events = [e async for e in again.events(follow=False)]
    names = [type(e).__name__ for e in events]
    assert names[0] == "JobSubmitted", names
    assert names[-1] == "JobCompleted", names
    replayed = [line.text for e in events if isinstance(e, ev.JobLog) for line in e.lines]
    assert replayed == expected_lines(LINES)
    assert [line.text async for line in again.logs()] == expected_lines(LINES)

    large = await client.submit(big, BIG, gpu=0.1, duration=600)
    assert await large.wait(timeout=120) == "COMPLETED"
    ends = [e async for e in client.get_job(large.job_id).events() if isinstance(e, ev.Terminal)]
    assert isinstance(ends[0], ev.JobCompleted)
    assert await large.value(ends[0]) == "y" * BIG


async def test_no_service_consumes_output(nc: NatsClient, client: AsyncClient) -> None:
    """The services' durable consumers are on JOBS (and WORKERS) only: output never reaches
    the scheduler, the partitioners or the runners."""
    assert await client.run(chatty, 3, gpu=0.1, duration=600, logs=False, timeout=60) == 3
    js = nc.jetstream()
    for stream in (subjects.LOGS_STREAM, subjects.RESULTS_STREAM):
        durables = [c.name for c in await js.consumers_info(stream) if c.config.durable_name]
        assert durables == [], (stream, durables)


async def test_output_is_read_only_by_its_owner_and_written_only_by_its_worker(
    stack: Stack, client: AsyncClient, nc: NatsClient
) -> None:
    alice = await connect_as(stack, stack.profile("alice"))
    bob = await connect_as(stack, stack.profile("bob"))
    evil_path = stack.credentials("worker", "evil", ("evil",))
    stack.reload()
    evil = await connect_as(stack, evil_path)
    try:
        own: list[str] = []

        async def collect(msg: object) -> None:
            own.append(msg.subject)  # type: ignore[attr-defined]

        await alice.nc.subscribe("logs.alice.>", cb=collect)  # a user's own output: allowed
        await alice.nc.flush()
        async with AsyncClient(profile=stack.profile("alice")) as alice_client:
            job = await alice_client.submit(chatty, 5, gpu=0.1, duration=600)
            assert await job.result(timeout=60) == 5
            for pattern in ("logs.alice.>", "logs.>", "results.>", f"results.alice.{job.job_id}.>"):
                await receives_nothing(bob, pattern)
            async with AsyncClient(profile=stack.profile("bob")) as bob_client:
                for watched in ("logs.alice.>", "results.alice.>", "logs.>"):
                    with pytest.raises(InvalidArgument):
                        await bob_client._call(
                            "watch", {"filter": watched, "deliver": bob_client.nc.new_inbox()}, dict
                        )
        assert own, "alice reads her own output live"
        assert all(s.startswith(f"logs.alice.{job.job_id}.") for s in own), own
        forged = ev.JobLog(job_id=job.job_id, user="alice", worker_id="worker-1", seq=5, lines=[])
        await publish_denied(
            evil, nc, subjects.log("alice", job.job_id, "worker-1"), ev.encode(forged)
        )
    finally:
        for ident in (alice, bob, evil):
            await ident.nc.close()


async def test_the_streams_have_the_default_limits(nc: NatsClient) -> None:
    js = nc.jetstream()
    defaults = RetentionConfig()
    for name, age, size in (
        (subjects.JOBS_STREAM, defaults.jobs_max_age_s, "jobs_max_bytes"),
        (subjects.LOGS_STREAM, defaults.logs_max_age_s, "logs_max_bytes"),
        (subjects.RESULTS_STREAM, defaults.results_ttl_s, "results_max_bytes"),
    ):
        config = (await js.stream_info(name)).config
        assert config.max_age == age, name
        assert config.max_bytes == defaults.bytes_of(size), name
        assert config.discard == DiscardPolicy.OLD, name
    code = await js.stream_info(f"OBJ_{subjects.CODE_BUCKET}")
    assert code.config.max_age == defaults.code_ttl_s


# -- a stack of its own, with small limits ----------------------------------------------

RETENTION = {
    "CUMULUS_RETENTION_JOBS_MAX_AGE_S": "3600",
    "CUMULUS_RETENTION_JOBS_MAX_BYTES": "64MiB",
    "CUMULUS_RETENTION_LOGS_MAX_AGE_S": "1800",
    "CUMULUS_RETENTION_LOGS_MAX_BYTES": "1MiB",
    "CUMULUS_RETENTION_RESULTS_TTL_S": "7200",
    "CUMULUS_RETENTION_RESULTS_MAX_BYTES": "128MiB",
    "CUMULUS_RETENTION_CODE_TTL_S": "86400",
}
LIMITS = {
    subjects.JOBS_STREAM: (3600.0, 64 << 20),
    subjects.LOGS_STREAM: (1800.0, 1 << 20),
    subjects.RESULTS_STREAM: (7200.0, 128 << 20),
}


async def _limits(js: JetStreamContext) -> dict[str, tuple[float, int]]:
    out = {}
    for name in LIMITS:
        config = (await js.stream_info(name)).config
        assert config.discard == DiscardPolicy.OLD, name
        out[name] = (config.max_age or 0.0, config.max_bytes or -1)
    return out


async def _code_ttl(js: JetStreamContext) -> float:
    return (await js.stream_info(f"OBJ_{subjects.CODE_BUCKET}")).config.max_age or 0.0


@pytest.fixture
async def small(make_stack: StackFactory) -> Stack:
    return await make_stack(workers=["worker-1"], devices="2x16GiB", env=dict(RETENTION))


@pytest.mark.slow
async def test_streams_take_the_configured_limits_and_old_ones_are_updated(small: Stack) -> None:
    nc = await small.connect()
    try:
        js = nc.jetstream()
        assert await _limits(js) == LIMITS
        assert await _code_ttl(js) == 86400.0

        # streams as an older Cumulus made them: no limits at all, no code TTL
        for name in LIMITS:
            config = (await js.stream_info(name)).config
            await js.update_stream(dataclasses.replace(config, max_age=0.0, max_bytes=-1))
        code = (await js.stream_info(f"OBJ_{subjects.CODE_BUCKET}")).config
        await js.update_stream(dataclasses.replace(code, max_age=0.0))
        assert (await _limits(js))[subjects.JOBS_STREAM] == (0.0, -1)

        for name in ("gateway", "scheduler"):  # the control plane's next start
            small.restart(name)
        await small.wait_ready(60)
        assert await _limits(js) == LIMITS
        assert await _code_ttl(js) == 86400.0
    finally:
        await nc.close()


@pytest.mark.slow
async def test_old_output_drops_out_while_the_job_history_stays(small: Stack) -> None:
    """LOGS holds at most 1 MiB here (the least it may): a chatty job pushes an earlier job's
    output out. The earlier job's events, status and value remain."""
    nc = await small.connect()
    try:
        js = nc.jetstream()
        async with AsyncClient(profile=small.profile()) as client:
            first = await client.submit(chatty, 50, gpu=0.1, duration=600)
            assert await first.result(timeout=60) == 50
            assert len([line async for line in first.logs()]) == 50
            assert await client.run(chatty, 30000, gpu=0.1, duration=600, timeout=180) == 30000

            info = await js.stream_info(subjects.LOGS_STREAM)
            assert (info.state.bytes or 0) <= 1 << 20
            assert [line async for line in first.logs()] == []  # its output is gone
            status = await first.status()
            assert status.status == "COMPLETED"
            names = [type(e).__name__ async for e in first.events(follow=False)]
            assert names[0] == "JobSubmitted", names
            assert names[-1] == "JobCompleted", names
            began = time.monotonic()
            assert await asyncio.wait_for(client.get_job(first.job_id).result(), 30) == 50
            assert time.monotonic() - began < 15  # waits a little for lines, not forever
    finally:
        await nc.close()
