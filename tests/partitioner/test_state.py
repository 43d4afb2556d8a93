"""The partitioner's pure parts: state from events, the reaper's choice, addresses, labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.partitioner.handlers import orphans
from services.partitioner.ssh import SshTarget, parse_address, parse_workers
from services.partitioner.state import PartitionerState, parse_label
from services.partitioner.types import Partition
from services.partitioner.workers import ssh_addresses_from_nodes
from shared import config
from shared import events as ev

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)


def selected(job_id: str, attempt: int = 1, worker_id: str = "w1") -> ev.WorkerSelected:
    return ev.WorkerSelected(
        job_id=job_id, worker_id=worker_id, spec=SPEC, devices=[0], tenths=5, attempt=attempt
    )


def revoked(job_id: str, attempt: int, worker_id: str = "w1") -> ev.PlacementRevoked:
    return ev.PlacementRevoked(
        job_id=job_id, worker_id=worker_id, attempt=attempt, reason="worker lost"
    )


def ready(job_id: str, attempt: int = 1) -> ev.PartitionReady:
    return ev.PartitionReady(
        job_id=job_id,
        worker_id="w1",
        spec=SPEC,
        attempt=attempt,
        partition_ids=["partition_0001"],
        devices=[0],
        env={},
        expires_at=0.0,
    )


def test_a_revoked_placement_is_released_not_created() -> None:
    state = PartitionerState("w1")
    state.apply(selected("j1"))
    assert state.jobs["j1"].needs_partition
    state.apply(revoked("j1", 1))
    assert not state.jobs["j1"].needs_partition
    assert state.jobs["j1"].needs_release


def test_a_revoked_ready_placement_needs_release_once() -> None:
    state = PartitionerState("w1")
    state.apply(selected("j1"))
    state.apply(ready("j1"))
    state.apply(revoked("j1", 1))
    assert state.jobs["j1"].needs_release
    state.apply(ev.PartitionReleased(job_id="j1", worker_id="w1", attempt=1, partition_ids=["p"]))
    assert not state.jobs["j1"].needs_release


def test_a_revocation_of_another_attempt_changes_nothing() -> None:
    state = PartitionerState("w1")
    state.apply(selected("j1", attempt=2))
    state.apply(ready("j1", attempt=2))
    state.apply(revoked("j1", 1))
    assert not state.jobs["j1"].needs_release
    assert state.jobs["j1"].status == "ready"


def test_labels_name_the_job_and_attempt() -> None:
    assert parse_label("job-1.2") == ("job-1", 2)
    assert parse_label("a_b.10") == ("a_b", 10)
    for other in (None, "", "job", "job.", ".1", "job.x", "a.b.1", "job 1.1"):
        assert parse_label(other) is None


def partition(pid: str, label: str | None) -> Partition:
    return Partition(
        partition_id=pid,
        device=0,
        tenths=5,
        memory_bytes=8 << 30,
        created_at=0.0,
        expires_at=3600.0,
        label=label,
    )


def test_orphans_are_partitions_no_placement_holds() -> None:
    state = PartitionerState("w1")
    for job_id in ("wanted", "ready", "ending", "released", "failed", "moved"):
        state.apply(selected(job_id))
    for job_id in ("ready", "ending", "released"):
        state.apply(ready(job_id))
    state.apply(ev.JobCompleted(job_id="ending", worker_id="w1", result=b'{"ok":true}'))
    state.apply(
        ev.PartitionReleased(job_id="released", worker_id="w1", attempt=1, partition_ids=[])
    )
    state.apply(
        ev.PartitionFailed(job_id="failed", worker_id="w1", attempt=1, code="INTERNAL", message="x")
    )
    state.apply(selected("moved", attempt=2))
    live = [
        partition("p1", "wanted.1"),
        partition("p2", "ready.1"),
        partition("p3", "ending.1"),  # terminal, release under way: not the reaper's
        partition("p4", "released.1"),
        partition("p5", "failed.1"),
        partition("p6", "moved.1"),
        partition("p7", "moved.2"),
        partition("p8", "ghost.1"),
        partition("p9", None),
        partition("p10", "someone else's"),
        partition("p11", "busy.1"),
    ]
    found = [p.partition_id for p in orphans(state, live, busy={"busy"})]
    # moved.1 was superseded by moved.2 before it was made: its own release finds it.
    assert found == ["p4", "p5", "p8"]


def test_a_job_under_way_is_never_an_orphan() -> None:
    state = PartitionerState("w1")
    state.apply(selected("j1"))
    state.apply(ready("j1"))
    state.apply(ev.PartitionReleased(job_id="j1", worker_id="w1", attempt=1, partition_ids=[]))
    assert orphans(state, [partition("p1", "j1.1")], busy={"j1"}) == []


def test_ssh_addresses() -> None:
    assert parse_address("10.0.1.10") == SshTarget("10.0.1.10", 22, "root")
    assert parse_address("gpu@host:2222", user="x") == SshTarget("host", 2222, "gpu")
    assert parse_address("[::1]:2200") == SshTarget("::1", 2200, "root")
    assert parse_address("::1") == SshTarget("::1", 22, "root")
    assert parse_address("h", user="u", port=23) == SshTarget("h", 23, "u")
    assert str(SshTarget("::1", 22, "u")) == "u@[::1]:22"
    for bad in ("", "@host", "host:0", "host:x", "host:70000", "[::1]:"):
        with pytest.raises(ValueError, match="SSH address"):
            parse_address(bad)


def test_ssh_workers_from_a_mapping_or_one_string() -> None:
    assert parse_workers({"w1": "10.0.1.10"}) == {"w1": "10.0.1.10"}
    assert parse_workers(" w1=root@a:22, w2=b ,") == {"w1": "root@a:22", "w2": "b"}
    assert parse_workers("") == {}
    with pytest.raises(ValueError, match="id="):
        parse_workers("w1")


def test_ssh_section_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("ssh:\n  workers:\n    worker-1: 10.0.1.10\n  timeout: 2.5\n")
    cfg = config.load(path, environ={"CUMULUS_SSH_KEY_PATH": "/keys/id"})
    assert cfg.ssh.workers == {"worker-1": "10.0.1.10"}
    assert cfg.ssh.timeout == 2.5
    assert cfg.ssh.key_path == "/keys/id"
    assert cfg.ssh.user == "root"
    env = config.load(environ={"CUMULUS_SSH_WORKERS": "a=h1,b=h2", "CUMULUS_SSH_SWARM": "true"})
    assert parse_workers(env.ssh.workers) == {"a": "h1", "b": "h2"}
    assert env.ssh.swarm is True
    assert config.load(environ={}).worker.reap_interval_s == 30.0


def test_swarm_nodes_labelled_ssh_address_become_workers() -> None:
    nodes = [
        {
            "ID": "n1",
            "Description": {"Hostname": "gpu-1.example"},
            "Spec": {"Labels": {"ssh.address": "10.0.1.10", "gpu.count": "2"}},
        },
        {"ID": "n2", "Description": {"Hostname": "manager"}, "Spec": {"Labels": {}}},
        {
            "ID": "n3",
            "Description": {"Hostname": "bad host"},
            "Spec": {"Labels": {"ssh.address": "h3"}},
        },
        {"ID": "n4", "Spec": {}},
    ]
    assert ssh_addresses_from_nodes(nodes) == {"gpu-1": "10.0.1.10", "n3": "h3"}
