"""A warm map job whose worker is lost runs again elsewhere (issue 13).

An ordinary job started (or whose partition was ready) on a worker that is lost fails
UNAVAILABLE: its runner may still be running it, and running it twice is not safe. A warm map
may run twice: its work queue answers each input once. So its placement is revoked and it is
placed again, a new attempt on another worker (queued if none fits), until `max_attempts`.
"""

from __future__ import annotations

import msgspec

from services.scheduler import snapshot as snapshots
from shared import events as ev
from tests.scheduler.harness import Driver

MAP = ev.MapSpec(warm=4, inputs=1000, retries=1)


def kinds(events: list[ev.Event]) -> list[str]:
    return [e.name for e in events]


def submit_map(d: Driver, job_id: str = "jmap", tenths: int = 5) -> str:
    spec = ev.JobSpec(code_ref="x" * 64, gpu_tenths=tenths, duration_s=600, map=MAP)
    d.feed(ev.JobSubmitted(job_id=job_id, spec=spec))
    return job_id


def start(d: Driver, job_id: str) -> None:
    """Its partition ready, then its runner started (as the worker reports them)."""
    job = d.job(job_id)
    d.feed(
        ev.PartitionReady(
            job_id=job_id,
            worker_id=job.worker_id,
            attempt=job.attempt,
            spec=job.spec,
            partition_ids=["p"],
            devices=list(job.devices),
            env={},
            expires_at=0.0,
        )
    )
    d.start(job_id)


def lose(d: Driver, worker: str) -> list[ev.Event]:
    return d.feed(ev.WorkerLost(worker_id=worker, reason="no heartbeat for 15 s"))


def test_a_started_map_is_placed_again_on_another_worker_when_its_worker_is_lost() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job = submit_map(d)
    first = d.job(job).worker_id
    start(d, job)
    out = lose(d, first)
    assert kinds(out) == ["revoked", "scheduled"]
    again = out[1]
    assert isinstance(again, ev.WorkerSelected)
    assert again.worker_id != first
    assert again.attempt == 2
    assert again.spec.map == MAP  # the worker gets the whole spec again
    state = d.job(job)
    assert (state.status, state.attempt, state.started, state.partitioned) == (
        "placed",
        2,
        False,
        False,
    )


def test_a_map_whose_partition_was_only_ready_is_placed_again_too() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job = submit_map(d)
    first = d.job(job).worker_id
    d.feed(
        ev.PartitionReady(
            job_id=job,
            worker_id=first,
            attempt=1,
            spec=d.job(job).spec,
            partition_ids=["p"],
            devices=[0],
            env={},
            expires_at=0.0,
        )
    )
    assert kinds(lose(d, first)) == ["revoked", "scheduled"]
    assert d.job(job).attempt == 2


def test_a_lost_map_waits_in_the_queue_when_no_other_worker_has_room() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    job = submit_map(d)
    start(d, job)
    out = lose(d, "w1")
    assert kinds(out) == ["revoked", "queued"]
    assert d.job(job).status == "queued"
    placed = d.add_worker("w2", 1)
    assert kinds(placed) == ["scheduled"]
    assert (d.job(job).worker_id, d.job(job).attempt) == ("w2", 2)


def test_a_map_lost_on_its_last_attempt_fails_as_an_ordinary_job_does() -> None:
    d = Driver(max_attempts=2)
    for w in ("w1", "w2", "w3"):
        d.add_worker(w, 1)
    job = submit_map(d)
    start(d, job)
    assert kinds(lose(d, d.job(job).worker_id)) == ["revoked", "scheduled"]
    start(d, job)
    second = d.job(job).worker_id
    out = lose(d, second)
    assert kinds(out) == ["revoked", "failed"]
    failed = out[1]
    assert isinstance(failed, ev.JobFailed)
    assert failed.code == "UNAVAILABLE"
    assert failed.attempt == 2
    assert failed.message == (
        f"Worker {second} was lost while running the job (no heartbeat for 15 s)"
    )
    assert d.job(job).status == "done"


def test_an_ordinary_started_job_still_fails_when_its_worker_is_lost() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job, _ = d.submit(5)
    start(d, job)
    assert kinds(lose(d, d.job(job).worker_id)) == ["revoked", "failed"]


def test_the_lost_attempts_late_end_neither_ends_the_map_nor_frees_its_new_attempt() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job = submit_map(d, tenths=10)
    start(d, job)
    lose(d, "w1")
    assert d.job(job).worker_id == "w2"
    # w1 comes back and reports attempt 1's end: stale, the map runs on as attempt 2.
    d.feed(ev.WorkerHeartbeat(worker_id="w1", interval_s=5.0))
    d.feed(
        ev.JobCompleted(job_id=job, worker_id="w1", attempt=1, result=msgspec.Raw(b'{"ok":true}'))
    )
    assert (d.job(job).status, d.job(job).attempt) == ("placed", 2)
    assert d.state.workers["w2"].devices[0].allocated == {job: 10}
    # Attempt 1's share on w1 is held until w1 releases its partition.
    assert d.state.workers["w1"].devices[0].allocated == {f"{job}.1": 10}
    d.feed(ev.PartitionReleased(job_id=job, worker_id="w1", attempt=1, partition_ids=["p"]))
    assert d.state.workers["w1"].devices[0].allocated == {}


def test_the_map_spec_survives_a_snapshot_and_a_replay() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job = submit_map(d)
    start(d, job)
    restored, _ = snapshots.decode(snapshots.encode(d.state, {}))
    assert restored.jobs[job].spec.map == MAP
    assert restored.allocation() == d.state.allocation()
    d.restart()
    assert d.job(job).spec.map == MAP
    # The restarted scheduler decides as the first would have.
    assert kinds(lose(d, d.job(job).worker_id)) == ["revoked", "scheduled"]
