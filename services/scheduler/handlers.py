"""The scheduler's decisions: pure functions from (state, event) to the events it emits.

The runtime applies each emitted event and asks again (`decide` on the emitted event), so
draining the queue is one placement at a time against up-to-date capacity.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

from services.scheduler import placement
from services.scheduler.state import JobState, SchedulerState
from shared import events as ev
from shared.errors import no_workers, partition_failed, resources_exhausted
from shared.gpu import GpuRequest
from shared.telemetry import child_trace


@singledispatch
def decide(event: Any, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    return []


@decide.register
def _(event: ev.JobSubmitted, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status != "pending" or job.attempt:
        return []
    if not state.live_workers():
        return [ev.failure_of(no_workers(), event)]
    if not placement.fits_ever(state, job.spec.gpu_tenths):
        err = resources_exhausted(
            str(GpuRequest(job.spec.gpu_tenths)), placement.largest_pool_request(state)
        )
        return [ev.failure_of(err, event)]
    return _place_or_queue(state, job)


@decide.register
def _(event: ev.PartitionFailed, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status != "pending" or job.attempt != event.attempt:
        return []
    if job.cancel_requested:
        return [_cancelled(job)]
    if job.attempt >= max_attempts:
        message = (
            event.message if event.code != "INTERNAL" else partition_failed(event.message).message
        )
        failed = ev.JobFailed(
            job_id=job.job_id,
            user=job.user,
            worker_id=event.worker_id,
            code=event.code,
            message=f"{message} (after {job.attempt} attempts)",
            trace=job.trace,
        )
        return [failed]
    spot = placement.place(state, job.spec.gpu_tenths, exclude=job.tried)
    if spot is None:
        spot = placement.place(state, job.spec.gpu_tenths)
    if spot is None:
        return [_queued(state, job, "waiting for capacity after a partition failure")]
    return [_selected(job, spot)]


@decide.register
def _(event: ev.PartitionReleased, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is not None and job.status == "pending" and job.attempt and not job.cancel_requested:
        return _place_or_queue(state, job)
    return _drain(state)


@decide.register
def _(event: ev.WorkerRegistered, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    return _drain(state)


@decide.register
def _(event: ev.WorkerSelected, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    return _drain(state)


@decide.register
def _(event: ev.CancelRequested, state: SchedulerState, max_attempts: int = 3) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status == "done":
        return []
    if job.status in ("queued", "pending"):
        return [_cancelled(job)]
    return [
        ev.CancelOrdered(
            job_id=job.job_id,
            user=job.user,
            worker_id=job.worker_id,
            reason=event.reason,
            trace=child_trace(job.trace),
        )
    ]


def _cancelled(job: JobState) -> ev.JobCancelled:
    return ev.JobCancelled(
        job_id=job.job_id, user=job.user, trace=child_trace(job.trace), message="cancelled by user"
    )


def _selected(job: JobState, spot: placement.Placement) -> ev.WorkerSelected:
    return ev.WorkerSelected(
        job_id=job.job_id,
        user=job.user,
        worker_id=spot.worker_id,
        spec=job.spec,
        devices=spot.devices,
        tenths=spot.tenths,
        attempt=job.attempt + 1,
        trace=child_trace(job.trace),
    )


def _queued(state: SchedulerState, job: JobState, reason: str) -> ev.JobQueued:
    return ev.JobQueued(
        job_id=job.job_id,
        user=job.user,
        position=len(state.queue) + 1,
        reason=reason,
        trace=child_trace(job.trace),
    )


def _place_or_queue(state: SchedulerState, job: JobState) -> list[ev.Event]:
    # FIFO: a job does not overtake the queue.
    if not state.queue:
        spot = placement.place(state, job.spec.gpu_tenths)
        if spot is not None:
            return [_selected(job, spot)]
    largest = placement.largest_free_now(state)
    reason = (
        f"waiting for {GpuRequest(job.spec.gpu_tenths)} GPU; largest free now is "
        f"{GpuRequest(largest) if largest else 0}"
    )
    if state.queue:
        reason += f"; {len(state.queue)} job(s) ahead"
    return [_queued(state, job, reason)]


def _drain(state: SchedulerState) -> list[ev.Event]:
    """Place the head of the queue if it fits now (one at a time; the runtime asks again)."""
    for job_id in state.queue[:1]:
        job = state.jobs[job_id]
        spot = placement.place(state, job.spec.gpu_tenths)
        if spot is not None:
            return [_selected(job, spot)]
    return []
