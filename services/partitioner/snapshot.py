"""The partitioner's snapshot: each served worker's placements at a log position.

The runtime (shared/service.py) takes one every `retention.snapshot_events` logged events,
right after `compact`, and drops the log rows before it. A snapshot holds every served
worker's state whole; restoring writes each into the state its agent holds (`agent.state`),
so a worker served now but not then starts empty, and one served then but not now is left
out, as a replay of its events would leave it.

A placement this worker is done with (its partitions released, or never made: `released`,
`failed`) is forgotten `retention.forget_after_s` after a compaction first finds it so (the
placements keep no end time). Forgotten, it stays as a fence for FENCE_KEEP_S more: its ids,
attempt and status only, enough for every handler to take a late copy of one of its events
(a placement re-published after JetStream's duplicate window) as the repeat it is, so that
nothing is created for it again. Then it goes.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from services.partitioner.state import PartitionerState, PartitionJob
from shared import events as ev
from shared.errors import EventLogError

DONE = ("released", "failed")
"""Statuses of a placement with nothing left to do here: no partition held, none to make."""
FENCE_KEEP_S = 86400.0
"""How long a forgotten placement is kept as a fence (longer if retention.forget_after_s is)."""
NO_SPEC = ev.JobSpec(code_ref="")
"""What a forgotten placement keeps of its spec: nothing (one instance for all of them)."""


class WorkerPlacements(msgspec.Struct, kw_only=True):
    """One worker's `PartitionerState`, field for field."""

    worker_id: str
    jobs: list[PartitionJob] = []
    older: list[PartitionJob] = []
    ended: dict[str, float] = {}
    """Placement label -> when a compaction first found it done."""
    epoch: int = 0
    """The largest scheduler epoch seen (the fence)."""


class PartitionerSnapshot(
    msgspec.Struct, kw_only=True, tag_field="type", tag="cumulus.partitioner.snapshot.v1"
):
    """The tag is the format's version: a later v1 may add fields (with defaults), which this
    one ignores; a change a v1 reader would misread is a v2."""

    workers: list[WorkerPlacements] = []


_decoder = msgspec.json.Decoder(PartitionerSnapshot)

Ended = dict[str, dict[str, float]]
"""Worker id -> placement label (`<job>.<attempt>`) -> when a compaction first found it done."""


def encode(states: Mapping[str, PartitionerState], ended: Ended) -> bytes:
    return msgspec.json.encode(
        PartitionerSnapshot(
            workers=[
                WorkerPlacements(
                    worker_id=state.worker_id,
                    jobs=list(state.jobs.values()),
                    older=list(state.older.values()),
                    ended=ended.get(worker_id, {}),
                    epoch=state.epoch,
                )
                for worker_id, state in states.items()
            ]
        )
    )


def restore(states: Mapping[str, PartitionerState], data: bytes) -> Ended:
    """Set each state in `states` (by worker id) from the snapshot; returns its `ended`
    notes. EventLogError if it is not a snapshot this partitioner reads."""
    try:
        snap = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventLogError(
            f"The partitioner's snapshot cannot be read ({exc}): it was written by another "
            "version of Cumulus or is damaged; run the version that wrote it"
        ) from None
    stored = {w.worker_id: w for w in snap.workers}
    ended: Ended = {}
    for worker_id, state in states.items():
        saved = stored.get(worker_id, WorkerPlacements(worker_id=worker_id))
        state.jobs = {j.job_id: _shared_spec(j) for j in saved.jobs}
        state.reindex()
        state.older = {j.label: j for j in saved.older}
        state.epoch = saved.epoch
        if saved.ended:
            ended[worker_id] = dict(saved.ended)
    return ended


def _shared_spec(job: PartitionJob) -> PartitionJob:
    if job.spec == NO_SPEC:
        job.spec = NO_SPEC
    return job


def compact(
    states: Mapping[str, PartitionerState], ended: Ended, now: float, forget_after_s: float
) -> dict[str, list[str]]:
    """Forget the placements done for `forget_after_s` (by `ended`, which this keeps), and
    drop them FENCE_KEEP_S later; worker id -> the job ids forgotten now."""
    gone: dict[str, list[str]] = {}
    keep = forget_after_s + max(FENCE_KEEP_S, forget_after_s)
    for worker_id, state in states.items():
        before, notes = ended.pop(worker_id, {}), {}
        forgotten, dropped = [], set()
        for job in [j for j in state.jobs.values() if j.status in DONE]:
            since = before.get(job.label, now)
            if now - since >= keep:
                dropped.add(job.job_id)
                continue
            notes[job.label] = since
            if now - since >= forget_after_s and job.spec is not NO_SPEC:
                _forget(job)
                forgotten.append(job.job_id)
        if dropped:  # a new dict: one emptied by `del` keeps its size
            state.jobs = {k: job for k, job in state.jobs.items() if k not in dropped}
        if notes:
            ended[worker_id] = notes
        if forgotten:
            gone[worker_id] = forgotten
    return gone


def _forget(job: PartitionJob) -> None:
    """Keep of a placement done only what fences it (ids, attempt, status, flags)."""
    job.spec = NO_SPEC
    job.devices = []
    job.partition_ids = []
    job.trace = ""
