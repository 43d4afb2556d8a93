"""Epoch fencing (scheduler high availability), as pure `step`s on each service's state.

The rule every consumer keeps, in stream order: the largest scheduler epoch seen (election
markers, decisions only a scheduler publishes) is kept; a decision stamped with a smaller one
is a superseded scheduler's and changes nothing. Unstamped events (epoch 0) are believed as
before. A worker cannot move the epoch (its own ends carry the field too).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from nats.js import JetStreamContext

from services.gateway import snapshot as gateway_snapshot
from services.gateway.state import JobTable
from services.partitioner import handlers as partitioner_handlers
from services.partitioner import snapshot as partitioner_snapshot
from services.partitioner.app import Partitioner
from services.runner import handlers as runner_handlers
from services.runner import snapshot as runner_snapshot
from services.runner import state as st
from services.runner.app import Runner
from services.scheduler import snapshot as scheduler_snapshot
from services.scheduler.app import Scheduler
from services.scheduler.handlers import promotion
from services.scheduler.lease import Lease, LeaseValue, Watch, next_epoch
from services.scheduler.state import Leading, SchedulerState
from services.scheduler.state import decode as scheduler_decode
from shared import bus, subjects, trust
from shared import config as config_mod
from shared import events as ev
from shared.views import JobStatus

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)


def marker(epoch: int, holder: str = "b") -> ev.SchedulerElected:
    return ev.SchedulerElected(epoch=epoch, holder=holder)


def selected(attempt: int = 1, epoch: int = 0, devices: list[int] | None = None) -> Any:
    return ev.WorkerSelected(
        job_id="j1",
        worker_id="w1",
        spec=SPEC,
        devices=devices or [0],
        tenths=5,
        attempt=attempt,
        epoch=epoch,
    )


def revoked(attempt: int = 1, epoch: int = 0) -> ev.PlacementRevoked:
    return ev.PlacementRevoked(
        job_id="j1", worker_id="w1", attempt=attempt, reason="lost", epoch=epoch
    )


def worker_config(tmp_path: Path) -> config_mod.Config:
    return config_mod.load(
        environ={
            "CUMULUS_DATA_DIR": str(tmp_path),
            "CUMULUS_WORKER_ID": "w1",
            "CUMULUS_WORKER_DEVICES": "2x16GiB",
            "CUMULUS_WORKER_DEVICE_SOURCE": "virtual",
        }
    )


# -- the rule --------------------------------------------------------------------------------


def test_the_rule_fences_only_stamped_decisions_older_than_the_epoch_seen() -> None:
    assert ev.stale(selected(epoch=1), 2)
    assert not ev.stale(selected(epoch=2), 2)
    assert not ev.stale(selected(epoch=0), 2)  # unstamped: from before epochs
    assert not ev.stale(marker(1), 2)  # a marker is news, never a decision
    ended = ev.JobCompleted(job_id="j1", worker_id="w1", result=msgspec.Raw(b"1"), epoch=1)
    assert ev.stale(ended, 2)
    assert ev.epoch_after(1, marker(3)) == 3
    assert ev.epoch_after(3, marker(2)) == 3
    assert ev.epoch_after(1, selected(epoch=4)) == 4
    # A worker's own end cannot move anybody's fence (it could fence the scheduler off).
    forged = ev.JobFailed(job_id="j1", worker_id="w1", code="X", message="x", epoch=99)
    assert ev.epoch_after(1, forged) == 1
    queued = ev.stamped(ev.JobQueued(job_id="j1", position=1, reason="r"), 5)
    assert isinstance(queued, ev.JobQueued)
    assert queued.epoch == 5
    started = ev.JobStarted(job_id="j1", backend="p", handle="h")
    assert ev.stamped(started, 5) is started  # a worker's event: never stamped


def test_the_marker_is_believed_on_its_own_subject_only() -> None:
    assert trust.disagreement(subjects.ELECTED, marker(2)) == ""
    assert "marker" in trust.disagreement("jobs.u.j1.w1.scheduled", marker(2))
    assert trust.disagreement(subjects.ELECTED, selected()) != ""
    elected = marker(2)
    assert ev.decode(ev.encode(elected)) == elected


def test_a_workers_consumer_may_read_the_marker() -> None:
    req = bus.ConsumerRequest(
        stream=subjects.JOBS_STREAM,
        durable="partitioner-w1",
        filters=[*subjects.job_events("scheduled", worker_id="w1"), subjects.ELECTED],
    )
    assert bus.consumer_refusal("w1", req) == ""
    req.filters = ["jobs._._._.>"]
    assert bus.consumer_refusal("w1", req) != ""


# -- the partitioner -------------------------------------------------------------------------


def test_the_partitioner_creates_nothing_for_a_stale_placement(tmp_path: Path) -> None:
    p = Partitioner(worker_config(tmp_path))
    p.step(marker(1))
    p.step(selected(attempt=1, epoch=1))
    p.step(marker(2))
    p.step(selected(attempt=2, epoch=1, devices=[1]))  # the superseded scheduler's
    p.step(revoked(attempt=1, epoch=1))
    work = partitioner_handlers.work(p.state["w1"], ())
    assert [(j.job_id, j.attempt) for j in work.creates] == [("j1", 1)]
    assert work.releases == []
    assert p.fence() == 2
    p.step(revoked(attempt=1, epoch=2))  # the new leader's own word counts
    assert p.state["w1"].jobs["j1"].revoked


def test_the_partitioners_fence_survives_a_snapshot(tmp_path: Path) -> None:
    p = Partitioner(worker_config(tmp_path))
    p.step(marker(3))
    data = partitioner_snapshot.encode(p.state, {})
    again = Partitioner(worker_config(tmp_path))
    again.restore(data)
    assert again.fence() == 3
    again.step(selected(epoch=2))
    assert again.state["w1"].jobs == {}


# -- the runner ------------------------------------------------------------------------------


def ready(attempt: int = 1) -> ev.PartitionReady:
    return ev.PartitionReady(
        job_id="j1",
        worker_id="w1",
        spec=SPEC,
        attempt=attempt,
        partition_ids=["p1"],
        devices=[0],
        env={},
        expires_at=time.time() + 600,
    )


def test_the_runner_ignores_a_stale_revocation_and_cancel(tmp_path: Path) -> None:
    r = Runner(worker_config(tmp_path), backend=cast(Any, object()))
    r.step(marker(2))
    r.step(ready())
    r.step(revoked(attempt=1, epoch=1))
    r.step(ev.CancelOrdered(job_id="j1", worker_id="w1", epoch=1))
    job = r.state.jobs["j1"]
    assert not job.revoked
    assert not job.cancel
    assert [j.job_id for j in runner_handlers.work(r.state, ()).start] == ["j1"]
    r.step(revoked(attempt=1, epoch=2))
    assert r.state.jobs["j1"].revoked


def test_the_runners_fence_survives_a_snapshot() -> None:
    state = st.RunnerState("w1")
    state.apply(marker(4))
    again, _ = runner_snapshot.decode(runner_snapshot.encode(state, {}), "w1")
    assert again.epoch == 4


# -- the gateway -----------------------------------------------------------------------------


def test_the_gateway_does_not_show_a_stale_decision() -> None:
    table = JobTable()
    table.apply(ev.JobSubmitted(job_id="j1", spec=SPEC))
    table.apply(marker(1))
    table.apply(selected(epoch=1))
    table.apply(marker(2))
    table.apply(ev.JobQueued(job_id="j1", position=1, reason="stale", epoch=1))
    table.apply(ev.JobFailed(job_id="j1", code="UNAVAILABLE", message="stale", epoch=1))
    job = table.get("j1")
    assert job is not None
    assert job.status is JobStatus.SCHEDULED
    table.apply(ev.JobFailed(job_id="j1", code="UNAVAILABLE", message="now", epoch=2))
    assert table.jobs["j1"].status is JobStatus.FAILED
    again = gateway_snapshot.decode(gateway_snapshot.encode(table))
    assert again.epoch == 2


# -- the scheduler ---------------------------------------------------------------------------


def scheduler(tmp_path: Path, role: str) -> Scheduler:
    """A scheduler without a bus as a follower (a lease it does not hold) or the leader of
    epoch 2 (a lease held, valid for a while)."""
    config = config_mod.load(environ={"CUMULUS_DATA_DIR": str(tmp_path), "CUMULUS_INSTANCE": "a"})
    s = Scheduler(config)
    s.lease = Lease(cast(JetStreamContext, None), "a", 6.0, 1)
    if role == "leader":
        s.lease.epoch, s.lease.valid_until = 2, time.monotonic() + 600
        s.step(marker(2, "a"))
        s.apply(Leading(epoch=2, holder="a"))
        s.leading = 2
    return s


def registered() -> ev.WorkerRegistered:
    return ev.WorkerRegistered(
        worker_id="w1",
        hostname="h",
        devices=[ev.DeviceInfo(index=i, name="GPU", memory_bytes=16 << 30) for i in range(2)],
    )


def test_a_follower_applies_the_leaders_decisions_and_decides_nothing(tmp_path: Path) -> None:
    s = scheduler(tmp_path, "follower")
    assert s.step(registered()) == []
    assert s.step(ev.JobSubmitted(job_id="j1", spec=SPEC)) == []
    assert s.step(marker(1, "other")) == []
    assert s.step(selected(epoch=1)) == []
    assert s.state.jobs["j1"].status == "placed"
    assert s.state.workers["w1"].devices[0].allocated == {"j1": 5}
    s.step(marker(2, "b"))
    assert s.step(selected(attempt=2, epoch=1, devices=[1])) == []  # stale: nothing moves
    assert s.state.jobs["j1"].attempt == 1
    assert s.state.workers["w1"].devices[1].allocated == {}
    assert s.fence() == 2


def test_a_placement_read_before_its_workers_registration_still_holds_capacity(
    tmp_path: Path,
) -> None:
    s = scheduler(tmp_path, "follower")
    s.step(ev.JobSubmitted(job_id="j1", spec=SPEC))
    s.step(selected(epoch=1))
    s.step(registered())  # two streams: the WORKERS consumer came second
    assert s.state.workers["w1"].devices[0].allocated == {"j1": 5}


def test_the_leader_stamps_its_decisions_and_skips_them_coming_back(tmp_path: Path) -> None:
    s = scheduler(tmp_path, "leader")
    s.step(registered())
    out = s.step(ev.JobSubmitted(job_id="j1", spec=SPEC))
    placed = [e for e in out if isinstance(e, ev.WorkerSelected)]
    assert [e.epoch for e in placed] == [2]
    assert s.skip(placed[0])  # its own: applied when taken
    assert not s.skip(selected(epoch=1))
    # A decision of a later epoch than ours: we are superseded and stop deciding at once.
    s.step(ev.JobQueued(job_id="j2", position=1, reason="x", epoch=3))
    assert not s.deciding
    assert "epoch 3" in s.exit_message
    assert s.step(ev.JobSubmitted(job_id="j3", spec=SPEC)) == []


def test_a_later_marker_supersedes_the_leader(tmp_path: Path) -> None:
    s = scheduler(tmp_path, "leader")
    s.step(marker(3, "b"))
    assert not s.deciding
    assert "scheduler b holds the lease at epoch 3" in s.exit_message


def test_a_lapsed_lease_decides_nothing(tmp_path: Path) -> None:
    s = scheduler(tmp_path, "leader")
    assert s.lease is not None
    s.lease.valid_until = time.monotonic() - 1
    s.step(registered())
    assert s.step(ev.JobSubmitted(job_id="j1", spec=SPEC)) == []
    assert s.role() == "lapsed"


def test_the_schedulers_fence_and_leadership_survive_a_snapshot(tmp_path: Path) -> None:
    s = scheduler(tmp_path, "leader")
    state, _ = scheduler_snapshot.decode(scheduler_snapshot.encode(s.state, {}))
    assert (state.epoch, state.led) == (2, [2])
    assert isinstance(scheduler_decode(msgspec.json.encode(Leading(epoch=2, holder="a"))), Leading)


# -- promotion: what a new leader owes -------------------------------------------------------


def test_a_new_leader_decides_what_its_predecessor_left_undecided() -> None:
    state = SchedulerState()
    state.apply(registered())
    for job_id in ("new", "revoked", "failing", "cancelled"):
        state.apply(ev.JobSubmitted(job_id=job_id, spec=SPEC))
    for job_id, device in (("revoked", 0), ("failing", 1), ("cancelled", 1)):
        state.apply(
            ev.WorkerSelected(
                job_id=job_id, worker_id="w1", spec=SPEC, devices=[device], tenths=5, attempt=3
            )
        )
    state.apply(ev.PlacementRevoked(job_id="revoked", worker_id="w1", attempt=3, reason="lost"))
    state.apply(
        ev.PartitionFailed(
            job_id="failing", worker_id="w1", attempt=3, code="INTERNAL", message="m"
        )
    )
    state.apply(ev.CancelRequested(job_id="cancelled"))
    out = promotion(state, now=1.0, holder="b")
    by_job = {e.job_id: e for e in out if isinstance(e, ev.JobEvent)}
    assert isinstance(by_job["new"], ev.JobQueued)
    assert "scheduler b took over" in by_job["new"].reason
    assert isinstance(by_job["revoked"], ev.JobQueued)
    assert isinstance(by_job["failing"], ev.JobFailed)
    assert by_job["failing"].message == "m (after 3 attempts)"
    assert isinstance(by_job["cancelled"], ev.CancelOrdered)


def test_a_new_leader_revokes_what_a_lost_worker_still_holds() -> None:
    state = SchedulerState()
    state.apply(registered())
    state.apply(ev.JobSubmitted(job_id="j1", spec=SPEC))
    state.apply(selected())
    state.apply(ev.WorkerLost(worker_id="w1", reason="no heartbeat"))  # its revokes never came
    out = promotion(state, now=1.0)
    assert [type(e) for e in out] == [ev.PlacementRevoked]
    assert promotion(SchedulerState()) == []


# -- the lease's pure parts ------------------------------------------------------------------


def test_a_standby_takes_over_only_once_the_revision_stood_still_for_the_ttl() -> None:
    watch = Watch(ttl_s=6.0)
    assert not watch.due(5, now=100.0)
    assert not watch.due(5, now=105.9)
    assert not watch.due(6, now=106.0)  # renewed: the wait starts again
    assert not watch.due(6, now=111.9)
    assert watch.due(6, now=112.0)
    assert next_epoch(LeaseValue(holder="a", epoch=4), known=2) == 5
    assert next_epoch(None, known=7) == 8  # a bucket made afresh never reuses an epoch


@pytest.mark.parametrize("instance", ["", "b"])
def test_a_replica_has_its_own_consumers_and_log(tmp_path: Path, instance: str) -> None:
    config = config_mod.load(
        environ={"CUMULUS_DATA_DIR": str(tmp_path), "CUMULUS_INSTANCE": instance}
    )
    s = Scheduler(config)
    names = [s.consumer_name(spec) for spec in s.consumers()]
    suffix = f"-{instance}" if instance else ""
    assert names == [f"scheduler-workers{suffix}", f"scheduler-jobs{suffix}"]
    assert s.db_path.name == f"scheduler{suffix}.sqlite"
    if instance:
        assert s.holder == instance
    else:  # made once, kept in the data directory
        assert s.holder == Scheduler(config).holder
    with pytest.raises(Exception, match="instance"):
        config_mod.load(environ={"CUMULUS_INSTANCE": "a.b"})
