"""chronos_cli driven over SSH against a real OpenSSH server on 127.0.0.1 (asyncssh client)."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from services.partitioner.chronos import Chronos, ChronosUnreachable
from services.partitioner.ssh import SshPool, SshRunner, parse_address
from shared.config import SshConfig
from shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tests.partitioner.conftest import Sshd, SshKeys, remote_chronos

pytestmark = pytest.mark.ssh


def ssh_config(sshd: Sshd, **overrides: object) -> SshConfig:
    settings: dict[str, object] = {
        "key_path": str(sshd.keys.client_key),
        "known_hosts": str(sshd.known_hosts),
        "timeout": 5.0,
    }
    settings.update(overrides)
    return SshConfig(**settings)  # type: ignore[arg-type]


def remote(pool: SshPool, sshd: Sshd, state: Path, worker: str = "w1") -> Chronos:
    command = shlex.split(remote_chronos(state).replace("{worker}", worker))
    return Chronos(
        command=command, run=SshRunner(pool, parse_address(sshd.address)), worker_id=worker
    )


def local_list(state_dir: Path) -> list[dict[str, object]]:
    """What the worker's own chronos_cli says, read on the worker (here: this machine)."""
    out = subprocess.run(
        [sys.executable, "-m", "cumulus_core", "--json", "--state-dir", str(state_dir), "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(out.stdout)["partitions"])


async def test_create_and_release_over_ssh_on_one_reused_connection(
    sshd: Sshd, tmp_path: Path
) -> None:
    pool = SshPool(ssh_config(sshd))
    chronos = remote(pool, sshd, tmp_path)
    try:
        devices = await chronos.stats()
        assert [d.kind for d in devices] == ["virtual", "virtual"]
        made = await chronos.create(1, 5, 600, "job-a.1")
        assert made.device == 1
        assert made.label == "job-a.1"
        assert made.env["CUDA_VISIBLE_DEVICES"] == "1"
        # The partition is in the worker's own table, as its chronos_cli reports it.
        assert [p["partition_id"] for p in local_list(tmp_path / "chronos-w1")] == [
            made.partition_id
        ]
        assert [p.partition_id for p in await chronos.partitions()] == [made.partition_id]
        await chronos.release(made.partition_id)
        assert await chronos.partitions() == []
        assert local_list(tmp_path / "chronos-w1") == []
        assert pool.connects == 1
    finally:
        await pool.close()


async def test_chronos_errors_come_back_typed_not_as_ssh_failures(
    sshd: Sshd, tmp_path: Path
) -> None:
    pool = SshPool(ssh_config(sshd))
    try:
        chronos = remote(pool, sshd, tmp_path)
        with pytest.raises(NotFound) as unknown:
            await chronos.release("partition_9999")
        assert unknown.value.resource_id == "partition_9999"
        assert unknown.value.message == "Partition not found or already released: partition_9999"
        with pytest.raises(InvalidArgument):
            await chronos.create(0, 15, 60, "j.1")
        missing = Chronos(
            command=["/nonexistent/chronos_cli"],
            run=SshRunner(pool, parse_address(sshd.address)),
            worker_id="w9",
        )
        with pytest.raises(Unavailable) as gone:
            await missing.stats()
        assert not isinstance(gone.value, ChronosUnreachable)
        assert gone.value.worker_id == "w9"
        assert gone.value.message.startswith("chronos_cli not found on ")
        assert pool.connects == 1
    finally:
        await pool.close()


async def test_sshd_gone_is_unreachable_and_a_restart_reconnects(
    sshd: Sshd, tmp_path: Path
) -> None:
    pool = SshPool(ssh_config(sshd))
    chronos = remote(pool, sshd, tmp_path)
    target = parse_address(sshd.address)
    try:
        await chronos.stats()
        assert pool.connected(target)
        sshd.stop()
        with pytest.raises(ChronosUnreachable, match=r"127\.0\.0\.1") as lost:
            await chronos.stats()
        assert (lost.value.code, lost.value.worker_id) == ("UNAVAILABLE", "w1")
        assert not pool.connected(target)
        sshd.start()
        assert len(await chronos.stats()) == 2
        assert pool.connects == 2
    finally:
        await pool.close()


async def test_refused_keys_and_unknown_host_keys_are_unreachable(
    sshd: Sshd, ssh_keys: SshKeys, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_known_hosts"
    stranger.write_text("")
    wrong_key = tmp_path / "wrong_key"
    wrong_key.write_bytes(ssh_keys.host_key.read_bytes())  # a key sshd does not authorize
    wrong_key.chmod(0o600)
    for config in (
        ssh_config(sshd, known_hosts=str(stranger)),
        ssh_config(sshd, key_path=str(wrong_key)),
        ssh_config(sshd, key_path=str(tmp_path / "no_such_key")),
    ):
        pool = SshPool(config)
        try:
            with pytest.raises(ChronosUnreachable, match="SSH connection to"):
                await remote(pool, sshd, tmp_path).stats()
        finally:
            await pool.close()


async def test_concurrent_commands_share_the_connection(sshd: Sshd, tmp_path: Path) -> None:
    pool = SshPool(ssh_config(sshd, max_sessions=4))
    chronos = remote(pool, sshd, tmp_path)
    try:
        made = await asyncio.gather(*(chronos.create(0, 1, 600, f"j{i}.1") for i in range(10)))
        assert len({p.partition_id for p in made}) == 10
        assert pool.connects == 1
        with pytest.raises(ResourceExhausted) as full:
            await chronos.create(0, 1, 600, "j10.1")  # the device is full: never over-committed
        assert (full.value.requested, full.value.largest_free) == ("0.1", "0")
    finally:
        await pool.close()
