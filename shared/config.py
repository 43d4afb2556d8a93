"""Configuration: a YAML file shaped like the seed's `config.yaml`, overridable by environment.

Precedence: defaults < YAML file (`--config` or `CUMULUS_CONFIG`) < environment variables named
`CUMULUS_<SECTION>_<KEY>` (e.g. `CUMULUS_NATS_URL`, `CUMULUS_WORKER_DEVICES`,
`CUMULUS_LIMITS_MIN_DURATION`). Everything is validated at load: an unknown key, a value of the
wrong type, a number out of range or an enumerated setting outside its `Literal` is a
`ConfigError` naming the key as the user wrote it (and the variable, when it came from the
environment). docs/config.md lists every key.
"""

from __future__ import annotations

import os
import re
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from shared.errors import ConfigError
from shared.images import patterns as image_patterns
from shared.policy import check_policy
from shared.sizes import parse_size
from shared.volumes import offered as offered_volumes

PlacementPolicy = Literal["best", "first", "worst"]
"""How shares are placed on devices (services/scheduler/placement.py)."""
BackfillPolicy = Literal["reserve", "none", "greedy"]
"""How the queue is drained past a head that does not fit (services/scheduler/handlers.py)."""
BackendKind = Literal["process", "docker", "swarm", "auto"]
"""Where a worker's jobs run (services/runner/config.py)."""
DeviceSource = Literal["auto", "nvidia", "opencl", "virtual"]
"""Which devices chronos_cli discovers (cumulus_core/devices.py)."""
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "text"]
SandboxKind = Literal["bwrap", "none"]
"""How the process backend confines a job (services/runner/sandbox.py)."""

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
"""A duration that must be above zero."""
SecondsOrOff = Annotated[float, msgspec.Meta(ge=0)]
"""A duration where 0 has a meaning (off, or at once)."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A config section: unknown keys are refused, values are checked by their annotations."""


class NatsConfig(_Section):
    url: str = "nats://127.0.0.1:4222"
    """Where the bus is; a comma-separated list for a cluster."""
    connect_timeout: Seconds = 5.0
    """Seconds one attempt to reach the bus may take (a TCP connect and the NATS handshake)."""
    startup_timeout: SecondsOrOff = 300.0
    """Seconds a starting service waits for its bus before it exits, status 1, with a line
    naming the URL (0: wait forever). Meanwhile it retries with backoff, quietly
    (docs/operations.md, "The bus away")."""
    credentials: str = ""
    """This process's credentials file (written by `cumulus up` / `cumulus users add`): its
    identity's nkey seed, inbox prefix and TLS files. Empty: connect without an identity."""
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """Copies JetStream keeps of every stream, key-value bucket and object store the control
    plane creates: 1 for one nats-server, 3 for a cluster of three (docs/deploy.md)."""


class LimitsConfig(_Section):
    min_duration: Positive = 60
    """Shortest duration a job may ask for, in seconds (the seed: 60)."""
    max_job_duration: Positive = 86400
    """Longest duration a job may ask for, in seconds (the seed: 86400)."""
    max_code_bytes: Positive = 2 * 1024 * 1024 * 1024
    """Largest code package accepted, zipped (spooled to the gateway's disk, streamed into
    the object store: never held whole in memory)."""
    max_unpacked_bytes: Positive = 4 * 1024 * 1024 * 1024
    """Largest total size a code package may unpack to (zip-bomb guard)."""


class SchedulerConfig(_Section):
    heartbeat_misses: Positive = 3
    """A worker silent for this many heartbeat intervals is down."""
    queue_limit: Positive = 10000
    """Jobs that may wait in the queue; beyond it a submit is RESOURCE_EXHAUSTED."""
    max_attempts: Positive = 3
    """Placements tried for one job when partitions fail (the seed: 3)."""
    placement: PlacementPolicy = "best"
    """How shares are placed: best | first | worst (best-fit measured best, docs/benchmarks.md)."""
    backfill: BackfillPolicy = "reserve"
    """reserve (backfill around the queue head's reservation) | none (strict FIFO) | greedy."""
    swarm_nodes: bool = False
    """Read Swarm nodes (labels, state, availability) through the local Docker engine: a node
    that is down loses its worker, a drained or paused one gets no new placements."""
    swarm_poll_s: Seconds = 5.0
    reserve_after_s: SecondsOrOff = 10.0
    """How long the head of the queue may be overtaken by backfill before it gets a reservation."""
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=1.0, le=300.0)] = 6.0
    """The active scheduler's lease (services/scheduler/lease.py): a standby takes over once
    the lease went unrenewed this long, so within about this much after the active one died."""


class WorkerConfig(_Section):
    id: str = ""
    """Worker id; defaults to the host name. Unique per bus, and per Docker engine for the
    container backends: a second live stack with the same id there is refused at start
    (services/runner/claim.py)."""
    devices: str = "2x16GiB"
    """Declared virtual devices, used when no real GPU is found."""
    device_source: DeviceSource = "auto"
    """auto | nvidia | opencl | virtual."""
    backend: BackendKind = "process"
    """Runner backend: process | docker | swarm | auto (docker when an engine with the job
    image is reachable, else process)."""
    heartbeat_s: Seconds = 5.0
    chronos_cli: str = ""
    """Path of the chronos_cli to drive; empty means ours (`python -m cumulus_core`)."""
    max_log_bytes: Positive = 64 * 1024 * 1024
    """Output of one job delivered as events; beyond it the log is cut with a marker."""
    max_result_bytes: str | int = "256MiB"
    """The most a job may return (a size: 64m, 1GiB, or bytes); a larger result ends the job
    FAILED with RESOURCE_EXHAUSTED. Large results travel in parts (the RESULTS stream)."""
    max_output_bytes: str | int = "256MiB"
    """The most a job's `outputs/` folder may hold (a size) to be kept for `cumulus download`
    (in parts, in the RESULTS stream, for retention.results_ttl_s); a larger one is not kept,
    and the job's log says so."""
    package_cache_bytes: str | int = "4GiB"
    """The most the runner keeps of code packages on its disk (a size), under
    `<data_dir>/runner-<worker>/packages/`: the least recently used go first, but never one
    used in the last 10 minutes (a launch may be about to copy it)."""
    create_retries: Positive = 3
    """Attempts to create a partition (the seed: 3)."""
    create_backoff_s: SecondsOrOff = 1.0
    """Wait before the second attempt, doubled before each further one."""
    reap_interval_s: SecondsOrOff = 30.0
    """How often the partitioner runs `chronos_cli reap` and releases partitions whose job is
    gone; 0 turns the reaper off."""
    sandbox: SandboxKind = "bwrap"
    """How the process backend confines a job: bwrap (bubblewrap: own user, namespaces, no
    network) or none (the operator's explicit opt-in to unsandboxed jobs)."""

    @property
    def result_bytes(self) -> int:
        """`max_result_bytes` in bytes (validated at load)."""
        return parse_size(str(self.max_result_bytes))

    @property
    def output_bytes(self) -> int:
        """`max_output_bytes` in bytes (validated at load)."""
        return parse_size(str(self.max_output_bytes))

    @property
    def cache_bytes(self) -> int:
        """`package_cache_bytes` in bytes (validated at load)."""
        return parse_size(str(self.package_cache_bytes))


class SshConfig(_Section):
    """SSH mode: one partitioner serves agentless workers over SSH (the seed's `ssh:` section)."""

    workers: str | dict[str, str] = ""
    """Agentless workers to serve: `{worker_id: "[user@]host[:port]"}`, or one string
    `id=[user@]host[:port],...` (the form `CUMULUS_SSH_WORKERS` takes). Empty: local mode."""
    swarm: bool = False
    """Also serve every Swarm node labelled `ssh.address` (read with the Docker SDK at start)."""
    user: str = "root"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 22
    key_path: str = "~/.ssh/id_rsa"
    known_hosts: str = ""
    """known_hosts file; empty: ~/.ssh/known_hosts; `none`: host keys are not checked."""
    timeout: Seconds = 10.0
    """Seconds to connect to a worker (the seed: 10 s)."""
    command_timeout: Seconds = 30.0
    """Seconds one chronos_cli command may take on a worker."""
    chronos_cli: str = "chronos_cli"
    """The command run on each worker; `{worker}` in it is replaced by the worker id."""
    max_sessions: Positive = 8
    """Commands run at once over one worker's connection (sshd's MaxSessions is 10)."""


class ContainerConfig(_Section):
    image: str = "cumulus-job:latest"
    """The job image (infra/images/build-images.sh); Swarm services are created from its ID.
    Given as `<registry>/<name>@sha256:<digest>` it is used as is: every node pulls exactly
    that image from the registry (docs/deploy.md), no tag is looked up."""
    wheelhouse: str = ""
    """Host directory of wheels mounted read-only at /wheelhouse: requirements install from it
    with no index; empty means from the index (only the install step gets a network)."""
    memory: str = "8g"
    """Memory limit of a job's container (swap included)."""
    pids_limit: int = 1024
    tmp_size: str = "1g"
    """Size of the job's writable /tmp (tmpfs)."""
    swarm_node: str = ""
    """Swarm node (ID or hostname) the worker's jobs are pinned to; empty means the node of
    the runner's own engine (DOCKER_HOST, else the local socket)."""
    swarm_manager: str = ""
    """Docker API of a Swarm manager (`tcp://10.0.0.1:2376`) that the Swarm backend makes
    its services through, when the runner's own engine is a worker node (which cannot make
    services); empty: the runner's own engine is a manager. Everything else (the job's
    directory, requirement volumes, the claim, the image) stays on the runner's own engine."""
    swarm_manager_tls: str = ""
    """Directory with `ca.pem`, `cert.pem`, `key.pem` (Docker's names) for the manager's API
    over TLS (dockerd --tlsverify); empty: plain TCP, only for a private test network."""
    swarm_network: str = "cumulus-isolated"
    """Internal overlay network for Swarm jobs without network (Swarm has no `none`)."""
    volumes: str | dict[str, str] = ""
    """Host folders jobs may mount, by name (shared/volumes.py): `{name: "/host/path"}`,
    `:ro` at the end for read-only, or `name=/host/path[:ro],…`; empty: none."""


class PolicyConfig(_Section):
    """Per-user limits the operator sets (docs/security.md); `users` overrides them by user."""

    network: bool = False
    """Jobs may ask for network access."""
    max_priority: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 100
    """Highest priority a job may ask for (and lowest: minus this)."""
    max_share: Annotated[float, msgspec.Meta(ge=0, le=100_000)] = 0.0
    """GPUs one user's running jobs may hold at once; 0: no limit."""
    max_queued: Positive = 1000
    """Jobs one user may have waiting (submitted or queued)."""
    stored_bytes: str = "4GiB"
    """Code one user may keep in the code store (a size: 512MiB, 2GiB)."""
    users: dict[str, dict[str, Any]] = {}
    """Per-user overrides of the keys above: `{alice: {network: true, max_share: 4}}`."""
    images: str | list[str] = []
    """Images jobs may ask for (`image=`), besides container.image: references or shell
    patterns (`team/*:*`), comma-separated in one string; empty: the job image only
    (shared/images.py). The same for every user."""


MIN_STREAM_BYTES = 1024 * 1024
"""The least a stream's max_bytes may be: one message of the largest size the bus carries."""


class RetentionConfig(_Section):
    """How much history the stack keeps; the defaults are sized for a lab running 100,000
    jobs a day (docs/config.md, "Retention")."""

    snapshot_events: Positive = 20_000
    """A service snapshots its state after this many logged events and drops the log rows the
    snapshot covers: replay starts from the snapshot."""
    forget_after_s: SecondsOrOff = 3600.0
    """A job that ended this long ago leaves the services' memory at their next snapshot;
    status still answers for it from the job stream. 0: at the next snapshot."""
    jobs_max_age_s: Seconds = 7 * 86400.0
    """Job events (the JOBS stream) are kept this long."""
    jobs_max_bytes: str = "4GiB"
    """And at most this much of them, oldest dropped first."""
    logs_max_age_s: Seconds = 3 * 86400.0
    """Job output (the LOGS stream) is kept this long."""
    logs_max_bytes: str = "8GiB"
    results_ttl_s: Seconds = 7 * 86400.0
    """Large results (the RESULTS stream) are kept this long after they were written (as the
    job ended)."""
    results_max_bytes: str = "4GiB"
    map_inputs_max_bytes: str = "2GiB"
    """Warm maps' inputs waiting to be answered (the MAPIN work queue), at most; a map whose
    input does not fit is told so (RESOURCE_EXHAUSTED) and the queue keeps what it holds."""
    code_ttl_s: Seconds = 30 * 86400.0
    """Code packages are kept this long after their upload."""
    large_code_bytes: str = "64MiB"
    """A package at least this large (large arguments, data files) is deleted once the last
    job using it ended (after `large_code_grace_s`), not kept for `code_ttl_s`: it would fill
    its owner's `policy.stored_bytes`. Smaller ones stay, so a rerun skips the upload."""
    large_code_grace_s: SecondsOrOff = 60.0
    """How long a large package outlives the last job using it (a resubmit within it reuses
    the upload)."""
    dead_letters: Positive = 10_000
    """Messages set aside that each service keeps in its log (the newest)."""

    def bytes_of(self, key: str) -> int:
        """A size key (`jobs_max_bytes`, ...) in bytes (validated at load)."""
        return parse_size(str(getattr(self, key)))


class LoggingConfig(_Section):
    level: LogLevel = "info"
    """Written in any case (`INFO` is `info`)."""
    format: LogFormat = "json"
    """json: one JSON object a line; text: a plain line for a person."""


class DashboardConfig(_Section):
    port: Port = 8765
    """The web dashboard's port (`cumulus dashboard`, and the one `cumulus up` starts, which
    takes a free port when this one is taken); 0: `cumulus up` starts none."""


Instance = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,32}$")]
MetricsBind = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z.:_-]{1,253}$")]


class Config(_Section):
    data_dir: str = "~/.cumulus"
    """Root of every service's SQLite files, the job directories and nats-server's store."""
    instance: Instance = ""
    """This process's name among replicas of one service (a gateway, a standby scheduler):
    its durable consumers and SQLite file carry `-<instance>`, and a scheduler holds the lease
    under it. Empty: one copy (a scheduler then names itself `<hostname>-<random>`)."""
    metrics_port: Port = 0
    """Prometheus /metrics port for a service; 0 turns it off."""
    metrics_bind: MetricsBind = "127.0.0.1"
    """Address /metrics listens on: loopback by default; `0.0.0.0` (or one interface's
    address) when Prometheus scrapes from another host."""
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    ssh: SshConfig = msgspec.field(default_factory=SshConfig)
    container: ContainerConfig = msgspec.field(default_factory=ContainerConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def worker_id(self) -> str:
        return self.worker.id or socket.gethostname().split(".")[0]


def _sections() -> dict[str, type[_Section]]:
    hints = typing.get_type_hints(Config)
    return {
        f.name: hints[f.name]
        for f in msgspec.structs.fields(Config)
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], _Section)
    }


_SECTIONS = _sections()
"""Section name -> its struct; a `CUMULUS_<SECTION>_` variable belongs to the config."""
_TOP_LEVEL = tuple(f.name for f in msgspec.structs.fields(Config) if f.name not in _SECTIONS)


def keys(section: str = "") -> tuple[str, ...]:
    """The keys of one section (or the top level, with the section names), in file order."""
    struct = _SECTIONS[section] if section else Config
    return tuple(f.name for f in msgspec.structs.fields(struct))


def all_keys() -> tuple[str, ...]:
    """Every setting as written in docs/config.md: `data_dir`, ..., `logging.format`."""
    return _TOP_LEVEL + tuple(f"{s}.{k}" for s in _SECTIONS for k in keys(s))


def allowed(key: str) -> tuple[str, ...]:
    """The values an enumerated key (`scheduler.placement`) takes; () for any other key."""
    struct: type[msgspec.Struct] = Config
    *path, name = key.split(".")
    for part in path:
        struct = _SECTIONS[part]
    hint = typing.get_type_hints(struct).get(name)
    if typing.get_origin(hint) is Literal:
        return tuple(str(v) for v in typing.get_args(hint))
    return ()


def env_name(key: str) -> str:
    """The variable that sets `key`: `scheduler.backfill` -> `CUMULUS_SCHEDULER_BACKFILL`."""
    return "CUMULUS_" + key.replace(".", "_").upper()


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings `CUMULUS_*` variables give, and which variable gave each key.

    A variable whose name starts with a section (`CUMULUS_SCHEDULER_`) is a setting, so a typo
    there is an error; other `CUMULUS_*` variables (`CUMULUS_USER`, `CUMULUS_CONFIG`, a job's
    `CUMULUS_JOB_DIR`) belong to other programs and are left alone.
    """
    out: dict[str, Any] = {}
    names: dict[str, str] = {}
    for var, value in environ.items():
        if not var.startswith("CUMULUS_") or var == "CUMULUS_CONFIG":
            continue
        rest = var[len("CUMULUS_") :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                out.setdefault(section, {})[key] = _mapping_or_text(value)
                names[f"{section}.{key}"] = var
                break
        else:
            if rest in _TOP_LEVEL:
                out[rest] = value
                names[rest] = var
    return out, names


def _mapping_or_text(value: str) -> Any:
    """A variable holding a mapping (`CUMULUS_POLICY_USERS='{alice: {network: true}}'`, YAML
    or JSON) is that mapping; any other value stays text for validation to read."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        loaded = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return loaded if isinstance(loaded, dict) else value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Case-insensitive log levels: `INFO` and `Info` mean `info`."""
    section = data.get("logging")
    if isinstance(section, Mapping) and isinstance(section.get("level"), str):
        data = _merge(data, {"logging": {"level": section["level"].lower()}})
    return data


def read_file(path: str | Path) -> dict[str, Any]:
    """The settings a YAML file gives, unvalidated; an unreadable file is a ConfigError."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping")
    return loaded


def settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What the user set (file, then environment), validated but without the defaults: lets a
    caller such as the embedded stack tell a chosen value from a default one."""
    return _load(path, environ)[0]


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration; any fault is a ConfigError naming the key."""
    return _load(path, environ)[1]


def _load(
    path: str | Path | None, environ: Mapping[str, str] | None
) -> tuple[dict[str, Any], Config]:
    environ = os.environ if environ is None else environ
    path = path or environ.get("CUMULUS_CONFIG")
    data = read_file(path) if path else {}
    overrides, names = _env_overrides(environ)
    data = _normalise(_merge(data, overrides))
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, data, names, path) from None
    _check(config, names, path)
    return data, config


def _check(config: Config, names: Mapping[str, str], path: str | Path | None) -> None:
    """Rules across keys, which the annotations cannot say."""
    limits = config.limits
    if limits.min_duration > limits.max_job_duration:
        key = "limits.min_duration"
        raise ConfigError(
            f"Invalid {key}: {limits.min_duration}{_origin(key, names, path)}. Must not be "
            f"above limits.max_job_duration ({limits.max_job_duration})",
            key=key,
        )
    for name in ("jobs_max_bytes", "logs_max_bytes", "results_max_bytes", "map_inputs_max_bytes"):
        key = f"retention.{name}"
        try:
            size = config.retention.bytes_of(name)
        except ValueError as exc:
            raise ConfigError(
                f"Invalid {key}: {getattr(config.retention, name)!r}"
                f"{_origin(key, names, path)}. {exc}",
                key=key,
            ) from None
        if size < MIN_STREAM_BYTES:  # a stream drops at once a message larger than itself
            raise ConfigError(
                f"Invalid {key}: {getattr(config.retention, name)!r}"
                f"{_origin(key, names, path)}. Must be at least 1MiB",
                key=key,
            )
    _check_result_bytes(config, names, path)
    offered_volumes(config.container.volumes)  # ConfigError naming a bad entry, at start
    image_patterns(config.policy.images)  # likewise
    # Sizes, steps of 0.1 GPU and each user's overrides (shared/policy.py).
    check_policy(config.policy, lambda key: _origin(key, names, path))


def _check_result_bytes(config: Config, names: Mapping[str, str], path: str | Path | None) -> None:
    """Sizes of at least one byte: the worker's result and output bounds and package cache,
    the large-package threshold."""
    sizes = {
        f"worker.{n}": getattr(config.worker, n)
        for n in ("max_result_bytes", "max_output_bytes", "package_cache_bytes")
    }
    sizes["retention.large_code_bytes"] = config.retention.large_code_bytes
    for key, value in sizes.items():
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            problem = str(exc)
        else:
            if size >= 1:
                continue
            problem = "Must be at least 1 byte"
        raise ConfigError(
            f"Invalid {key}: {value!r}{_origin(key, names, path)}. {problem}", key=key
        )


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")


def _origin(key: str, names: Mapping[str, str], path: str | Path | None) -> str:
    """Where the user wrote `key`: the variable, else the file."""
    if key in names:
        return f" (from {names[key]})"
    section = key.split(".")[0]
    if section in names:
        return f" (from {names[section]})"
    return f" (in {path})" if path else ""


def _explain(
    exc: msgspec.ValidationError,
    data: Mapping[str, Any],
    names: Mapping[str, str],
    path: str | Path | None,
) -> ConfigError:
    """msgspec's first complaint, said in the user's terms: the key as written in the file
    (`scheduler.backfill`), the variable that set it, the value and what is allowed."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    what = match["what"].replace("`", "")
    parts = [p for p in re.split(r"[.\[]", match["path"] or "") if p and not p.endswith("]")]
    unknown = _UNKNOWN.match(match["what"])
    if unknown:
        key = ".".join([*parts[:2], unknown["name"]])
        section = parts[0] if parts else ""
        known = keys(section) if not parts or section in _SECTIONS else ()
        where = f"the {section} section" if parts else "the top level"
        hint = f"; {where} has {', '.join(known)}" if known else ""
        origin = _origin(key, names, path)
        return ConfigError(f"Unknown config key {key}{origin}{hint}", key=key, allowed=known)
    key = ".".join(parts[:2])
    value: Any = data
    for part in parts:
        value = value.get(part) if isinstance(value, Mapping) else None
    choices = allowed(key) if len(parts) == 2 and parts[0] in _SECTIONS else ()
    if choices:
        return ConfigError(
            f"Invalid {key}: {value!r}{_origin(key, names, path)}. "
            f"Must be one of {', '.join(choices)}",
            key=key,
            allowed=choices,
        )
    shown = f": {value!r}" if value is not None and not isinstance(value, Mapping) else ""
    return ConfigError(
        f"Invalid {key or 'configuration'}{shown}{_origin(key, names, path)}. {what}",
        key=key,
    )
