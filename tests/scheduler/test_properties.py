"""Random histories against the real scheduler: capacity is never double-booked or leaked.

A hypothesis state machine submits jobs of every allowed size and priority, starts, completes,
fails and cancels them, fails partitions, adds, loses and revives workers, and restarts the
scheduler (replaying its log). After every step: no device holds more than 1.0, every device's
allocations are exactly the placed jobs on it, whole jobs sit on contiguous devices, no job is
placed twice or lost, nothing is left pending, the capacity indexes agree with the workers, and
a restart rebuilds the same allocation. A lost worker's revoked attempts keep their share
(`<job>.<attempt>`) until their partitions are reported released, which frees each exactly once,
whatever the order of the releases, repeats and late outcomes of revoked attempts. When every
job has ended and every partition is released, capacity is whole again.
"""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cumulus_core.amounts import TENTHS_PER_GPU
from shared import events as ev
from tests.scheduler.harness import Driver

AMOUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Driver()
        self.workers = 0
        self.submitted: set[str] = set()

    # -- rules -------------------------------------------------------------------------------

    @rule(devices=st.integers(min_value=1, max_value=4))
    def add_worker(self, devices: int) -> None:
        if self.workers < 4:
            self.workers += 1
            self.d.add_worker(f"w{self.workers}", devices)

    @rule(tenths=st.sampled_from(AMOUNTS), priority=st.integers(0, 2))
    def submit(self, tenths: int, priority: int) -> None:
        job_id, _ = self.d.submit(tenths, priority)
        self.submitted.add(job_id)

    def _placed(self, data: st.DataObject, started: bool | None = None) -> str | None:
        jobs = sorted(
            j.job_id
            for j in self.d.state.jobs.values()
            if j.status == "placed" and (started is None or j.started == started)
        )
        return data.draw(st.sampled_from(jobs)) if jobs else None

    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        if job := self._placed(data, started=False):
            self.d.start(job)

    @rule(data=st.data(), how=st.sampled_from(["completed", "failed", "timed_out"]))
    def end(self, data: st.DataObject, how: str) -> None:
        if not (job_id := self._placed(data)):
            return
        job = self.d.job(job_id)
        common = {"job_id": job_id, "worker_id": job.worker_id}
        if how == "completed":
            self.d.complete(job_id)
        elif how == "failed":
            self.d.feed(ev.JobFailed(code="INTERNAL", message="boom", **common))
        else:
            self.d.feed(ev.JobTimedOut(message="late", **common))

    @rule(data=st.data())
    def partition_fails(self, data: st.DataObject) -> None:
        if job_id := self._placed(data, started=False):
            job = self.d.job(job_id)
            self.d.feed(
                ev.PartitionFailed(
                    job_id=job_id,
                    worker_id=job.worker_id,
                    attempt=job.attempt,
                    code="INTERNAL",
                    message="x",
                )
            )

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        active = sorted(j.job_id for j in self.d.state.jobs.values() if j.status != "done")
        if not active:
            return
        job_id = data.draw(st.sampled_from(active))
        out = self.d.feed(ev.CancelRequested(job_id=job_id))
        for event in out:
            if isinstance(event, ev.CancelOrdered):  # the worker's runner obeys
                self.d.feed(ev.JobCancelled(job_id=job_id, worker_id=event.worker_id))

    def _held_back(self) -> list[tuple[str, str, int]]:
        """(worker, job, attempt) of every revoked attempt's share still allocated."""
        found = set()
        for worker in self.d.state.workers.values():
            for device in worker.devices:
                for key in device.allocated:
                    if "." in key:
                        job_id, _, attempt = key.rpartition(".")
                        found.add((worker.worker_id, job_id, int(attempt)))
        return sorted(found)

    @rule(data=st.data(), again=st.booleans())
    def release_revoked(self, data: st.DataObject, again: bool) -> None:
        """A lost worker's partitioner, back, releases a revoked attempt (maybe twice)."""
        if held := self._held_back():
            worker, job_id, attempt = data.draw(st.sampled_from(held))
            release = ev.PartitionReleased(
                job_id=job_id, worker_id=worker, attempt=attempt, partition_ids=[]
            )
            for _ in range(2 if again else 1):
                self.d.feed(release)

    @rule(data=st.data())
    def stale_outcome(self, data: st.DataObject) -> None:
        """A revoked attempt's runner reports it started or ended: believed by nobody."""
        if held := self._held_back():
            worker, job_id, attempt = data.draw(st.sampled_from(held))
            if self.d.job(job_id).attempt == attempt:
                return  # not placed again yet: its end would be the job's own
            self.d.feed(
                ev.JobStarted(
                    job_id=job_id, worker_id=worker, backend="process", handle="1", attempt=attempt
                )
            )
            self.d.feed(
                ev.JobCompleted(
                    job_id=job_id, worker_id=worker, attempt=attempt, result=msgspec.Raw(b"{}")
                )
            )

    @rule(data=st.data())
    def lose_worker(self, data: st.DataObject) -> None:
        alive = sorted(w for w, s in self.d.state.workers.items() if s.alive)
        if alive:
            worker = data.draw(st.sampled_from(alive))
            self.d.feed(ev.WorkerLost(worker_id=worker, reason="test"))

    @rule(data=st.data())
    def revive_worker(self, data: st.DataObject) -> None:
        dead = sorted(w for w, s in self.d.state.workers.items() if not s.alive)
        if dead:
            worker = data.draw(st.sampled_from(dead))
            self.d.feed(ev.WorkerHeartbeat(worker_id=worker))

    @rule()
    def restart(self) -> None:
        before = self.d.state.allocation()
        self.d.restart()
        assert self.d.state.allocation() == before

    @precondition(lambda self: self.submitted)
    @rule()
    def drain(self) -> None:
        """End every job (starting what gets placed) and release every revoked attempt's
        partition, until nothing is active."""
        for _ in range(500):
            for worker_id, job_id, attempt in self._held_back():
                self.d.feed(
                    ev.PartitionReleased(
                        job_id=job_id, worker_id=worker_id, attempt=attempt, partition_ids=[]
                    )
                )
            placed = sorted(self.d.placed())
            if not placed:
                break
            for job_id in placed:
                if self.d.job(job_id).status == "placed":
                    self.d.complete(job_id)
        for job in list(self.d.state.jobs.values()):
            if job.status == "queued":
                self.d.feed(ev.CancelRequested(job_id=job.job_id))
        assert all(j.status == "done" for j in self.d.state.jobs.values())
        assert self._held_back() == []
        assert len(self.d.state.queue) == 0
        for worker in self.d.state.workers.values():
            assert all(d.free == TENTHS_PER_GPU for d in worker.devices)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def capacity_is_exact(self) -> None:
        state = self.d.state
        holders: dict[str, list[tuple[str, int]]] = {}
        for worker in state.workers.values():
            for device in worker.devices:
                assert 0 <= device.used <= TENTHS_PER_GPU, (worker.worker_id, device)
                for key, tenths in device.allocated.items():
                    if "." in key:  # a revoked attempt's share, held until released
                        job_id, _, attempt = key.rpartition(".")
                        assert 0 < int(attempt) <= state.jobs[job_id].revoked
                        continue
                    job_id = key
                    job = state.jobs[job_id]
                    assert job.status == "placed", (job_id, job.status)
                    assert job.worker_id == worker.worker_id
                    assert tenths == job.tenths
                    holders.setdefault(job_id, []).append((worker.worker_id, device.index))
        for job in state.jobs.values():
            if job.status == "placed":
                assert sorted(i for _, i in holders.get(job.job_id, [])) == sorted(job.devices)
                assert job.devices == list(range(job.devices[0], job.devices[0] + len(job.devices)))
                expected = job.spec.gpu_tenths // TENTHS_PER_GPU if job.spec.gpu_tenths >= 10 else 1
                assert len(job.devices) == expected
            else:
                assert job.job_id not in holders

    @invariant()
    def no_job_lost_or_left_pending(self) -> None:
        state = self.d.state
        assert set(state.jobs) == self.submitted
        for job in state.jobs.values():
            assert job.status in ("queued", "placed", "done"), (job.job_id, job.status)
            assert (job.job_id in state.queue) == (job.status == "queued")

    @invariant()
    def indexes_agree_with_workers(self) -> None:
        state = self.d.state
        indexed = {
            slot: free for free, bucket in enumerate(state.capacity.by_free) for slot in bucket
        }
        expected = {
            (w.worker_id, d.index): d.free
            for w in state.workers.values()
            if w.alive
            for d in w.devices
        }
        assert indexed == expected


SchedulerMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase


class ReservingSchedulerMachine(SchedulerMachine):
    """The same histories with the head's reservation taken at once."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Driver(reserve_after_s=0)


ReservingSchedulerMachine.TestCase.settings = SchedulerMachine.TestCase.settings
TestReservingScheduler = ReservingSchedulerMachine.TestCase
