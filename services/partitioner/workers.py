"""The workers one partitioner process serves, and how it reaches each one's chronos_cli.

Local mode (the default): one worker, this machine, `chronos_cli` as a subprocess.
SSH mode (`ssh.workers` or `ssh.swarm` set): any number of agentless workers, each reached
over SSH through one shared `SshPool`. Each worker keeps its own id, state and consumer, so
a worker served over SSH looks to the rest of Cumulus exactly like one with its own agent.
"""

from __future__ import annotations

import asyncio
import shlex
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.partitioner.chronos import IN_PROCESS, Chronos, run_in_process
from services.partitioner.ssh import SshPool, SshRunner, SshTarget, parse_address, parse_workers
from services.partitioner.state import PartitionerState
from shared import subjects
from shared.config import Config
from shared.swarm_nodes import node_attrs

SWARM_LABEL = "ssh.address"
"""The Swarm node label that names an agentless worker's SSH address (the seed's)."""


@dataclass
class WorkerAgent:
    """One worker as this process serves it: its chronos_cli, state and effects under way."""

    worker_id: str
    chronos: Chronos
    hostname: str
    labels: dict[str, str] = field(default_factory=dict)
    target: SshTarget | None = None
    """Where its sshd is; None for the local worker."""
    state: PartitionerState = field(init=False)
    inflight: set[str] = field(default_factory=set)
    """Jobs with a create, release or reap under way: nothing else touches them meanwhile."""
    recovering: set[str] = field(default_factory=set)
    """Jobs that wanted a partition when the log was replayed: a crashed run may have
    created it already, so look before creating."""
    releasing: dict[asyncio.Task[None], set[int]] = field(default_factory=dict)
    """Release tasks under way and their devices; a create on one of those devices waits
    for the releases started before it."""
    registered: bool = False
    reachable: bool = True

    def __post_init__(self) -> None:
        self.state = PartitionerState(self.worker_id)


def ssh_mode(config: Config) -> bool:
    return bool(config.ssh.workers) or config.ssh.swarm


def local_agent(config: Config, chronos: Chronos | None = None) -> WorkerAgent:
    worker_id = config.worker_id
    check_worker_id(config)
    if chronos is None:
        worker = config.worker
        options = [
            "--state-dir",
            str(config.data_path / f"chronos-{worker_id}"),
            "--backend",
            worker.device_source,
            "--devices",
            worker.devices,
        ]
        if worker.chronos_cli:
            chronos = Chronos(command=[worker.chronos_cli], options=options)
        else:
            chronos = Chronos(command=[IN_PROCESS], options=options, run=run_in_process)
    if not chronos.worker_id:
        chronos.worker_id = worker_id
    return WorkerAgent(worker_id=worker_id, chronos=chronos, hostname=socket.gethostname())


def check_worker_id(config: Config) -> None:
    """Refuse (ConfigError, exit status 2) a worker whose id another live stack holds on this
    machine's Docker engine, before it registers: its runner would be refused
    (services/runner/claim.py), and a registered worker without a runner takes placements
    it never starts. Only for the container backends; the process backend keeps everything
    under its own data directory."""
    if config.worker.backend not in ("docker", "swarm", "auto"):
        return
    from services.runner import claim, spec

    if not spec.reachable():
        return  # no engine: the runner says so (or, with auto, uses the process backend)
    worker_id = config.worker_id
    client = spec.engine(timeout=10)
    try:
        claim.check_free(
            client, worker_id, claim.owner_id(config.data_path / f"runner-{worker_id}")
        )
    finally:
        client.close()


def ssh_agents(config: Config, pool: SshPool, addresses: Mapping[str, str]) -> list[WorkerAgent]:
    """One agent per agentless worker; a bad id or address is a configuration error."""
    agents = []
    for worker_id, address in sorted(addresses.items()):
        if not subjects.valid_token(worker_id):
            raise ValueError(f"invalid worker id {worker_id!r} in ssh.workers")
        target = parse_address(address, config.ssh.user, config.ssh.port)
        command = shlex.split(config.ssh.chronos_cli.replace("{worker}", worker_id))
        agents.append(
            WorkerAgent(
                worker_id=worker_id,
                chronos=Chronos(
                    command=command,
                    run=SshRunner(pool, target),
                    timeout=config.ssh.command_timeout,
                    worker_id=worker_id,
                ),
                hostname=target.host,
                labels={"partitioner": "ssh", SWARM_LABEL: address},
                target=target,
            )
        )
    return agents


def configured_addresses(config: Config) -> dict[str, str]:
    return parse_workers(config.ssh.workers)


def ssh_addresses_from_nodes(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Worker id -> SSH address of every Swarm node (its `attrs`) labelled `ssh.address`.

    The worker id is the node's host name, as a worker with its own agent would call itself
    by default, or the node id when the host name cannot be a subject token.
    """
    found: dict[str, str] = {}
    for node in nodes:
        labels = (node.get("Spec") or {}).get("Labels") or {}
        address = str(labels.get(SWARM_LABEL, "")).strip()
        if not address:
            continue
        hostname = str((node.get("Description") or {}).get("Hostname", "")).split(".")[0]
        worker_id = hostname if subjects.valid_token(hostname) else str(node.get("ID", ""))
        if subjects.valid_token(worker_id):
            found[worker_id] = address
    return found


def swarm_addresses(timeout: float = 5.0) -> dict[str, str]:
    """The `ssh.address` labels of the Swarm this machine manages; {} when there is none.

    Blocking (the Docker SDK): call it in a thread.
    """
    return ssh_addresses_from_nodes(node_attrs(timeout))
