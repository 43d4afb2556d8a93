"""The partitioner's reconcile looks at live placements only, and decides as if it looked at all.

A worker keeps every placement it ended for hours (a fence against late decisions); a reconcile
runs after every batch, so it must not cost every placement kept (bench/profile.py).
"""

from __future__ import annotations

import random

import msgspec

from services.partitioner import handlers
from services.partitioner.snapshot import encode, restore
from services.partitioner.state import PartitionerState
from shared import events as ev

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)


def brute_force(state: PartitionerState, busy: set[str]) -> tuple[list[str], list[str]]:
    """`handlers.work` as it was: every placement held, looked at each time."""
    taken, releases, creates = set(busy), [], []
    for job in [*state.older.values(), *state.jobs.values()]:
        if job.job_id not in taken and job.needs_release:
            releases.append(job.job_id)
            taken.add(job.job_id)
    for job in state.jobs.values():
        if job.job_id not in taken and job.needs_partition:
            creates.append(job.job_id)
            taken.add(job.job_id)
    return releases, creates


def random_event(rng: random.Random, jobs: list[str]) -> ev.Event:
    job_id = rng.choice(jobs)
    attempt = rng.randint(1, 3)
    kind = rng.randrange(7)
    if kind == 0:
        return ev.WorkerSelected(
            job_id=job_id, worker_id="w1", spec=SPEC, devices=[0], tenths=5, attempt=attempt
        )
    if kind == 1:
        return ev.PartitionReady(
            job_id=job_id,
            worker_id="w1",
            spec=SPEC,
            attempt=attempt,
            partition_ids=[f"p-{job_id}-{attempt}"],
            devices=[0],
            env={},
            expires_at=0.0,
        )
    if kind == 2:
        return ev.PartitionFailed(
            job_id=job_id, worker_id="w1", attempt=attempt, code="INTERNAL", message="x"
        )
    if kind == 3:
        return ev.PartitionReleased(
            job_id=job_id, worker_id="w1", attempt=attempt, partition_ids=[]
        )
    if kind == 4:
        return ev.PlacementRevoked(job_id=job_id, worker_id="w1", attempt=attempt, reason="x")
    if kind == 5:
        return ev.JobCompleted(
            job_id=job_id, worker_id="w1", attempt=attempt, result=msgspec.Raw(b"1")
        )
    return ev.JobCancelled(job_id=job_id, worker_id="w1", attempt=attempt)


def test_work_over_live_placements_decides_as_over_all_of_them() -> None:
    rng = random.Random(13)
    for _ in range(30):
        state = PartitionerState("w1")
        jobs = [f"j{i}" for i in range(8)]
        for step in range(120):
            state.apply(random_event(rng, jobs))
            busy = set(rng.sample(jobs, rng.randint(0, 2)))
            work = handlers.work(state, busy)
            got = ([j.job_id for j in work.releases], [j.job_id for j in work.creates])
            assert got == brute_force(state, busy), f"step {step}"
            if step % 40 == 39:  # a snapshot restored decides the same too
                again = {"w1": PartitionerState("w1")}
                restore(again, encode({"w1": state}, {}))
                assert handlers.work(again["w1"], busy).creates == work.creates


def test_a_reconcile_looks_only_at_live_placements() -> None:
    state = PartitionerState("w1")
    for i in range(2000):
        job_id = f"done{i}"
        state.apply(
            ev.WorkerSelected(job_id=job_id, worker_id="w1", spec=SPEC, devices=[0], tenths=5)
        )
        state.apply(ev.JobCompleted(job_id=job_id, worker_id="w1", result=msgspec.Raw(b"1")))
        state.apply(ev.PartitionReleased(job_id=job_id, worker_id="w1", partition_ids=[]))
    state.apply(ev.WorkerSelected(job_id="new", worker_id="w1", spec=SPEC, devices=[0], tenths=5))
    assert [j.job_id for j in handlers.work(state, set()).creates] == ["new"]
    assert len(state.jobs) == 2001  # kept, as fences
    assert list(state.open) == ["new"]  # looked at
