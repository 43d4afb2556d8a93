"""Issue 11, finding 4: the scheduler believes only the current attempt (DESIGN.md rule 9).

A worker whose partitioner pauses is declared lost; its attempts are revoked and placed again,
perhaps on the same worker once it is back. Whatever the revoked attempt's worker reports
afterwards (started, partition failed, an end) changes nothing, and the share it held stays
allocated until that worker reports its partition released, then is freed exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from shared import events as ev
from tests.scheduler.harness import Driver


def kinds(events: list[ev.Event]) -> list[str]:
    return [e.name for e in events]


def used(d: Driver, worker: str) -> list[int]:
    return [device.used for device in d.state.workers[worker].devices]


def released(job_id: str, attempt: int, worker: str) -> ev.PartitionReleased:
    return ev.PartitionReleased(
        job_id=job_id, worker_id=worker, attempt=attempt, partition_ids=["p"]
    )


def completed(job_id: str, attempt: int, worker: str) -> ev.JobCompleted:
    return ev.JobCompleted(
        job_id=job_id, worker_id=worker, attempt=attempt, result=msgspec.Raw(b'{"ok":true}')
    )


def lose_and_revive(d: Driver, worker: str) -> list[ev.Event]:
    out = d.feed(ev.WorkerLost(worker_id=worker, reason="no heartbeat for 3 s"))
    return out + d.feed(ev.WorkerHeartbeat(worker_id=worker, interval_s=0.5))


def test_a_revoked_attempts_share_is_held_until_its_partition_is_released() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    job, _ = d.submit(10)
    out = lose_and_revive(d, "w1")
    # Revoked and queued: the worker is back, but its device may still hold the old attempt.
    assert kinds(out) == ["revoked", "queued"]
    assert d.state.workers["w1"].devices[0].allocated == {f"{job}.1": 10}
    other, out = d.submit(5)
    assert kinds(out) == ["queued"]
    out = d.feed(released(job, 1, "w1"))
    assert kinds(out) == ["scheduled"]  # the head of the queue: the job again, attempt 2
    assert (d.job(job).attempt, d.job(job).worker_id) == (2, "w1")
    assert used(d, "w1") == [10]
    # A repeated release frees nothing twice.
    assert d.feed(released(job, 1, "w1")) == []
    assert used(d, "w1") == [10]
    assert d.job(other).status == "queued"


def test_the_end_of_a_revoked_attempt_neither_ends_the_job_nor_frees_the_new_attempt() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    job, _ = d.submit(5)
    lose_and_revive(d, "w1")
    d.feed(released(job, 1, "w1"))
    assert (d.job(job).status, d.job(job).attempt) == ("placed", 2)
    # Attempt 1's runner finished it just as the worker was declared lost: stale.
    assert d.feed(completed(job, 1, "w1")) == []
    assert d.job(job).status == "placed"
    assert used(d, "w1") == [5]
    _, out = d.submit(6)
    assert kinds(out) == ["queued"]  # no over-booking: 0.5 + 0.6 > 1
    out = d.feed(completed(job, 2, "w1"))
    assert d.job(job).status == "done"
    assert kinds(out) == ["scheduled"]
    assert used(d, "w1") == [6]


def test_started_and_partition_failed_of_an_old_attempt_change_nothing() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job, _ = d.submit(5)
    first = d.job(job).worker_id
    out = d.feed(ev.WorkerLost(worker_id=first, reason="gone"))
    assert kinds(out) == ["revoked", "scheduled"]
    second = d.job(job).worker_id
    assert second != first
    d.feed(ev.JobStarted(job_id=job, worker_id=first, backend="process", handle="1", attempt=1))
    assert not d.job(job).started
    d.feed(ev.PartitionFailed(job_id=job, worker_id=first, attempt=1, code="INTERNAL", message="x"))
    assert (d.job(job).status, d.job(job).attempt, d.job(job).worker_id) == ("placed", 2, second)
    assert used(d, second) == [5]


def test_a_lost_worker_fails_its_started_job_once_and_the_late_end_changes_nothing() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    job, _ = d.submit(5)
    d.start(job)
    out = d.feed(ev.WorkerLost(worker_id="w1", reason="gone"))
    assert kinds(out) == ["revoked", "failed"]
    failed = out[1]
    assert isinstance(failed, ev.Terminal)
    assert failed.attempt == 1
    assert d.job(job).status == "done"
    assert d.feed(completed(job, 1, "w1")) == []
    assert d.state.workers["w1"].devices[0].allocated == {f"{job}.1": 5}
    d.feed(ev.WorkerHeartbeat(worker_id="w1", interval_s=0.5))
    d.feed(released(job, 1, "w1"))
    assert used(d, "w1") == [0]


def test_a_release_of_a_current_attempt_frees_nothing_its_end_did_not() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    a, _ = d.submit(5)
    d.complete(a)
    b, _ = d.submit(5)
    c, _ = d.submit(5)
    # a's partition released after b and c took the device: nothing of theirs is freed.
    assert d.feed(released(a, 1, "w1")) == []
    assert used(d, "w1") == [10]
    assert {d.job(b).status, d.job(c).status} == {"placed"}


def test_the_held_share_survives_a_restart() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    job, _ = d.submit(10)
    lose_and_revive(d, "w1")
    before = d.state.allocation()
    d.restart()
    assert d.state.allocation() == before
    d.feed(released(job, 1, "w1"))
    assert d.job(job).attempt == 2


# -- chaos findings C2, C3: at most once when a worker only seems lost -----------------------


def test_a_lost_workers_job_whose_partition_was_ready_fails_rather_than_runs_twice() -> None:
    """Its runner may have started it before the pause (its `started` not yet on the bus):
    placing it again elsewhere could run it twice at once."""
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job, _ = d.submit(5)
    worker = d.job(job).worker_id
    d.feed(
        ev.PartitionReady(
            job_id=job,
            worker_id=worker,
            attempt=1,
            spec=d.job(job).spec,
            partition_ids=["p"],
            devices=[0],
            env={},
            expires_at=0.0,
        )
    )
    out = d.feed(ev.WorkerLost(worker_id=worker, reason="no heartbeat for 3 s"))
    assert kinds(out) == ["revoked", "failed"]
    failure = out[1]
    assert isinstance(failure, ev.JobFailed)
    assert failure.code == "UNAVAILABLE"
    assert "while starting the job" in failure.message
    assert d.job(job).status == "done"


def test_a_lost_workers_job_not_yet_partitioned_is_placed_again() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job, _ = d.submit(5)
    first = d.job(job).worker_id
    out = d.feed(ev.WorkerLost(worker_id=first, reason="no heartbeat for 3 s"))
    assert kinds(out) == ["revoked", "scheduled"]
    assert d.job(job).worker_id != first
    assert d.job(job).attempt == 2


def test_silence_counts_only_from_when_the_scheduler_could_hear() -> None:
    """A scheduler whose own log refused writes (a full disk) could record no heartbeat: the
    workers were not silent, it was deaf. Silence counts from the end of its pause."""
    d = Driver()
    d.add_worker("w1", 1)
    last_seen = d.state.workers["w1"].last_seen
    window = d.config.scheduler.heartbeat_misses * d.state.workers["w1"].heartbeat_s
    later = last_seen + window + 1.0
    d.scheduler.hearing_since = last_seen + 2.0  # it began to hear again after the beat
    assert d.scheduler.silent(later) == []
    assert [e.worker_id for e in d.scheduler.silent(later + 2.0)] == ["w1"]
    d.scheduler.hearing_since = 0.0
    assert [e.worker_id for e in d.scheduler.silent(later)] == ["w1"]


async def test_a_bus_reconnection_restarts_the_silence_window() -> None:
    """Heartbeats published while the bus was away never reached the scheduler."""
    d = Driver()
    d.add_worker("w1", 1)
    d.scheduler.hearing_since = 0.0
    await d.scheduler._reconnected()
    assert d.scheduler.hearing_since > d.state.workers["w1"].last_seen - 1.0
    window = d.config.scheduler.heartbeat_misses * d.state.workers["w1"].heartbeat_s
    assert d.scheduler.silent(d.scheduler.hearing_since + window - 0.5) == []


async def test_an_in_process_rebuild_restarts_the_silence_window(tmp_path: Path) -> None:
    """Heartbeats are never logged: a state rebuilt from the log (after a poison event or a
    failed commit) has each worker's last beat from long ago. Its workers must not all be
    declared lost for that (chaos finding C6)."""
    from services.scheduler.app import Scheduler
    from shared import config as config_mod
    from shared.eventlog import EventLog

    scheduler = Scheduler(config_mod.load(environ={"CUMULUS_DATA_DIR": str(tmp_path)}))
    scheduler.eventlog = await EventLog.open(scheduler.db_path)
    try:
        registered = ev.WorkerRegistered(
            worker_id="w1", hostname="w1", devices=[], ts=time.time() - 600
        )
        await scheduler.emit([registered])
        scheduler.hearing_since = 0.0
        assert [e.worker_id for e in scheduler.silent(time.time())] == ["w1"]
        await scheduler._rebuild()
        assert scheduler.silent(time.time()) == []
    finally:
        await scheduler.eventlog.close()
