"""A user's share limit (config policy.max_share), through the scheduler's real apply/decide chain.

A job whose user's placed jobs would then hold more than the limit waits, with a reason that
names the limit, and is placed when the user's other jobs end; it never holds up other users'
jobs meanwhile, and the limit survives a restart (it is config, the holdings are replayed).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from services.scheduler.app import Scheduler
from services.scheduler.handlers import Policy
from services.scheduler.queue import JobQueue
from shared import config as config_mod
from shared import events as ev
from tests.scheduler.harness import Driver, spec

_ids = itertools.count()


def driver(tmp_path: Path, policy: dict[str, object], **scheduler: object) -> Driver:
    """A Driver whose config has this `policy` section (and scheduler keys)."""
    path = tmp_path / "cumulus.yaml"
    path.write_text(yaml.safe_dump({"policy": policy, "scheduler": scheduler}))
    d = Driver()
    d.config = config_mod.load(path, environ={})
    d.scheduler = Scheduler(d.config)
    return d


def submit(d: Driver, user: str, tenths: int, priority: int = 0) -> tuple[str, list[ev.Event]]:
    job_id = f"{user}{next(_ids)}"
    return job_id, d.feed(ev.JobSubmitted(job_id=job_id, user=user, spec=spec(tenths, priority)))


def names(events: list[ev.Event]) -> list[tuple[str, str]]:
    return [(e.name, getattr(e, "job_id", "")) for e in events]


def test_the_scheduler_reads_the_limits_from_the_config(tmp_path: Path) -> None:
    d = driver(tmp_path, {"max_share": 2, "users": {"bob": {"max_share": 0.5}}})
    policy = d.scheduler.policy
    assert (policy.max_share, dict(policy.user_max_share)) == (20, {"bob": 5})
    assert policy.share_limit("alice") == 20
    assert policy.share_limit("bob") == 5


def test_a_job_past_the_users_share_waits_naming_the_limit_then_runs(tmp_path: Path) -> None:
    d = driver(tmp_path, {"users": {"alice": {"max_share": 1}}})
    d.add_worker("w1", 4)
    a1, out = submit(d, "alice", 5)
    a2, out2 = submit(d, "alice", 5)
    assert [e.name for e in out + out2] == ["scheduled", "scheduled"]
    assert d.state.held_by("alice") == 10
    a3, out = submit(d, "alice", 5)
    assert [e.name for e in out] == ["queued"]
    queued = out[0]
    assert isinstance(queued, ev.JobQueued)
    assert "policy.max_share" in queued.reason
    assert queued.reason.startswith("waiting for alice's other jobs to end: they hold 1 of")
    # Capacity is plentiful: only the limit holds it back.
    assert d.job(a3).status == "queued"
    out = d.complete(a1)
    assert names(out) == [("scheduled", a3)]
    assert d.state.held_by("alice") == 10
    assert d.job(a2).status == "placed"


def test_other_users_are_not_held_up_by_a_user_at_their_limit(tmp_path: Path) -> None:
    d = driver(tmp_path, {"users": {"alice": {"max_share": 0.5}}}, backfill="none")
    d.add_worker("w1", 1)
    submit(d, "alice", 5)
    blocked, out = submit(d, "alice", 3, priority=5)
    assert [e.name for e in out] == ["queued"]
    # Strict FIFO and alice's job heads the queue by priority, yet bob's job is placed: a
    # job its user's limit holds back is not the head.
    bob, out = submit(d, "bob", 3)
    assert names(out) == [("scheduled", bob)]
    assert d.job(blocked).status == "queued"


def test_a_blocked_job_does_not_hide_the_same_class_jobs_of_other_users(tmp_path: Path) -> None:
    d = driver(tmp_path, {"users": {"alice": {"max_share": 0.5}}})
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    first, _ = submit(d, "alice", 5)
    carol_big, _ = submit(d, "carol", 10)  # w2 is taken whole
    submit(d, "bob", 5)  # fills w1 beside alice's
    waiting_alice, _ = submit(d, "alice", 5)
    waiting_bob, _ = submit(d, "bob", 5)
    assert d.job(waiting_alice).status == d.job(waiting_bob).status == "queued"
    # Room for one 0.5 job: alice's is first in line but over her limit; bob's is placed.
    out = d.complete(carol_big)
    assert ("scheduled", waiting_bob) in names(out)
    assert d.job(waiting_alice).status == "queued"
    out = d.complete(first)
    assert ("scheduled", waiting_alice) in names(out)


def test_the_everyone_limit_applies_to_users_without_their_own(tmp_path: Path) -> None:
    d = driver(tmp_path, {"max_share": 1, "users": {"ops": {"max_share": 0}}})
    d.add_worker("w1", 4)
    submit(d, "dave", 10)
    _, out = submit(d, "dave", 1)
    assert [e.name for e in out] == ["queued"]
    for _ in range(3):  # 0 for ops: no limit
        _, out = submit(d, "ops", 10)
        assert [e.name for e in out] == ["scheduled"]


def test_a_job_larger_than_the_users_share_fails_at_once(tmp_path: Path) -> None:
    d = driver(tmp_path, {"users": {"alice": {"max_share": 1.5}}})
    d.add_worker("w1", 4)
    _, out = submit(d, "alice", 20)
    assert len(out) == 1
    failed = out[0]
    assert isinstance(failed, ev.JobFailed)
    assert failed.code == "RESOURCE_EXHAUSTED"
    assert "policy.max_share" in failed.message
    assert "at most 1.5 GPU" in failed.message


def test_a_failed_partition_or_a_lost_worker_gives_the_share_back(tmp_path: Path) -> None:
    d = driver(tmp_path, {"users": {"alice": {"max_share": 0.5}}})
    d.add_worker("w1", 2)
    a1, _ = submit(d, "alice", 5)
    a2, _ = submit(d, "alice", 5)
    assert d.job(a2).status == "queued"
    job = d.job(a1)
    # The first job's partition fails: its share is given back and it is tried again, ahead
    # of the second (it was submitted first), so the second still waits.
    out = d.feed(
        ev.PartitionFailed(
            job_id=a1,
            user="alice",
            worker_id=job.worker_id,
            attempt=job.attempt,
            code="INTERNAL",
            message="boom",
        )
    )
    assert ("scheduled", a1) in names(out)  # retried: still within the limit by itself
    assert d.job(a2).status == "queued"
    d.feed(ev.WorkerLost(worker_id="w1", reason="gone"))
    assert d.state.held_by("alice") == 0


def test_holdings_are_rebuilt_by_replay(tmp_path: Path) -> None:
    d = driver(tmp_path, {"users": {"alice": {"max_share": 1}}})
    d.add_worker("w1", 4)
    submit(d, "alice", 5)
    submit(d, "alice", 5)
    blocked, _ = submit(d, "alice", 1)
    before = d.state.held_by("alice")
    d.restart()
    assert d.state.held_by("alice") == before == 10
    assert d.job(blocked).status == "queued"


def test_the_live_waiting_reason_names_the_limit(tmp_path: Path) -> None:
    from services.scheduler.handlers import waiting_reason

    d = driver(tmp_path, {"users": {"alice": {"max_share": 0.5}}})
    d.add_worker("w1", 1)
    submit(d, "alice", 5)
    blocked, _ = submit(d, "alice", 5)
    reason = waiting_reason(d.state, d.job(blocked), d.scheduler.policy)
    assert "policy.max_share" in reason
    assert "0.5 of the 0.5 GPU" in reason


def test_without_limits_nothing_changes(tmp_path: Path) -> None:
    d = driver(tmp_path, {})
    assert d.scheduler.policy == Policy(
        max_attempts=3, queue_limit=10_000, placement="best", backfill="reserve"
    )
    d.add_worker("w1", 1)
    for _ in range(10):
        submit(d, "alice", 1)
    assert len(d.placed()) == 10


@pytest.mark.parametrize("users", [1, 50])
def test_empty_queue_classes_are_dropped(users: int) -> None:
    q = JobQueue()
    for i in range(users):
        q.push(f"j{i}", 0, 5, i, user=f"u{i}")
    for i in range(users):
        q.remove(f"j{i}")
    assert list(q.candidates()) == []
    assert q._classes == {}
