"""The partitioner's decisions: pure functions of its state and what chronos_cli answered.

No I/O here: `effects.py` runs chronos_cli and emits what these functions return, so which
placements to create or release, which partitions a crashed run already made, which live
partitions are orphans and which event reports an outcome are unit-tested without NATS or a
worker.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from cumulus_core.env import merge_envs
from services.partitioner.chronos import ChronosUnreachable
from services.partitioner.state import PartitionerState, PartitionJob, parse_label
from services.partitioner.types import DeviceStats, Partition
from shared import events as ev
from shared.errors import CumulusError, partition_failed, ssh_failed
from shared.tracing import child_trace

PARTITION_GRACE_S = 60
"""A partition outlives its job's duration by this much, so the runner's deadline fires first."""


@dataclass(frozen=True)
class Work:
    """What reconciling one worker starts: releases first, then creates."""

    releases: list[PartitionJob] = field(default_factory=list)
    creates: list[PartitionJob] = field(default_factory=list)


def work(state: PartitionerState, busy: Collection[str]) -> Work:
    """The placements that need a release or a partition; jobs in `busy` are under way.

    One effect per job at a time: an older attempt's release goes before the newer attempt's
    create, so one job never holds two attempts' partitions here at once.
    """
    taken = set(busy)
    out = Work()
    live = state.live()  # the placements still wanted or ready, not every one kept
    for job in [*state.older.values(), *live]:
        if job.job_id not in taken and job.needs_release:
            out.releases.append(job)
            taken.add(job.job_id)
    for job in live:
        if job.job_id not in taken and job.needs_partition:
            out.creates.append(job)
            taken.add(job.job_id)
    return out


def holds(state: PartitionerState, job: PartitionJob) -> bool:
    """True while `job` is still the placement this worker should create partitions for:
    its job's newest attempt here, neither revoked nor ended."""
    return state.jobs.get(job.job_id) is job and not job.revoked and not job.terminal


def partition_duration(job: PartitionJob) -> int:
    return job.spec.duration_s + PARTITION_GRACE_S


def adoptable(job: PartitionJob, live: Iterable[Partition]) -> dict[int, Partition]:
    """This placement's partitions already made (by us, maybe before a crash), by device."""
    return {p.device: p for p in live if p.label == job.label}


def registered(
    worker_id: str,
    hostname: str,
    backend: str,
    labels: dict[str, str],
    devices: Iterable[DeviceStats],
) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(
        worker_id=worker_id,
        hostname=hostname,
        backend=backend,
        labels=dict(labels),
        devices=[
            ev.DeviceInfo(index=d.index, name=d.name, memory_bytes=d.memory_bytes, kind=d.kind)
            for d in devices
        ],
    )


def ready(job: PartitionJob, worker_id: str, made: list[Partition]) -> ev.PartitionReady:
    return ev.PartitionReady(
        job_id=job.job_id,
        user=job.user,
        worker_id=worker_id,
        spec=job.spec,
        attempt=job.attempt,
        partition_ids=[p.partition_id for p in made],
        devices=[p.device for p in made],
        env=merge_envs([p.env for p in made]),
        expires_at=min(p.expires_at for p in made),
        trace=child_trace(job.trace),
    )


def failed(job: PartitionJob, worker_id: str, error: CumulusError) -> ev.PartitionFailed:
    """The seed's outcome after the last attempt: an unreachable worker is UNAVAILABLE with
    its fixed message; anything else chronos_cli said is INTERNAL, quoting it."""
    err = (
        ssh_failed(worker_id)
        if isinstance(error, ChronosUnreachable)
        else partition_failed(error.message)
    )
    return ev.PartitionFailed(
        job_id=job.job_id,
        user=job.user,
        worker_id=worker_id,
        attempt=job.attempt,
        code=err.code,
        message=err.message,
        trace=child_trace(job.trace),
    )


def released(job: PartitionJob, worker_id: str, ids: Iterable[str]) -> ev.PartitionReleased:
    return ev.PartitionReleased(
        job_id=job.job_id,
        user=job.user,
        worker_id=worker_id,
        attempt=job.attempt,
        partition_ids=sorted(ids),
        trace=child_trace(job.trace),
    )


def orphans(
    state: PartitionerState, partitions: Iterable[Partition], busy: Collection[str]
) -> list[Partition]:
    """The live partitions no placement of this worker holds any more.

    A partition labelled `<job>.<attempt>` is an orphan when this worker does not hold that
    placement (it never had it, or forgot it) or has released it or failed it (a release that
    could not reach chronos_cli reports the placement released and leaves the partition to
    the reaper). A placement superseded by a newer attempt is still held until its own
    release. Jobs in `busy` (a create or release under way) are left alone, and so are
    partitions without such a label: they are not ours, and expiry ends them.
    """
    found = []
    for partition in partitions:
        parsed = parse_label(partition.label)
        if parsed is None or parsed[0] in busy:
            continue
        job = state.find(*parsed)
        if job is None or job.status in ("released", "failed"):
            found.append(partition)
    return found


def jobs_of(partitions: Iterable[Partition]) -> set[str]:
    """The job ids the labels of `partitions` name."""
    return {parsed[0] for p in partitions if (parsed := parse_label(p.label)) is not None}


def still_running(state: PartitionerState, partition: Partition) -> bool:
    """An expired partition whose job still runs here: worth a warning when reaped."""
    parsed = parse_label(partition.label)
    job = state.find(*parsed) if parsed else None
    return job is not None and job.status == "ready" and not job.terminal and not job.revoked
