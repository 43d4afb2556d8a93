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


class WorkerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str = ""
    """Worker id; defaults to the host name."""
    devices: str = "2x16GiB"
    """Declared virtual devices, used when no real GPU is found."""
    device_source: str = "auto"
    """auto | nvidia | opencl | virtual."""
    backend: str = "process"
    """Runner backend: process | docker | swarm."""
    heartbeat_s: float = 5.0
    chronos_cli: str = ""
    """Path of the chronos_cli to drive; empty means ours (`python -m cumulus_core`)."""
    max_log_bytes: int = 64 * 1024 * 1024
    """Output of one job delivered as events; beyond it the log is cut with a marker."""
    create_retries: int = 3
    create_backoff_s: float = 1.0


class ContainerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    image: str = "cumulus-job:latest"


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
    container: ContainerConfig = msgspec.field(default_factory=ContainerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def worker_id(self) -> str:
        return self.worker.id or socket.gethostname().split(".")[0]


_SECTIONS = ("nats", "limits", "scheduler", "worker", "container", "logging")


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
