"""The runner's snapshot: its worker's jobs at a log position, so replay starts there.

The runtime (shared/service.py) takes one every `retention.snapshot_events` logged events,
right after `compact`, and drops the log rows before it. The state is stored whole (the jobs
with their log cursors, the attempts being discarded, the cancels that came before their job).

A job over here (`done`) is forgotten `retention.forget_after_s` after a compaction first finds
it so (the jobs keep no end time): whatever its backend still holds for it is a leftover the
next start removes (handlers.leftovers). Forgotten, it stays as a fence for FENCE_KEEP_S more:
its ids, attempt and status only, enough for every handler to take a late copy of one of its
events (a partition re-published after JetStream's duplicate window) as the repeat it is, so
that it never starts again. Then it goes. A cancel that came before its job (and whose job
never came) goes after FENCE_KEEP_S too.
"""

from __future__ import annotations

import msgspec

from services.runner.state import RunJob, RunnerState
from shared import events as ev
from shared.errors import EventLogError

FENCE_KEEP_S = 86400.0
"""How long a forgotten job is kept as a fence, and an early cancel for its job to come
(longer if retention.forget_after_s is)."""
NO_SPEC = ev.JobSpec(code_ref="")
"""What a forgotten job keeps of its spec: nothing (one instance for all of them)."""
_EARLY = "cancel:"
"""Prefix of a waiting cancel's key in `ended` (job ids hold no colon nor dot)."""


class RunnerSnapshot(
    msgspec.Struct, kw_only=True, tag_field="type", tag="cumulus.runner.snapshot.v1"
):
    """`RunnerState`, field for field. The tag is the format's version: a later v1 may add
    fields (with defaults), which this one ignores; a change a v1 reader would misread is a v2."""

    worker_id: str = ""
    jobs: list[RunJob] = []
    cancelled_early: dict[str, str] = {}
    discarding: list[RunJob] = []
    ended: dict[str, float] = {}
    """`<job id>.<attempt>` (or `cancel:<job id>`) -> when a compaction first found that
    attempt over (or the cancel waiting)."""
    epoch: int = 0
    """The largest scheduler epoch seen (the fence)."""


_decoder = msgspec.json.Decoder(RunnerSnapshot)


def encode(state: RunnerState, ended: dict[str, float]) -> bytes:
    return msgspec.json.encode(
        RunnerSnapshot(
            worker_id=state.worker_id,
            jobs=list(state.jobs.values()),
            cancelled_early=state.cancelled_early,
            discarding=list(state.discarding.values()),
            ended=ended,
            epoch=state.epoch,
        )
    )


def decode(data: bytes, worker_id: str) -> tuple[RunnerState, dict[str, float]]:
    """The state a snapshot holds and its `ended` notes; EventLogError if it is not one this
    runner reads, or another worker's."""
    try:
        snap = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventLogError(
            f"The runner's snapshot cannot be read ({exc}): it was written by another "
            "version of Cumulus or is damaged; run the version that wrote it"
        ) from None
    if snap.worker_id != worker_id:
        raise EventLogError(
            f"The runner's snapshot is worker {snap.worker_id!r}'s, not {worker_id!r}'s: "
            "give each worker its own data directory"
        )
    state = RunnerState(worker_id)
    state.jobs = {j.job_id: j for j in snap.jobs}
    for job in state.jobs.values():
        if job.spec == NO_SPEC:
            job.spec = NO_SPEC
    state.cancelled_early = dict(snap.cancelled_early)
    state.discarding = {j.job_id: j for j in snap.discarding}
    state.epoch = snap.epoch
    return state, dict(snap.ended)


def compact(
    state: RunnerState, ended: dict[str, float], now: float, forget_after_s: float
) -> list[str]:
    """Forget the jobs over for `forget_after_s` (by `ended`, which this keeps) and drop them
    FENCE_KEEP_S later, and the early cancels waiting that long; the job ids forgotten now."""
    keep = max(FENCE_KEEP_S, forget_after_s)
    before = dict(ended)
    ended.clear()
    forgotten, dropped = [], set()
    for job in [j for j in state.jobs.values() if j.status == "done"]:
        key = f"{job.job_id}.{job.attempt}"
        since = before.get(key, now)
        if now - since >= forget_after_s + keep:
            dropped.add(job.job_id)
            continue
        ended[key] = since
        if now - since >= forget_after_s and job.spec is not NO_SPEC:
            _forget(job)
            forgotten.append(job.job_id)
    if dropped:  # a new dict: one emptied by `del` keeps its size
        state.jobs = {k: job for k, job in state.jobs.items() if k not in dropped}
    for job_id in list(state.cancelled_early):
        key = _EARLY + job_id
        since = before.get(key, now)
        if now - since >= keep:
            del state.cancelled_early[job_id]
        else:
            ended[key] = since
    return forgotten


def _forget(job: RunJob) -> None:
    """Keep of a job over only what fences it (ids, attempt, status, flags)."""
    job.spec = NO_SPEC
    job.env = {}
    job.partition_ids = []
    job.offsets = {}
    job.trace = ""
    job.cancel_reason = ""
