"""The scheduler's decisions: pure functions from (state, event) to the events it emits.

The runtime applies each emitted event and asks again (`decide` on the emitted event), so
draining the queue is one placement at a time against up-to-date capacity.

Queue discipline: higher priority first, FIFO within a priority. Smaller jobs may be backfilled
past a head that does not fit; once the head has waited `reserve_after_s`, it gets a reservation
(placement.reservation) and only jobs that fit elsewhere are backfilled, so a large job is
overtaken for a bounded time at most, never forever. Time is the triggering event's timestamp,
so decisions stay pure functions of (state, event).

A user's share limit (config policy.max_share) is a fence, not a priority: a job whose user's
placed jobs would then hold more than the limit is passed over (it keeps its place, with a
reason naming the limit) and placed once the user's other jobs end; it never holds the queue's
head or a reservation meanwhile, so other users' jobs are not held up by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import singledispatch
from typing import Any

from cumulus_core.amounts import format_amount, valid_tenths
from services.scheduler import placement
from services.scheduler.state import JobState, SchedulerState
from shared import events as ev
from shared.errors import (
    InvalidGpuAmount,
    ResourceExhausted,
    Unavailable,
    no_workers,
    resources_exhausted,
)
from shared.gpu import GpuRequest
from shared.tracing import child_trace

BACKFILL = ("reserve", "none", "greedy")


@dataclass(frozen=True)
class Policy:
    """How the scheduler decides; every field has the production default."""

    max_attempts: int = 3
    """Placements tried when partitions fail (the seed: 3)."""
    queue_limit: int = 10_000
    placement: str = "best"
    """best | first | worst, for shares (bench/placement.py compares them)."""
    backfill: str = "reserve"
    """reserve: backfill, around the head's reservation once it has waited reserve_after_s;
    none: strict FIFO; greedy: anything that fits (a large head can starve)."""
    reserve_after_s: float = 10.0
    max_share: int = 0
    """Tenths of GPUs one user's placed jobs may hold at once (policy.max_share); 0: no limit."""
    user_max_share: Mapping[str, int] = field(default_factory=dict)
    """Users whose own limit differs (policy.users.<user>.max_share)."""

    def share_limit(self, user: str) -> int:
        """`user`'s max_share in tenths; 0: no limit."""
        return self.user_max_share.get(user, self.max_share)


DEFAULT = Policy()


def over_share(state: SchedulerState, job: JobState, policy: Policy) -> bool:
    """Placing `job` now would take its user past its share limit."""
    limit = policy.share_limit(job.user)
    return bool(limit) and state.held_by(job.user) + job.spec.gpu_tenths > limit


def share_reason(state: SchedulerState, job: JobState, policy: Policy) -> str:
    limit = policy.share_limit(job.user)
    return (
        f"waiting for {job.user}'s other jobs to end: they hold "
        f"{format_amount(state.held_by(job.user))} of the {format_amount(limit)} GPU "
        f"policy.max_share allows {job.user}, and this job needs "
        f"{format_amount(job.spec.gpu_tenths)}"
    )


def share_error(job: JobState, policy: Policy) -> ResourceExhausted | None:
    """A job larger than its user's share limit can never be placed (the gateway refuses it
    too; this is for events from elsewhere)."""
    limit = policy.share_limit(job.user)
    if not limit or job.spec.gpu_tenths <= limit:
        return None
    asked = format_amount(job.spec.gpu_tenths)
    return ResourceExhausted(
        f"Job asks for {asked} GPU but user {job.user}'s running jobs may hold at most "
        f"{format_amount(limit)} GPU (policy.max_share); ask for at most that",
        requested=asked,
        permanent=True,
    )


def queue_full(limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"Job queue is full ({limit} jobs waiting); retry later")


def admission_error(state: SchedulerState, tenths: int, policy: Policy) -> Exception | None:
    """Why a request must be refused at once, or None if it can be accepted."""
    if not valid_tenths(tenths):
        # The gateway refuses these; a `submitted` written on the bus by another hand is not
        # placed (a share of -5 tenths made a device more than whole, and its index raised).
        return InvalidGpuAmount(tenths / 10)
    if not state.has_live_workers():
        return no_workers()
    if not placement.fits_ever(state, tenths):
        return resources_exhausted(str(GpuRequest(tenths)), placement.largest_pool_request(state))
    if len(state.queue) >= policy.queue_limit:
        return queue_full(policy.queue_limit)
    return None


@singledispatch
def decide(event: Any, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
    return []


@decide.register
def _(event: ev.JobSubmitted, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status != "pending" or job.attempt:
        return []
    error = admission_error(state, job.spec.gpu_tenths, policy) or share_error(job, policy)
    if error is not None:
        return [ev.failure_of(error, event)]  # type: ignore[arg-type]
    return _place_or_queue(state, job, policy, event.ts)


@decide.register
def _(event: ev.PartitionFailed, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status != "pending" or job.attempt != event.attempt:
        return []
    if job.cancel_requested:
        return [_cancelled(job)]
    if job.attempt - job.retried >= policy.max_attempts:
        # The partitioner's message is the seed's already ("Chronos partition creation failed:
        # …" or the SSH one): wrapping it again printed the prefix twice.
        return [
            ev.JobFailed(
                job_id=job.job_id,
                user=job.user,
                worker_id=event.worker_id,
                code=event.code,
                message=f"{event.message} (after {job.attempt} attempts)",
                attempt=job.attempt,
                trace=job.trace,
            )
        ]
    return _place_or_queue(
        state, job, policy, event.ts, reason="partition failed on " + event.worker_id
    )


@decide.register
def _(
    event: ev.PlacementRevoked, state: SchedulerState, policy: Policy = DEFAULT
) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status != "pending" or event.retry_at:
        return []  # a retry is placed once its backoff is over (`retry_due`)
    # A job started, or whose partition was ready, is failed by the `lost` that revoked it,
    # unless it is a warm map that may run again (rerun_when_lost).
    if (job.started or job.partitioned) and not rerun_when_lost(job, policy):
        return []
    if job.cancel_requested:
        return [_cancelled(job)]
    return _place_or_queue(state, job, policy, event.ts, reason=event.reason)


def rerun_when_lost(job: JobState, policy: Policy) -> bool:
    """Whether `job`, started (or its partition ready) on a worker now lost, is placed again
    rather than failed. Only a warm map may run twice: its work queue answers each input
    once (an input its lost process never acknowledged is redelivered, and answers are
    de-duplicated), so a second attempt elsewhere loses nothing and repeats nothing. The
    attempt it loses still counts against `max_attempts`."""
    return job.spec.map is not None and job.attempt - job.retried < policy.max_attempts


@decide.register
def _(
    event: ev.JobAttemptFailed, state: SchedulerState, policy: Policy = DEFAULT
) -> list[ev.Event]:
    job = state.jobs.get(event.job_id)
    if job is None or job.status != "placed" or job.failure is None:
        return []  # not the current attempt's (SchedulerState kept it only if it was)
    return after_failure(job, event.ts)


def after_failure(job: JobState, now: float) -> list[ev.Event]:
    """What follows a failure of the job's code in its current attempt (`job.failure`): while
    it has retries left and nobody asked to cancel it, the attempt is given up (`revoked`: its
    worker releases the partition) and the job placed again once `retry_backoff` is over
    (`retry_due`); else the job ends with the attempt's error, once (docs/lifecycle.md)."""
    failure = job.failure
    assert failure is not None
    if job.cancel_requested or job.retried >= job.spec.retries:
        after = f" (after {job.retried + 1} attempts)" if job.retried else ""
        return [
            ev.JobFailed(
                job_id=job.job_id,
                user=job.user,
                worker_id=failure.worker_id,
                attempt=failure.attempt,
                code=failure.code,
                message=failure.message + after,
                traceback=failure.traceback,
                error_type=failure.error_type,
                exit_status=failure.exit_status,
                log_lines=failure.log_lines,
                outputs=failure.outputs,
                trace=job.trace,
            )
        ]
    wait = ev.retry_backoff(job.retried)
    return [
        ev.PlacementRevoked(
            job_id=job.job_id,
            user=job.user,
            worker_id=job.worker_id,
            attempt=job.attempt,
            reason=f"attempt {job.attempt} failed ({failure.message}); retry "
            f"{job.retried + 1} of {job.spec.retries} in {wait:g} s",
            retry_at=now + wait,
            trace=child_trace(job.trace),
        )
    ]


def retry_due(state: SchedulerState, policy: Policy = DEFAULT, now: float = 0.0) -> list[ev.Event]:
    """The first retry whose backoff is over at `now`: its job placed again, or queued (the
    scheduler's timer asks again after each, until none is due)."""
    for job in state.jobs.values():
        if job.status == "pending" and 0 < job.retry_at <= now:
            if job.cancel_requested:
                return [_cancelled(job)]
            reason = f"retry {job.retried} of {job.spec.retries}"
            return _place_or_queue(state, job, policy, now, reason=reason)
    return []


@decide.register
def _(event: ev.WorkerLost, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
    out: list[ev.Event] = []
    for job in state.jobs_on(event.worker_id):
        out.append(
            ev.PlacementRevoked(
                job_id=job.job_id,
                user=job.user,
                worker_id=event.worker_id,
                attempt=job.attempt,
                reason=f"worker {event.worker_id} lost: {event.reason}",
                trace=child_trace(job.trace),
            )
        )
        if (job.started or job.partitioned) and not rerun_when_lost(job, policy):
            # Its runner may be running it, unseen (a paused worker): placing it again could run
            # it twice at once. A job whose partition was not even ready is placed again.
            while_ = "running the job" if job.started else "starting the job"
            error = Unavailable(
                f"Worker {event.worker_id} was lost while {while_} ({event.reason})",
                worker_id=event.worker_id,
            )
            out.append(
                ev.failure_of(error, _as_event(job), worker_id=event.worker_id, attempt=job.attempt)
            )
    return out


def _as_event(job: JobState) -> ev.JobEvent:
    return ev.JobEvent(job_id=job.job_id, user=job.user, trace=child_trace(job.trace))


@decide.register
def _(event: ev.CancelRequested, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
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


@decide.register
def _(
    event: ev.WorkerNodeObserved, state: SchedulerState, policy: Policy = DEFAULT
) -> list[ev.Event]:
    worker = state.workers.get(event.worker_id)
    if worker is not None and worker.alive and event.state in ("down", "disconnected"):
        return [
            ev.WorkerLost(
                worker_id=worker.worker_id,
                ts=event.ts,
                reason=f"Swarm node {event.node_id} is {event.state}",
            )
        ]
    return schedule(state, policy, event.ts)


@decide.register
def _(
    event: ev.PartitionReleased, state: SchedulerState, policy: Policy = DEFAULT
) -> list[ev.Event]:
    # A revoked attempt's share was held until now (SchedulerState); any other release frees
    # nothing the scheduler still counted.
    job = state.jobs.get(event.job_id)
    if job is None or event.attempt > job.revoked:
        return []
    return schedule(state, policy, event.ts)


def _reschedule(event: Any, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
    """Capacity was freed, added, or the queue's head changed: place what now fits."""
    return schedule(state, policy, event.ts)


for _type in (
    ev.WorkerRegistered,
    ev.WorkerSelected,
    ev.JobCompleted,
    ev.JobFailed,
    ev.JobTimedOut,
    ev.JobCancelled,
):
    decide.register(_type)(_reschedule)


@decide.register
def _(event: ev.WorkerHeartbeat, state: SchedulerState, policy: Policy = DEFAULT) -> list[ev.Event]:
    # A heartbeat only matters here when it brought a lost worker back.
    worker = state.workers.get(event.worker_id)
    if worker is not None and worker.revived_at == event.ts and len(state.queue):
        return schedule(state, policy, event.ts)
    return []


def _reservation(
    state: SchedulerState, head: JobState, policy: Policy, now: float
) -> placement.Reservation:
    """What backfill must leave alone for the head, by the backfill policy and its wait."""
    if policy.backfill == "reserve" and now - head.queued_at >= policy.reserve_after_s:
        return placement.reservation(state, head.spec.gpu_tenths)
    return placement.NO_RESERVATION


def _eligible(state: SchedulerState, policy: Policy) -> list[JobState]:
    """The queue's candidates, best first, less those their user's share limit holds back."""
    jobs = (state.jobs[job_id] for job_id in state.queue.candidates())
    return [job for job in jobs if not over_share(state, job, policy)]


def _head(state: SchedulerState, policy: Policy) -> JobState | None:
    """The queue's head: its first job that its user's share limit lets be placed."""
    if not policy.max_share and not policy.user_max_share:
        head_id = state.queue.head()
        return state.jobs[head_id] if head_id is not None else None
    return next(iter(_eligible(state, policy)), None)


def schedule(state: SchedulerState, policy: Policy = DEFAULT, now: float = 0.0) -> list[ev.Event]:
    """One placement from the queue, if any fits (the runtime asks again after it)."""
    head = _head(state, policy)
    if head is None:
        return []
    spot = _place(state, head, policy)
    if spot is not None:
        return [_selected(head, spot)]
    if policy.backfill == "none":
        return []
    reserved = _reservation(state, head, policy, now)
    for job_id in state.queue.candidates():
        job = state.jobs[job_id]
        if job is head or over_share(state, job, policy):
            continue
        spot = _place(state, job, policy, reserved)
        if spot is not None:
            return [_selected(job, spot)]
    return []


def _place(
    state: SchedulerState,
    job: JobState,
    policy: Policy,
    reserved: placement.Reservation = placement.NO_RESERVATION,
) -> placement.Placement | None:
    """Place `job`, away from workers it already failed on if that is possible."""
    tenths = job.spec.gpu_tenths
    if job.tried:
        spot = placement.place(state, tenths, job.tried, reserved, policy.placement)
        if spot is not None:
            return spot
    return placement.place(state, tenths, (), reserved, policy.placement)


def _place_or_queue(
    state: SchedulerState, job: JobState, policy: Policy, now: float, reason: str = ""
) -> list[ev.Event]:
    if over_share(state, job, policy):
        return [_queued(state, job, now, reason, policy)]
    head = _head(state, policy)
    first = head is None or (-job.spec.priority, job.order) < (-head.spec.priority, head.order)
    spot = None
    if first:
        spot = _place(state, job, policy)
    elif policy.backfill != "none":
        assert head is not None
        reserved = _reservation(state, head, policy, now)
        spot = _place(state, job, policy, reserved)
    if spot is not None:
        return [_selected(job, spot)]
    return [_queued(state, job, now, reason, policy)]


def _cancelled(job: JobState) -> ev.JobCancelled:
    return ev.JobCancelled(
        job_id=job.job_id,
        user=job.user,
        attempt=job.attempt,
        trace=child_trace(job.trace),
        message="cancelled by user",
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


def waiting_reason(state: SchedulerState, job: JobState, policy: Policy = DEFAULT) -> str:
    """Why `job` waits, in words a user can act on."""
    if over_share(state, job, policy):
        return share_reason(state, job, policy)
    largest = placement.largest_free_now(state)
    free = str(GpuRequest(largest)) if largest else "0"
    ahead = state.queue.ahead_of(job.spec.priority, job.order)
    text = f"waiting for {GpuRequest(job.spec.gpu_tenths)} GPU; largest free now is {free}"
    if ahead:
        text += f"; {ahead} job(s) ahead"
    return text


def _queued(
    state: SchedulerState, job: JobState, now: float, reason: str = "", policy: Policy = DEFAULT
) -> ev.JobQueued:
    why = waiting_reason(state, job, policy)
    return ev.JobQueued(
        ts=now,
        job_id=job.job_id,
        user=job.user,
        position=state.queue.ahead_of(job.spec.priority, job.order) + 1,
        reason=f"{reason}; {why}" if reason else why,
        trace=child_trace(job.trace),
    )


def promotion(
    state: SchedulerState, policy: Policy = DEFAULT, now: float = 0.0, holder: str = ""
) -> list[ev.Event]:
    """What a scheduler that has just taken over (or got its lease back) decides on what it
    followed without deciding: the decisions the scheduler before it may not have taken.

    In order: the jobs of a worker declared lost that are still placed there are revoked
    (and failed where they may run), as on the `lost` itself; a live worker whose Swarm node
    is down is declared lost; a placed job whose user asked to cancel is ordered cancelled
    (a repeat does no harm); every job still pending (submitted, or its attempt failed or was
    revoked) is decided as then, except that one that would be placed is queued: `schedule`
    places from the queue afterwards, against up-to-date capacity (the caller asks for it).
    Each result is applied by the caller before the next is read, so call it once per batch:
    it looks at state as it is now and returns only what is missing.
    """
    out: list[ev.Event] = []
    for worker in state.workers.values():
        if worker.declared_lost and not worker.alive and state.jobs_on(worker.worker_id):
            lost = ev.WorkerLost(worker_id=worker.worker_id, ts=now, reason=worker.lost_reason)
            out += decide(lost, state, policy)
        elif worker.alive and worker.node_state in ("down", "disconnected"):
            reason = f"Swarm node {worker.node_id} is {worker.node_state}"
            out.append(ev.WorkerLost(worker_id=worker.worker_id, ts=now, reason=reason))
    # Each job is visited once below, so only the revocations above can have decided it
    # already (a set: a lapse in a burst leaves thousands pending).
    revoked = {getattr(e, "job_id", "") for e in out}
    for job in state.jobs.values():
        if job.status == "placed" and job.failure is not None and job.job_id not in revoked:
            out += after_failure(job, now)
        elif job.status == "pending" and job.retry_at:
            continue  # placed again when its backoff is over (`retry_due`)
        elif job.status == "placed" and job.cancel_requested:
            out.append(
                ev.CancelOrdered(
                    job_id=job.job_id,
                    user=job.user,
                    worker_id=job.worker_id,
                    reason="cancelled by user",
                    trace=child_trace(job.trace),
                )
            )
        elif job.status == "pending" and job.job_id not in revoked:
            out.append(_pending(state, job, policy, now, holder))
    return out


def _pending(
    state: SchedulerState, job: JobState, policy: Policy, now: float, holder: str
) -> ev.Event:
    """The decision a pending job is owed, where a placement is queued instead."""
    if job.cancel_requested:
        return _cancelled(job)
    if not job.attempt:
        error = share_error(job, policy)
        fits = placement.fits_ever(state, job.spec.gpu_tenths)
        if error is None and state.has_live_workers() and not fits:
            error = resources_exhausted(
                str(GpuRequest(job.spec.gpu_tenths)), placement.largest_pool_request(state)
            )
        if error is not None:
            return ev.failure_of(error, _as_event(job))
    elif job.revoked != job.attempt and job.attempt - job.retried >= policy.max_attempts:
        return ev.JobFailed(
            job_id=job.job_id,
            user=job.user,
            worker_id=job.tried[-1] if job.tried else "",
            code=job.failed_code or "INTERNAL",
            message=f"{job.failed_message or 'partition failed'} (after {job.attempt} attempts)",
            attempt=job.attempt,
            trace=job.trace,
        )
    reason = f"scheduler {holder} took over" if holder else "a new scheduler took over"
    return _queued(state, job, now, reason, policy)
