"""Configuration: a YAML file shaped like the seed's `config.yaml`, overridable by environment.

Precedence: defaults < YAML file (`--config` or `CUMULUS_CONFIG`) < environment variables named
`CUMULUS_<SECTION>_<KEY>` (e.g. `CUMULUS_NATS_URL`, `CUMULUS_WORKER_DEVICES`,
`CUMULUS_LIMITS_MIN_DURATION`). docs/config.md lists every key.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from shared.errors import InvalidArgument


class NatsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str = "nats://127.0.0.1:4222"
    """Where the bus is; a comma-separated list for a cluster."""
    connect_timeout: float = 5.0


class LimitsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    min_duration: int = 60
    """Shortest duration a job may ask for, in seconds (the seed: 60)."""
    max_job_duration: int = 86400
    """Longest duration a job may ask for, in seconds (the seed: 86400)."""
    default_duration: int = 3600
    max_code_bytes: int = 64 * 1024 * 1024
    """Largest code package accepted, zipped."""
    max_unpacked_bytes: int = 512 * 1024 * 1024
    """Largest total size a code package may unpack to (zip-bomb guard)."""


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    heartbeat_misses: int = 3
    """A worker silent for this many heartbeat intervals is down."""
    queue_limit: int = 10000
    max_attempts: int = 3
    """Placements tried for one job when partitions fail (the seed: 3)."""
    placement: str = "best"
    """How shares are placed: best | first | worst (best-fit measured best, docs/benchmarks.md)."""
    backfill: str = "reserve"
    """reserve (backfill around the queue head's reservation) | none (strict FIFO) | greedy."""
    swarm_nodes: bool = False
    """Read Swarm nodes (labels, state, availability) through the local Docker engine: a node
    that is down loses its worker, a drained or paused one gets no new placements."""
    swarm_poll_s: float = 5.0
    reserve_after_s: float = 10.0
    """How long the head of the queue may be overtaken by backfill before it gets a reservation."""


class WorkerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str = ""
    """Worker id; defaults to the host name."""
    devices: str = "2x16GiB"
    """Declared virtual devices, used when no real GPU is found."""
    device_source: str = "auto"
    """auto | nvidia | opencl | virtual."""
    backend: str = "process"
    """Runner backend: process | docker | swarm | auto (docker when an engine with the job
    image is reachable, else process)."""
    heartbeat_s: float = 5.0
    chronos_cli: str = ""
    """Path of the chronos_cli to drive; empty means ours (`python -m cumulus_core`)."""
    max_log_bytes: int = 64 * 1024 * 1024
    """Output of one job delivered as events; beyond it the log is cut with a marker."""
    create_retries: int = 3
    create_backoff_s: float = 1.0
    reap_interval_s: float = 30.0
    """How often the partitioner runs `chronos_cli reap` and releases partitions whose job is
    gone; 0 turns the reaper off."""


class SshConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """SSH mode: one partitioner serves agentless workers over SSH (the seed's `ssh:` section)."""

    workers: str | dict[str, str] = ""
    """Agentless workers to serve: `{worker_id: "[user@]host[:port]"}`, or one string
    `id=[user@]host[:port],...` (the form `CUMULUS_SSH_WORKERS` takes). Empty: local mode."""
    swarm: bool = False
    """Also serve every Swarm node labelled `ssh.address` (read with the Docker SDK at start)."""
    user: str = "root"
    port: int = 22
    key_path: str = "~/.ssh/id_rsa"
    known_hosts: str = ""
    """known_hosts file; empty: ~/.ssh/known_hosts; `none`: host keys are not checked."""
    timeout: float = 10.0
    """Seconds to connect to a worker (the seed: 10 s)."""
    command_timeout: float = 30.0
    """Seconds one chronos_cli command may take on a worker."""
    chronos_cli: str = "chronos_cli"
    """The command run on each worker; `{worker}` in it is replaced by the worker id."""
    max_sessions: int = 8
    """Commands run at once over one worker's connection (sshd's MaxSessions is 10)."""


class ContainerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    image: str = "cumulus-job:latest"
    """The job image (infra/images/build-images.sh); Swarm services are created from its ID."""
    wheelhouse: str = ""
    """Host directory of wheels mounted read-only at /wheelhouse: requirements install from it
    with no index; empty means from the index (only the install step gets a network)."""
    memory: str = "8g"
    """Memory limit of a job's container (swap included)."""
    pids_limit: int = 1024
    tmp_size: str = "1g"
    """Size of the job's writable /tmp (tmpfs)."""
    swarm_node: str = ""
    """Swarm node id the worker's jobs are pinned to; empty means this engine's own node."""
    swarm_network: str = "cumulus-isolated"
    """Internal overlay network for Swarm jobs without network (Swarm has no `none`)."""


class LoggingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: str = "info"
    format: str = "json"


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    data_dir: str = "~/.cumulus"
    """Root of every service's SQLite files, the job directories and nats-server's store."""
    metrics_port: int = 0
    """Prometheus /metrics port for a service; 0 turns it off."""
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    ssh: SshConfig = msgspec.field(default_factory=SshConfig)
    container: ContainerConfig = msgspec.field(default_factory=ContainerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def worker_id(self) -> str:
        return self.worker.id or socket.gethostname().split(".")[0]


_SECTIONS = ("nats", "limits", "scheduler", "worker", "ssh", "container", "logging")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("CUMULUS_") or key == "CUMULUS_CONFIG":
            continue
        rest = key[len("CUMULUS_") :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
        else:
            if rest in ("data_dir", "metrics_port"):
                out[rest] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration; a bad file or value is InvalidArgument naming the key."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("CUMULUS_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidArgument(f"cannot read config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise InvalidArgument(f"config {path} must be a mapping")
        data = loaded
    data = _merge(data, _env_overrides(environ))
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"invalid configuration: {exc}") from None
