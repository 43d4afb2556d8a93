"""Issue 11, finding 4: the partitioner acts only on a job's newest attempt, whatever the order.

Events go through the service's own `step` (what its consumer runs per event), and what the
partitioner would then do is read from `handlers.work`, as `Effects.reconcile` does. The orders
are those a paused partitioner meets when it resumes: a revocation before its placement, an
old attempt's partitions reported ready after the next attempt was placed, an old attempt's
end after the next attempt's placement.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from services.partitioner import handlers
from services.partitioner.app import Partitioner
from services.partitioner.state import PartitionerState
from services.partitioner.types import Partition
from shared import config as config_mod
from shared import events as ev

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)


@pytest.fixture
def partitioner(tmp_path: Path) -> Partitioner:
    config = config_mod.load(
        environ={
            "CUMULUS_DATA_DIR": str(tmp_path),
            "CUMULUS_WORKER_ID": "w1",
            "CUMULUS_WORKER_DEVICES": "2x16GiB",
            "CUMULUS_WORKER_DEVICE_SOURCE": "virtual",
        }
    )
    return Partitioner(config)


def state(p: Partitioner) -> PartitionerState:
    return p.state["w1"]


def selected(attempt: int, job_id: str = "j1") -> ev.WorkerSelected:
    return ev.WorkerSelected(
        job_id=job_id, worker_id="w1", spec=SPEC, devices=[0], tenths=5, attempt=attempt
    )


def revoked(attempt: int, job_id: str = "j1") -> ev.PlacementRevoked:
    return ev.PlacementRevoked(job_id=job_id, worker_id="w1", attempt=attempt, reason="lost")


def ready(attempt: int, job_id: str = "j1") -> ev.PartitionReady:
    return ev.PartitionReady(
        job_id=job_id,
        worker_id="w1",
        spec=SPEC,
        attempt=attempt,
        partition_ids=[f"p{attempt}"],
        devices=[0],
        env={},
        expires_at=0.0,
    )


def completed(attempt: int, job_id: str = "j1") -> ev.JobCompleted:
    return ev.JobCompleted(
        job_id=job_id, worker_id="w1", attempt=attempt, result=msgspec.Raw(b'{"ok":true}')
    )


def todo(p: Partitioner) -> tuple[list[str], list[str]]:
    """(releases, creates) reconciling would start now, as labels."""
    work = handlers.work(state(p), busy=())
    return [j.label for j in work.releases], [j.label for j in work.creates]


def release(p: Partitioner, label: str) -> None:
    """The release of `label` runs to its end: its PartitionReleased is applied."""
    job_id, _, attempt = label.rpartition(".")
    job = state(p).find(job_id, int(attempt))
    assert job is not None
    p.step(handlers.released(job, "w1", job.partition_ids))


def test_a_revocation_before_its_placement_is_never_created_and_is_reported_released(
    partitioner: Partitioner,
) -> None:
    partitioner.step(revoked(1))
    partitioner.step(selected(1))
    assert todo(partitioner) == (["j1.1"], [])  # nothing to create; a release to report
    job = state(partitioner).find("j1", 1)
    assert job is not None
    assert not handlers.holds(state(partitioner), job)
    report = handlers.released(job, "w1", [])
    assert (report.attempt, report.partition_ids) == (1, [])
    partitioner.step(report)
    assert todo(partitioner) == ([], [])
    partitioner.step(selected(1))  # a repeat changes nothing
    assert todo(partitioner) == ([], [])


def test_the_next_attempt_waits_for_the_revoked_ones_release(partitioner: Partitioner) -> None:
    # Resumed with a backlog: attempt 1 was made, then revoked and placed again here.
    partitioner.step(selected(1))
    partitioner.step(ready(1))
    partitioner.step(revoked(1))
    partitioner.step(selected(2))
    assert todo(partitioner) == (["j1.1"], [])
    release(partitioner, "j1.1")
    assert todo(partitioner) == ([], ["j1.2"])
    assert state(partitioner).older == {}


def test_a_superseded_attempt_is_fenced_even_without_its_revocation(
    partitioner: Partitioner,
) -> None:
    partitioner.step(selected(1))
    partitioner.step(ready(1))
    partitioner.step(selected(2))
    old = state(partitioner).find("j1", 1)
    assert old is not None
    assert old.revoked
    assert not handlers.holds(state(partitioner), old)
    assert todo(partitioner) == (["j1.1"], [])


def test_an_old_attempts_late_ready_is_released_never_the_new_one(
    partitioner: Partitioner,
) -> None:
    # A create of attempt 1 under way while the partitioner was paused reports ready late.
    partitioner.step(selected(1))
    partitioner.step(revoked(1))
    partitioner.step(selected(2))
    partitioner.step(ready(1))
    old = state(partitioner).find("j1", 1)
    assert old is not None
    assert (old.status, old.partition_ids) == ("ready", ["p1"])
    new = state(partitioner).jobs["j1"]
    assert (new.attempt, new.status) == (2, "wanted")
    assert todo(partitioner) == (["j1.1"], [])
    release(partitioner, "j1.1")
    assert todo(partitioner) == ([], ["j1.2"])


def test_a_revocation_of_a_newer_attempt_fences_the_older_one(partitioner: Partitioner) -> None:
    partitioner.step(selected(1))
    partitioner.step(ready(1))
    partitioner.step(revoked(2))  # attempt 2's placement never reached this worker first
    partitioner.step(selected(2))
    releases, creates = todo(partitioner)
    assert (releases, creates) == (["j1.1"], [])
    release(partitioner, "j1.1")
    assert todo(partitioner) == (["j1.2"], [])  # reported released, never created
    release(partitioner, "j1.2")
    assert todo(partitioner) == ([], [])


def test_an_old_attempts_end_releases_only_the_old_attempt(partitioner: Partitioner) -> None:
    partitioner.step(selected(1))
    partitioner.step(ready(1))
    partitioner.step(revoked(1))
    partitioner.step(selected(2))
    release(partitioner, "j1.1")
    partitioner.step(ready(2))
    partitioner.step(completed(1))  # attempt 1's runner ended it just as it was revoked
    assert todo(partitioner) == ([], [])
    partitioner.step(completed(2))
    assert todo(partitioner) == (["j1.2"], [])


def test_an_older_attempt_awaiting_release_is_not_the_reapers(partitioner: Partitioner) -> None:
    partitioner.step(selected(1))
    partitioner.step(ready(1))
    partitioner.step(revoked(1))
    partitioner.step(selected(2))
    live = [_partition("p1", "j1.1"), _partition("p9", "j1.9")]
    assert [p.partition_id for p in handlers.orphans(state(partitioner), live, busy=())] == ["p9"]
    release(partitioner, "j1.1")
    assert [p.partition_id for p in handlers.orphans(state(partitioner), live, busy=())] == [
        "p1",
        "p9",
    ]


def _partition(pid: str, label: str) -> Partition:
    return Partition(
        partition_id=pid,
        device=0,
        tenths=5,
        memory_bytes=8 << 30,
        created_at=0.0,
        expires_at=3600.0,
        label=label,
    )
