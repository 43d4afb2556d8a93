"""The partitioner service in-process against a real nats-server, real SQLite and chronos_cli.

Events are published as the scheduler and runner would publish them; what the partitioner
emits is read back from the bus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from services.partitioner.app import Partitioner
from services.partitioner.types import Partition
from shared import bus as bus_mod
from shared import events as ev
from shared.errors import ssh_failed
from tests.partitioner.conftest import Recorder, Sshd, make_config, remote_chronos

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)
Started = Callable[..., Any]


@pytest.fixture
async def start_partitioner(nats_url: str, tmp_path: Path) -> AsyncIterator[Started]:
    running: list[Partitioner] = []

    async def start(**env: str) -> Partitioner:
        service = Partitioner(make_config(nats_url, tmp_path / "data", **env))
        await service.start()
        running.append(service)
        return service

    try:
        yield start
    finally:
        for service in running:
            await service.stop()


def selected(job_id: str, worker_id: str, attempt: int = 1, devices: list[int] | None = None):
    return ev.WorkerSelected(
        job_id=job_id,
        worker_id=worker_id,
        spec=SPEC,
        devices=devices or [0],
        tenths=5,
        attempt=attempt,
    )


def ssh_env(sshd: Sshd, tmp_path: Path, workers: str, **extra: str) -> dict[str, str]:
    env = {
        "CUMULUS_SSH_WORKERS": workers,
        "CUMULUS_SSH_KEY_PATH": str(sshd.keys.client_key),
        "CUMULUS_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "CUMULUS_SSH_TIMEOUT": "3",
        "CUMULUS_SSH_CHRONOS_CLI": remote_chronos(tmp_path / "workers"),
    }
    env.update(extra)
    return env


@pytest.mark.ssh
async def test_one_process_serves_two_agentless_workers_over_ssh(
    start_partitioner: Started, bus: tuple[Client, Recorder], sshd: Sshd, tmp_path: Path
) -> None:
    nc, seen = bus
    service = await start_partitioner(
        **ssh_env(sshd, tmp_path, f"ssh-a={sshd.address},ssh-b={sshd.address}")
    )
    for worker in ("ssh-a", "ssh-b"):
        registered = await seen.wait(ev.WorkerRegistered, worker_id=worker)
        assert registered.labels == {"partitioner": "ssh", "ssh.address": sshd.address}
        assert registered.hostname == "127.0.0.1"
        assert len(registered.devices) == 2
        await seen.wait(ev.WorkerHeartbeat, worker_id=worker)
    js = nc.jetstream()
    await bus_mod.publish(js, selected("ssh-job-a", "ssh-a"))
    await bus_mod.publish(js, selected("ssh-job-b", "ssh-b", devices=[1]))
    ready_a = await seen.wait(ev.PartitionReady, job_id="ssh-job-a")
    ready_b = await seen.wait(ev.PartitionReady, job_id="ssh-job-b")
    assert ready_a.worker_id == "ssh-a"
    assert ready_a.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert ready_b.env["CUDA_VISIBLE_DEVICES"] == "1"
    # Each worker has its own table: both got their first partition id.
    assert ready_a.partition_ids == ready_b.partition_ids == ["partition_0001"]
    await bus_mod.publish(
        js, ev.JobCompleted(job_id="ssh-job-a", worker_id="ssh-a", result=b'{"ok":true}')
    )
    released = await seen.wait(ev.PartitionReleased, job_id="ssh-job-a")
    assert released.partition_ids == ready_a.partition_ids
    assert await service.agents["ssh-a"].chronos.partitions() == []
    assert len(await service.agents["ssh-b"].chronos.partitions()) == 1
    assert service.ssh is not None
    assert service.ssh.connects == 1  # one connection, reused


@pytest.mark.ssh
async def test_sshd_down_retries_then_fails_unavailable_with_the_seeds_message(
    start_partitioner: Started,
    bus: tuple[Client, Recorder],
    sshd: Sshd,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nc, seen = bus
    await start_partitioner(
        **ssh_env(sshd, tmp_path, f"ssh-c={sshd.address}", CUMULUS_WORKER_CREATE_BACKOFF_S="0.2")
    )
    await seen.wait(ev.WorkerRegistered, worker_id="ssh-c")
    sshd.stop()
    caplog.set_level(logging.WARNING, logger="services.partitioner.effects")
    started = time.monotonic()
    await bus_mod.publish(nc.jetstream(), selected("ssh-job-c", "ssh-c"))
    failed = await seen.wait(ev.PartitionFailed, job_id="ssh-job-c")
    took = time.monotonic() - started
    assert failed.code == "UNAVAILABLE"
    assert failed.message == ssh_failed().message
    assert failed.message == "Failed to create Chronos partition on worker: SSH connection failed"
    assert failed.attempt == 1
    tries = [r for r in caplog.records if r.getMessage() == "Chronos partition creation failed"]
    assert [r.fields["attempt"] for r in tries] == [1, 2, 3]  # type: ignore[attr-defined]
    assert took >= 0.2 + 0.4  # 3 attempts, backoff doubling from 0.2 s
    assert seen.of(ev.PartitionReady, job_id="ssh-job-c") == []


@pytest.mark.ssh
async def test_an_unreachable_worker_sends_no_heartbeats_until_it_is_back(
    start_partitioner: Started, bus: tuple[Client, Recorder], sshd: Sshd, tmp_path: Path
) -> None:
    _, seen = bus
    await start_partitioner(**ssh_env(sshd, tmp_path, f"ssh-d={sshd.address}"))
    await seen.wait(ev.WorkerHeartbeat, worker_id="ssh-d")
    sshd.stop()
    time_down = time.monotonic()
    await _settle(1.0)
    count = len(seen.of(ev.WorkerHeartbeat, worker_id="ssh-d"))
    await _settle(1.5)  # three intervals of 0.5 s
    assert len(seen.of(ev.WorkerHeartbeat, worker_id="ssh-d")) == count
    sshd.start()
    await seen.wait(ev.WorkerHeartbeat, worker_id="ssh-d", count=count + 1, timeout=10)
    assert time.monotonic() - time_down < 15


async def live(chronos: Any) -> list[Partition]:
    return await chronos.partitions()


async def _settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def test_a_revoked_placement_is_released_and_reported_once(
    start_partitioner: Started, bus: tuple[Client, Recorder]
) -> None:
    nc, seen = bus
    service = await start_partitioner(CUMULUS_WORKER_ID="rev-1")
    js = nc.jetstream()
    await bus_mod.publish(js, selected("rev-job", "rev-1"))
    ready = await seen.wait(ev.PartitionReady, job_id="rev-job")
    chronos = service.agents["rev-1"].chronos
    assert [p.label for p in await live(chronos)] == ["rev-job.1"]
    revoke = ev.PlacementRevoked(job_id="rev-job", worker_id="rev-1", attempt=1, reason="lost")
    await bus_mod.publish(js, revoke)
    released = await seen.wait(ev.PartitionReleased, job_id="rev-job")
    assert released.attempt == 1
    assert released.worker_id == "rev-1"
    assert released.partition_ids == ready.partition_ids
    assert await chronos.partitions() == []
    # A repeated revocation, then a terminal event, find nothing more to release.
    await bus_mod.publish(js, msgspec.structs.replace(revoke, event_id=ev.new_id()))
    await bus_mod.publish(js, ev.JobCancelled(job_id="rev-job", worker_id="rev-1", attempt=1))
    await _settle(1.0)
    assert len(seen.of(ev.PartitionReleased, job_id="rev-job")) == 1


async def test_a_placement_revoked_before_it_was_created_is_never_ready(
    start_partitioner: Started, bus: tuple[Client, Recorder], nats_url: str
) -> None:
    nc, seen = bus
    js = nc.jetstream()
    # Both facts are on the bus before the partitioner first reads them.
    await bus_mod.publish(js, selected("rev-early", "rev-2"))
    await bus_mod.publish(
        js, ev.PlacementRevoked(job_id="rev-early", worker_id="rev-2", attempt=1, reason="lost")
    )
    service = await start_partitioner(CUMULUS_WORKER_ID="rev-2")
    released = await seen.wait(ev.PartitionReleased, job_id="rev-early")
    assert released.partition_ids == []
    assert seen.of(ev.PartitionReady, job_id="rev-early") == []
    assert await service.agents["rev-2"].chronos.partitions() == []


async def test_an_expired_partition_is_held_by_nobody_and_gone_once_reaped(
    start_partitioner: Started,
) -> None:
    service = await start_partitioner(CUMULUS_WORKER_ID="reap-0")  # periodic reaper off
    agent = service.agents["reap-0"]
    short = await agent.chronos.create(0, 5, 1, "short-job.1")
    await _settle(1.2)
    assert await agent.chronos.partitions() == []  # expired: never reported as held
    unreaped = (await agent.chronos._call("list", "--all"))["partitions"]
    assert [p["partition_id"] for p in unreaped] == [short.partition_id]
    assert await service.reaper.reap(agent) == [short.partition_id]
    assert (await agent.chronos._call("list", "--all"))["partitions"] == []


async def test_the_reaper_ends_expired_and_orphaned_partitions_and_never_double_releases(
    start_partitioner: Started, bus: tuple[Client, Recorder]
) -> None:
    nc, seen = bus
    service = await start_partitioner(
        CUMULUS_WORKER_ID="reap-1", CUMULUS_WORKER_REAP_INTERVAL_S="0.3"
    )
    agent = service.agents["reap-1"]
    chronos = agent.chronos
    js = nc.jetstream()
    await bus_mod.publish(js, selected("reap-job", "reap-1"))
    ready = await seen.wait(ev.PartitionReady, job_id="reap-job")
    # Partitions no placement holds: a job this worker never had, and one that expires.
    ghost = await chronos.create(1, 3, 3600, "ghost-job.1")
    short = await chronos.create(1, 2, 1, "short-job.1")
    await _settle(2.0)  # past `short`'s expiry, and several reaper passes
    assert {p.partition_id for p in await live(chronos)} == set(ready.partition_ids)
    left = {p["partition_id"] for p in (await chronos._call("list", "--all"))["partitions"]}
    assert left == set(ready.partition_ids)
    assert ghost.partition_id not in left
    assert short.partition_id not in left
    # The running job's partition stays; its release comes once, on its terminal event.
    await bus_mod.publish(
        js, ev.JobCompleted(job_id="reap-job", worker_id="reap-1", result=b'{"ok":true}')
    )
    await seen.wait(ev.PartitionReleased, job_id="reap-job")
    await _settle(1.0)  # more reaper passes
    assert len(seen.of(ev.PartitionReleased, job_id="reap-job")) == 1
    assert await chronos.partitions() == []


async def test_a_release_that_could_not_reach_chronos_is_finished_by_the_reaper(
    start_partitioner: Started, bus: tuple[Client, Recorder]
) -> None:
    nc, seen = bus
    service = await start_partitioner(CUMULUS_WORKER_ID="reap-2")
    agent = service.agents["reap-2"]
    js = nc.jetstream()
    await bus_mod.publish(js, selected("late-job", "reap-2"))
    await seen.wait(ev.PartitionReady, job_id="late-job")
    await bus_mod.publish(
        js, ev.JobFailed(job_id="late-job", worker_id="reap-2", code="INTERNAL", message="x")
    )
    await seen.wait(ev.PartitionReleased, job_id="late-job")
    # As after a release that gave up (chronos_cli unreachable for RELEASE_PATIENCE_S): the
    # placement is reported released while a partition of it is still in the table.
    leftover = await agent.chronos.create(1, 5, 3600, "late-job.1")
    assert await service.reaper.reap(agent) == [leftover.partition_id]
    assert await agent.chronos.partitions() == []
    assert await service.reaper.reap(agent) == []
    assert len(seen.of(ev.PartitionReleased, job_id="late-job")) == 1
