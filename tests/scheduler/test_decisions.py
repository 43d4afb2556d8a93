"""The scheduler's decisions, driven through its real apply/decide chain without a bus."""

from __future__ import annotations

import pytest

from shared import events as ev
from tests.scheduler.harness import Driver


def kinds(events: list[ev.Event]) -> list[str]:
    return [e.name for e in events]


def test_shares_pack_onto_one_device_and_whole_devices_stay_free() -> None:
    d = Driver()
    d.add_worker("w1", 2)
    a, _ = d.submit(5)
    b, _ = d.submit(3)
    assert d.job(a).devices == d.job(b).devices  # best-fit: 0.3 joins the half-used device
    c, out = d.submit(10)
    assert kinds(out) == ["scheduled"]
    assert d.job(c).devices != d.job(a).devices


def test_point_one_plus_point_two_is_exactly_point_three() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    for tenths in (1, 2, 7):
        _, out = d.submit(tenths)
        assert kinds(out) == ["scheduled"]
    assert d.state.workers["w1"].devices[0].free == 0
    _, out = d.submit(1)
    assert kinds(out) == ["queued"]


def test_a_job_that_does_not_fit_waits_with_its_position_and_reason() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    a, _ = d.submit(5)
    d.submit(3)
    c, out = d.submit(5)
    assert kinds(out) == ["queued"]
    queued = out[0]
    assert isinstance(queued, ev.JobQueued)
    assert queued.position == 1
    assert queued.reason == "waiting for 0.5 GPU; largest free now is 0.2"
    out = d.complete(a)
    assert [(e.name, e.job_id) for e in out] == [("scheduled", c)]


def test_whole_gpus_take_contiguous_free_devices() -> None:
    d = Driver()
    d.add_worker("w1", 4)
    one, _ = d.submit(10)
    half, _ = d.submit(5)
    two, _ = d.submit(20)
    assert d.job(one).devices == [0]
    assert d.job(half).devices == [1]
    assert d.job(two).devices == [2, 3]


def test_whole_request_prefers_the_worker_it_fills_best() -> None:
    d = Driver()
    d.add_worker("big", 4)
    d.add_worker("small", 2)
    job, _ = d.submit(20)
    assert d.job(job).worker_id == "small"  # keeps the 4-GPU worker whole


def test_no_workers_is_unavailable_and_too_big_is_resource_exhausted() -> None:
    d = Driver()
    _, out = d.submit(5)
    assert isinstance(out[0], ev.JobFailed)
    assert (out[0].code, out[0].message) == (
        "UNAVAILABLE",
        "No GPU workers available in Swarm cluster",
    )
    d.add_worker("w1", 4)
    d.add_worker("w2", 2)
    _, out = d.submit(80)
    assert isinstance(out[0], ev.JobFailed)
    assert (out[0].code, out[0].message) == (
        "RESOURCE_EXHAUSTED",
        "No workers with sufficient GPU capacity (requested: 8, max available: 4)",
    )


@pytest.mark.parametrize("tenths", [-5, 0, 15, 90, 10**9])
def test_a_submitted_with_an_invalid_share_from_the_bus_is_refused_and_holds_nothing(
    tenths: int,
) -> None:
    d = Driver()
    d.add_worker("w1", 2)
    _, out = d.submit(tenths)
    assert isinstance(out[0], ev.JobFailed)
    assert out[0].code == "INVALID_ARGUMENT"
    assert "Invalid GPU amount" in out[0].message
    _, out = d.submit(10)  # the devices are as whole as before
    assert isinstance(out[0], ev.WorkerSelected)
    _, out = d.submit(10)
    assert isinstance(out[0], ev.WorkerSelected)


def test_queue_limit_is_resource_exhausted() -> None:
    d = Driver(queue_limit=2)
    d.add_worker("w1", 1)
    d.submit(10)
    d.submit(10)
    d.submit(10)
    _, out = d.submit(10)
    assert isinstance(out[0], ev.JobFailed)
    assert out[0].code == "RESOURCE_EXHAUSTED"
    assert out[0].message == "Job queue is full (2 jobs waiting); retry later"


def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    running, _ = d.submit(10)
    low1, _ = d.submit(10, priority=0)
    low2, _ = d.submit(10, priority=0)
    high, _ = d.submit(10, priority=5)
    order = []
    current = running
    for _ in range(3):
        out = d.complete(current)
        (placed,) = [e for e in out if isinstance(e, ev.WorkerSelected)]
        order.append(placed.job_id)
        current = placed.job_id
    assert order == [high, low1, low2]


@pytest.mark.parametrize("reserve_after_s", [0, 10])
def test_a_big_job_at_the_head_is_not_starved_by_small_ones(reserve_after_s: float) -> None:
    """Small jobs may overtake the head only until it has waited reserve_after_s."""
    d = Driver(reserve_after_s=reserve_after_s)
    d.add_worker("w1", 2)
    t0 = 1_000_000.0
    running = [d.submit(5, ts=t0)[0] for _ in range(4)]  # both devices full of halves
    big, out = d.submit(20, ts=t0)
    assert kinds(out) == ["queued"]
    overtook = []
    # Forever: every second one small job ends and another small one arrives.
    for second in range(1, 60):
        now = t0 + second
        done = running.pop(0)
        d.complete(done, ts=now)
        if d.job(big).status == "placed":
            break
        newcomer, _ = d.submit(5, ts=now)
        if d.job(newcomer).status == "placed":
            overtook.append(second)
            running.append(newcomer)
    assert d.job(big).status == "placed", "the big job starved"
    assert d.job(big).devices == [0, 1]
    assert all(s < reserve_after_s for s in overtook)
    assert len(overtook) == (0 if reserve_after_s == 0 else len(overtook))


def test_backfill_uses_capacity_the_head_does_not_need() -> None:
    d = Driver(reserve_after_s=0)
    d.add_worker("w1", 2)
    d.add_worker("w2", 1)
    hold, _ = d.submit(5)  # w1 device 0
    big, out = d.submit(20)
    assert kinds(out) == ["queued"]  # w1 has only device 1 entirely free
    small, out = d.submit(3)
    # w1 is reserved for the big job, so the small one is backfilled onto w2.
    assert kinds(out) == ["scheduled"]
    assert d.job(small).worker_id == "w2"
    extra, out = d.submit(5)
    assert kinds(out) == ["scheduled"]
    assert d.job(extra).worker_id == "w2"
    d.complete(hold)
    assert d.job(big).status == "placed"
    assert d.job(big).devices == [0, 1]


@pytest.mark.parametrize("started", [True, False])
def test_a_lost_worker_fails_running_jobs_and_moves_waiting_ones(started: bool) -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    job, _ = d.submit(10)
    lost = d.job(job).worker_id
    if started:
        d.start(job)
    out = d.feed(ev.WorkerLost(worker_id=lost, reason="no heartbeat for 16 s"))
    names = kinds(out)
    assert names[0] == "revoked"
    if started:
        assert names[1:] == ["failed"]
        failed = out[1]
        assert isinstance(failed, ev.JobFailed)
        assert failed.code == "UNAVAILABLE"
        assert lost in failed.message
        assert d.job(job).status == "done"
    else:
        assert names[1:] == ["scheduled"]
        assert d.job(job).worker_id != lost
        assert d.job(job).attempt == 2
    # The lost worker may still hold the attempt: its share is free once it says released.
    assert all(d.free == 0 for d in d.state.workers[lost].devices)
    d.feed(ev.PartitionReleased(job_id=job, worker_id=lost, attempt=1, partition_ids=["p"]))
    assert all(d.free == 10 for d in d.state.workers[lost].devices)


def test_partition_failure_moves_the_job_then_fails_after_three_attempts() -> None:
    d = Driver()
    for w in ("w1", "w2", "w3", "w4"):
        d.add_worker(w, 1)
    job, _ = d.submit(5)
    seen = []
    for attempt in (1, 2, 3):
        current = d.job(job)
        seen.append(current.worker_id)
        out = d.feed(
            ev.PartitionFailed(
                job_id=job,
                worker_id=current.worker_id,
                attempt=attempt,
                code="INTERNAL",
                message="Chronos partition creation failed: boom",
            )
        )
    assert len(set(seen)) == 3
    assert isinstance(out[-1], ev.JobFailed)
    assert out[-1].message == "Chronos partition creation failed: boom (after 3 attempts)"


def test_restart_rebuilds_the_same_allocation() -> None:
    d = Driver()
    d.add_worker("w1", 2)
    jobs = [d.submit(t)[0] for t in (3, 5, 10, 2, 10)]
    d.complete(jobs[0])
    before = d.state.allocation()
    d.restart()
    assert d.state.allocation() == before


def node(
    worker: str, state: str = "ready", availability: str = "active", **labels: str
) -> ev.WorkerNodeObserved:
    return ev.WorkerNodeObserved(
        worker_id=worker,
        node_id=f"n-{worker}",
        state=state,
        availability=availability,
        labels=labels,
    )


def test_a_drained_swarm_node_gets_no_new_jobs_and_keeps_its_running_ones() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    running, _ = d.submit(5)
    host = d.job(running).worker_id
    other = "w2" if host == "w1" else "w1"
    d.feed(node(host, availability="drain", **{"gpu.count": "1"}))
    assert d.state.workers[host].node_labels == {"gpu.count": "1"}
    job, _ = d.submit(3)
    assert d.job(job).worker_id == other  # not the half-free drained device
    assert d.job(running).status == "placed"
    d.feed(node(host, availability="active"))
    third, _ = d.submit(5)
    assert d.job(third).worker_id == host


def test_a_swarm_node_down_loses_its_worker() -> None:
    d = Driver()
    d.add_worker("w1", 1)
    job, _ = d.submit(10)
    d.start(job)
    out = d.feed(node("w1", state="down"))
    assert kinds(out) == ["lost", "revoked", "failed"]
    failed = out[-1]
    assert isinstance(failed, ev.JobFailed)
    assert failed.message == "Worker w1 was lost while running the job (Swarm node n-w1 is down)"
    assert not d.state.workers["w1"].alive


def test_the_seeds_metrics_count_placements_and_memory() -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    d = Driver()
    d.add_worker("wm", 1)
    before = sample("cumulus_worker_assignments_total", status="success")
    queued = sample("cumulus_worker_assignments_total", status="queued")
    job, _ = d.submit(5)
    d.submit(10)
    assert sample("cumulus_worker_assignments_total", status="success") == before + 1
    assert sample("cumulus_worker_assignments_total", status="queued") == queued + 1
    assert sample("cumulus_gpu_memory_used_bytes", device="wm/0") == 8 << 30
    assert sample("cumulus_active_workers") >= 1
    d.complete(job)
    # The queued whole GPU took the device as soon as the half was freed.
    assert sample("cumulus_gpu_memory_used_bytes", device="wm/0") == 16 << 30
