"""The scheduler's snapshot: its state at a log position, so replay starts there.

The runtime (shared/service.py) takes one every `retention.snapshot_events` logged events,
right after `compact`, and drops the log rows before it. What is stored is the primary data:
the workers (with what each device holds), the jobs and the submission counter. The indexes
are rebuilt from them on restore: the queue (the jobs QUEUED), the users' placed shares (the
jobs PLACED) and the capacity indexes, re-indexed in the order they last took each worker so
that a choice among equal places falls as it would have without the restart.

Jobs that are over leave memory after `retention.forget_after_s`. The scheduler's job events
carry no end time it keeps, so a compaction notes when it first finds a job over (`ended`,
kept in the snapshot) and a later one forgets it once that is `forget_after_s` old. A late
event for a forgotten job changes nothing here: every handler ignores a job it does not know,
except `submitted`, which the gateway publishes only for a job id the job stream does not
hold already (services/gateway/history.py).
"""

from __future__ import annotations

import msgspec

from services.scheduler.state import JobState, SchedulerState, WorkerState
from shared.errors import EventLogError


class SchedulerSnapshot(
    msgspec.Struct, kw_only=True, tag_field="type", tag="cumulus.scheduler.snapshot.v1"
):
    """The tag is the format's version: a later v1 may add fields (with defaults), which this
    one ignores; a change a v1 reader would misread is a v2."""

    workers: list[WorkerState] = []
    """In the state's order."""
    jobs: list[JobState] = []
    """In the state's order (submission order, less the forgotten)."""
    submitted: int = 0
    indexed: list[str] = []
    """Worker ids in the order the capacity indexes last took them."""
    ended: dict[str, float] = {}
    """Job id -> when a compaction first found it over."""
    epoch: int = 0
    """The largest scheduler epoch seen (the fence)."""
    led: list[int] = []
    """Epochs this log's scheduler led."""


_decoder = msgspec.json.Decoder(SchedulerSnapshot)


def encode(state: SchedulerState, ended: dict[str, float]) -> bytes:
    return msgspec.json.encode(
        SchedulerSnapshot(
            workers=list(state.workers.values()),
            jobs=list(state.jobs.values()),
            submitted=state.submitted,
            indexed=list(state.capacity.run_of),
            ended=ended,
            epoch=state.epoch,
            led=list(state.led),
        )
    )


def decode(data: bytes) -> tuple[SchedulerState, dict[str, float]]:
    """The state a snapshot holds and its `ended` notes; EventLogError if it is not one this
    scheduler reads."""
    try:
        snap = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventLogError(
            f"The scheduler's snapshot cannot be read ({exc}): it was written by another "
            "version of Cumulus or is damaged; run the version that wrote it"
        ) from None
    state = SchedulerState()
    state.workers = {w.worker_id: w for w in snap.workers}
    state.jobs = {j.job_id: j for j in snap.jobs}
    state.submitted = snap.submitted
    state.epoch = snap.epoch
    state.led = list(snap.led)
    for job in state.jobs.values():
        if job.status == "queued":
            state.queue.push(
                job.job_id, job.spec.priority, job.spec.gpu_tenths, job.order, job.user
            )
        elif job.status == "placed":
            state.placed.setdefault(job.user, {})[job.job_id] = job.tenths * len(job.devices)
    order = [w for w in snap.indexed if w in state.workers]
    order += [w for w in state.workers if w not in set(order)]
    for worker_id in order:
        state.capacity.index(state.workers[worker_id])
    return state, dict(snap.ended)


def compact(
    state: SchedulerState, ended: dict[str, float], now: float, forget_after_s: float
) -> list[str]:
    """Forget the jobs over for `forget_after_s` (by `ended`, which this keeps); their ids."""
    over = [job.job_id for job in state.jobs.values() if job.status == "done"]
    for job_id in over:
        ended.setdefault(job_id, now)
    gone = {job_id for job_id in over if now - ended[job_id] >= forget_after_s}
    if gone:  # new dicts: one emptied by `del` keeps its size
        state.jobs = {job_id: job for job_id, job in state.jobs.items() if job_id not in gone}
        kept = {job_id: at for job_id, at in ended.items() if job_id in state.jobs}
        ended.clear()
        ended.update(kept)
    return sorted(gone)
