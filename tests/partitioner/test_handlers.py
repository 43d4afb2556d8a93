"""The partitioner's decisions, pure: no NATS, no chronos_cli."""

from __future__ import annotations

from services.partitioner import handlers
from services.partitioner.chronos import ChronosUnreachable
from services.partitioner.state import PartitionerState
from services.partitioner.types import DeviceStats, Partition, as_devices, as_partition
from shared import events as ev
from shared.errors import ResourceExhausted, Unavailable

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)


def state_with(*jobs: tuple[str, list[int]]) -> PartitionerState:
    state = PartitionerState("w1")
    for job_id, devices in jobs:
        state.apply(
            ev.WorkerSelected(
                job_id=job_id, worker_id="w1", spec=SPEC, devices=devices, tenths=5, attempt=1
            )
        )
    return state


def part(pid: str, device: int, label: str | None, expires_at: float = 100.0) -> Partition:
    return Partition(
        partition_id=pid,
        device=device,
        tenths=5,
        memory_bytes=1 << 30,
        created_at=0.0,
        expires_at=expires_at,
        label=label,
        env={"CUDA_VISIBLE_DEVICES": str(device)},
    )


def test_work_releases_ended_placements_and_creates_wanted_ones_not_busy() -> None:
    state = state_with(("a", [0]), ("b", [1]), ("c", [0]))
    state.apply(ev.JobCancelled(job_id="b", worker_id="w1"))
    work = handlers.work(state, busy={"c"})
    assert [j.job_id for j in work.releases] == ["b"]
    assert [j.job_id for j in work.creates] == ["a"]


def test_a_revoked_placement_is_no_longer_held() -> None:
    state = state_with(("a", [0]))
    job = state.jobs["a"]
    assert handlers.holds(state, job)
    state.apply(ev.PlacementRevoked(job_id="a", worker_id="w1", attempt=1, reason="lost"))
    assert not handlers.holds(state, job)


def test_adoptable_finds_this_placements_partitions_by_label() -> None:
    job = state_with(("a", [0, 1])).jobs["a"]
    live = [part("p1", 0, "a.1"), part("p2", 1, "a.2"), part("p3", 1, None)]
    assert handlers.adoptable(job, live) == {0: live[0]}
    assert handlers.partition_duration(job) == 600 + handlers.PARTITION_GRACE_S


def test_ready_reports_the_partitions_made() -> None:
    job = state_with(("a", [1])).jobs["a"]
    ready = handlers.ready(job, "w1", [part("p2", 1, "a.1", 40.0)])
    assert ready.partition_ids == ["p2"]
    assert ready.devices == [1]
    assert ready.env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert ready.expires_at == 40.0
    assert ready.attempt == 1


def test_failed_is_the_seeds_unavailable_for_an_unreachable_worker_else_internal() -> None:
    job = state_with(("a", [0])).jobs["a"]
    down = handlers.failed(job, "w1", ChronosUnreachable("SSH connection to x refused"))
    assert (down.code, down.message) == (
        "UNAVAILABLE",
        "Failed to create Chronos partition on worker: SSH connection failed",
    )
    full = handlers.failed(job, "w1", ResourceExhausted("no room on device 0"))
    assert (full.code, full.message) == (
        "INTERNAL",
        "Chronos partition creation failed: no room on device 0",
    )
    slow = handlers.failed(job, "w1", Unavailable("chronos_cli timed out after 30 s"))
    assert slow.code == "INTERNAL"


def test_released_sorts_the_ids() -> None:
    job = state_with(("a", [0])).jobs["a"]
    assert handlers.released(job, "w1", {"p2", "p1"}).partition_ids == ["p1", "p2"]


def test_the_reaper_warns_only_for_a_running_job_and_names_jobs_by_label() -> None:
    state = state_with(("a", [0]), ("b", [0]))
    state.apply(
        ev.PartitionReady(
            job_id="a",
            worker_id="w1",
            spec=SPEC,
            attempt=1,
            partition_ids=["p1"],
            devices=[0],
            env={},
            expires_at=0.0,
        )
    )
    assert handlers.still_running(state, part("p1", 0, "a.1"))
    assert not handlers.still_running(state, part("p2", 0, "b.1"))
    assert not handlers.still_running(state, part("p3", 0, None))
    assert handlers.jobs_of([part("p1", 0, "a.1"), part("p3", 0, "x")]) == {"a"}


def test_registration_lists_the_devices() -> None:
    devices = as_devices(
        [
            {
                "index": 0,
                "name": "Virtual GPU 16GiB",
                "kind": "virtual",
                "uuid": "VIRTUAL-1",
                "memory_bytes": 16 << 30,
                "allocated_tenths": 0,
                "free_tenths": 10,
                "partitions": [],
            }
        ]
    )
    assert isinstance(devices[0], DeviceStats)
    registered = handlers.registered("w1", "host", "process", {"a": "b"}, devices)
    assert [(d.index, d.kind, d.memory_bytes) for d in registered.devices] == [
        (0, "virtual", 16 << 30)
    ]


def test_a_malformed_partition_from_chronos_cli_is_a_typed_error() -> None:
    import pytest

    from shared.errors import Internal

    with pytest.raises(Internal, match="malformed Partition"):
        as_partition({"partition_id": "p1"})
