"""Retries of user failures (`retries=N`): a job whose code fails is run again, as a new
attempt, after a backoff, and ends once, after its last attempt; a cancelled or timed-out job
is not retried.

The decisions are checked first without a bus (the scheduler's apply/decide chain, as the
service runs it), then through the real stack: a job that fails twice then succeeds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from cumulus import AsyncClient, CumulusError, InvalidArgument, JobOptions, JobStatus
from services.scheduler.handlers import promotion, retry_due
from services.stack import Stack
from shared import events as ev
from tests.runner.conftest import need
from tests.scheduler.harness import Driver, spec


def _failed(driver: Driver, job_id: str, ts: float) -> list[ev.Event]:
    job = driver.job(job_id)
    return driver.feed(
        ev.JobAttemptFailed(
            job_id=job_id,
            worker_id=job.worker_id,
            attempt=job.attempt,
            code="INTERNAL",
            message="ValueError: boom",
            log_lines=2,
            ts=ts,
        )
    )


def _released(driver: Driver, job_id: str, attempt: int) -> None:
    """The worker's partitioner released the revoked attempt's partition."""
    driver.feed(
        ev.PartitionReleased(job_id=job_id, worker_id="w1", attempt=attempt, partition_ids=["p"])
    )


def _retry(driver: Driver, now: float) -> list[ev.Event]:
    out: list[ev.Event] = []
    for event in retry_due(driver.state, driver.scheduler.policy, now):
        out += [event, *driver.feed(event)]
    return out


def test_a_failed_attempt_is_revoked_and_placed_again_after_its_backoff() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.feed(ev.JobSubmitted(job_id="r1", spec=msgspec.structs.replace(spec(5), retries=2)))
    d.start("r1")

    out = _failed(d, "r1", ts=100.0)
    assert [type(e) for e in out] == [ev.PlacementRevoked]
    revoked = out[0]
    assert isinstance(revoked, ev.PlacementRevoked)
    assert (revoked.attempt, revoked.worker_id) == (1, "w1")
    assert revoked.retry_at == 100.0 + ev.retry_backoff(0) == 101.0
    assert "retry 1 of 2" in revoked.reason
    assert d.job("r1").status == "pending"
    _released(d, "r1", 1)
    assert _retry(d, now=100.5) == []  # not before its backoff is over
    placed = _retry(d, now=101.0)
    assert [type(e) for e in placed] == [ev.WorkerSelected]
    assert d.job("r1").attempt == 2

    d.start("r1")
    second = _failed(d, "r1", ts=200.0)
    assert isinstance(second[0], ev.PlacementRevoked)
    assert second[0].retry_at == 202.0  # the backoff doubles
    _released(d, "r1", 2)
    _retry(d, now=202.0)
    d.start("r1")

    last = _failed(d, "r1", ts=300.0)
    assert [type(e) for e in last] == [ev.JobFailed]
    end = last[0]
    assert isinstance(end, ev.JobFailed)
    assert (end.attempt, end.worker_id, end.log_lines) == (3, "w1", 2)
    assert end.message == "ValueError: boom (after 3 attempts)"
    assert d.job("r1").status == "done"
    assert not d.state.workers["w1"].devices[0].allocated.get("r1")


def test_a_job_without_retries_and_a_cancelled_one_end_at_their_failure() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.feed(ev.JobSubmitted(job_id="r2", spec=spec(5)))
    d.start("r2")
    assert [type(e) for e in _failed(d, "r2", ts=1.0)] == [ev.JobFailed]

    d.feed(ev.JobSubmitted(job_id="r3", spec=msgspec.structs.replace(spec(5), retries=3)))
    d.start("r3")
    d.feed(ev.CancelRequested(job_id="r3"))
    assert [type(e) for e in _failed(d, "r3", ts=2.0)] == [ev.JobFailed]


def test_a_scheduler_that_takes_over_decides_a_failure_left_undecided() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.feed(ev.JobSubmitted(job_id="r4", spec=msgspec.structs.replace(spec(5), retries=1)))
    d.start("r4")
    job = d.job("r4")
    failure = ev.JobAttemptFailed(
        job_id="r4", worker_id="w1", attempt=job.attempt, code="INTERNAL", message="x", ts=5.0
    )
    d.scheduler.apply(failure)  # applied, but its decision was never taken (a crash)
    d.log.append(ev.encode(failure))
    d.restart()
    decided = promotion(d.state, d.scheduler.policy, now=6.0)
    assert [type(e) for e in decided] == [ev.PlacementRevoked]


def test_retries_are_checked() -> None:
    assert JobOptions(retries=10).retries == 10
    for bad in (-1, 11, True, 1.5):
        with pytest.raises(InvalidArgument, match="retries"):
            JobOptions(retries=bad)  # type: ignore[arg-type]


# -- through the real stack -------------------------------------------------------------------


def flaky(path: str, failures: int) -> int:
    """Fails its first `failures` runs (counted in a file), then returns the run's number."""
    import pathlib

    counter = pathlib.Path(path)
    run = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(run))
    print(f"run {run}", flush=True)
    if run <= failures:
        raise ValueError(f"run {run} fails")
    return run


def sleepy() -> None:
    import time

    print("sleeping", flush=True)
    time.sleep(60)


@pytest.fixture(scope="module")
async def retry_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # Unsandboxed jobs (the operator's opt-in), so that one can count its runs in a file.
    s = Stack(
        data_dir=tmp_path_factory.mktemp("retries"),
        workers=["worker-1"],
        devices="2x16GiB",
        env={"CUMULUS_WORKER_SANDBOX": "none"},
    )
    try:
        await s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
async def rclient(retry_stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(profile=retry_stack.profile()) as c:
        yield c


async def test_a_job_failing_twice_then_succeeding_with_retries_2_completes(
    rclient: AsyncClient, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    job = await rclient.submit_call(flaky, (str(counter), 2), gpu=0.1, duration=60, retries=2)
    assert await job.result(timeout=120) == 3

    history = [e async for e in job.events(follow=False)]
    placed = [e.attempt for e in history if isinstance(e, ev.WorkerSelected)]
    assert placed == [1, 2, 3]
    failed = [e for e in history if isinstance(e, ev.JobAttemptFailed)]
    assert [(e.attempt, e.message) for e in failed] == [
        (1, "ValueError: run 1 fails"),
        (2, "ValueError: run 2 fails"),
    ]
    assert "ValueError" in failed[0].traceback
    retries = [e for e in history if isinstance(e, ev.PlacementRevoked)]
    assert [e.retry_at > 0 for e in retries] == [True, True]
    ends = [e for e in history if isinstance(e, ev.Terminal)]
    assert [type(e) for e in ends] == [ev.JobCompleted]  # one end, after the last attempt
    lines = [line.text for e in history if isinstance(e, ev.JobLog) for line in e.lines]
    assert [text for text in lines if text.startswith("run ")] == ["run 1", "run 2", "run 3"]

    info = await job.status()
    assert (info.status, info.attempt, info.failed_attempts, info.retries) == (
        JobStatus.COMPLETED,
        3,
        2,
        2,
    )


async def test_a_job_whose_retries_run_out_fails_once_with_the_last_error(
    rclient: AsyncClient, tmp_path: Path
) -> None:
    job = await rclient.submit_call(
        flaky, (str(tmp_path / "runs"), 5), gpu=0.1, duration=60, retries=1
    )
    with pytest.raises(Exception, match="run 2 fails") as raised:
        await job.result(timeout=120)
    assert getattr(raised.value, "code", "") == "INTERNAL"
    history = [e async for e in job.events(follow=False)]
    ends = [e for e in history if isinstance(e, ev.Terminal)]
    assert [type(e) for e in ends] == [ev.JobFailed]
    assert ends[0].attempt == 2
    assert (await job.status()).failed_attempts == 2


async def test_a_cancelled_job_is_not_retried(rclient: AsyncClient) -> None:
    job = await rclient.submit_call(sleepy, (), gpu=0.1, duration=60, retries=3)
    async with contextlib.aclosing(job.events()) as events:
        async for event in events:
            if isinstance(event, ev.JobLog):
                break
    await job.cancel()
    assert await job.wait(timeout=60) is JobStatus.CANCELLED
    history = [e async for e in job.events(follow=False)]
    assert [e.attempt for e in history if isinstance(e, ev.WorkerSelected)] == [1]
    assert not [e for e in history if isinstance(e, ev.JobAttemptFailed)]


def always_fails() -> None:
    print("trying", flush=True)
    raise RuntimeError("always broken")


@pytest.mark.docker
async def test_retries_on_the_docker_engine(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same decisions for a job in a container: each attempt a container of its own, the
    job's end once, after its last attempt, with that attempt's error."""
    need("docker")
    s = Stack(
        data_dir=tmp_path_factory.mktemp("retries-docker"), workers=["docker-1"], backend="docker"
    )
    try:
        await s.start()
        async with AsyncClient(profile=s.profile()) as client:
            job = await client.submit_call(always_fails, (), gpu=0.1, duration=60, retries=1)
            with pytest.raises(CumulusError, match="always broken") as raised:
                await job.result(timeout=180)
            assert "after 2 attempts" in str(raised.value)
            history = [e async for e in job.events(follow=False)]
    finally:
        s.stop()
    assert [e.attempt for e in history if isinstance(e, ev.WorkerSelected)] == [1, 2]
    # every attempt's failure is a fact of its own; the scheduler's `failed` ends the job
    assert [e.attempt for e in history if isinstance(e, ev.JobAttemptFailed)] == [1, 2]
    ends = [e for e in history if isinstance(e, ev.Terminal)]
    assert [(type(e), e.attempt) for e in ends] == [(ev.JobFailed, 2)]
    lines = [line.text for e in history if isinstance(e, ev.JobLog) for line in e.lines]
    assert lines.count("trying") == 2
