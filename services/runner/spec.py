"""The job's container: its environment, devices, network and the hardening every job gets.

Every container runs the job image's in-job runner as a non-root user on a read-only root
filesystem; `/job` (the job's directory, bind-mounted) and `/tmp` (tmpfs) are the only writable
places; all capabilities are dropped, no new privileges, memory and pids limited, and no network
unless the job asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.tls

from services.runner.backend import Launch
from shared.config import Config
from shared.errors import ConfigError, Unavailable
from shared.sizes import parse_size

JOB_USER = "65534:65534"
"""nobody:nogroup; the job's files in its bind-mounted directory belong to it."""
_HOST_ONLY = ("PATH", "LANG", "LC_ALL", "PYTHONPATH")


def wants_network(launch: Launch) -> bool:
    """The job gets the default network only if its spec says so (`network`, which the gateway
    allows by the user's policy); nothing in its environment can turn it on."""
    return launch.network


def job_env(launch: Launch, default_image: str) -> dict[str, str]:
    """The job's environment inside the image: the host's paths stay outside. CUMULUS_IMAGE
    names the image it runs in (the job's own or `default_image`), which a failed import
    names (job_image/runner.py)."""
    env = {k: v for k, v in launch.env.items() if k not in _HOST_ONLY}
    env.update(
        {"HOME": "/tmp", "CUMULUS_JOB_DIR": "/job", "CUMULUS_IMAGE": launch.image or default_image}
    )
    if launch.requirements:
        env["CUMULUS_DEPS_DIR"] = "/env/site"
    return env


def nvidia_devices(env: dict[str, str]) -> list[str]:
    """The partition's real NVIDIA devices (UUIDs), or none for virtual devices."""
    if "nvidia" not in env.get("CHRONOS_DEVICE_KIND", ""):
        return []
    return [d for d in env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if d]


def engine(timeout: int = 60) -> docker.DockerClient:
    """The runner's own engine: `DOCKER_HOST` (with Docker's `DOCKER_TLS_VERIFY` and
    `DOCKER_CERT_PATH`), else the local socket. Jobs, volumes and the claim live here."""
    return docker.from_env(timeout=timeout)


TLS_FILES = ("ca.pem", "cert.pem", "key.pem")
"""What `container.swarm_manager_tls` holds: Docker's own names (`docker --tlsverify`)."""


def manager(config: Config, timeout: int = 60) -> docker.DockerClient | None:
    """A client of `container.swarm_manager` (the Swarm manager services are made through),
    or None when it is empty (the runner's own engine is the manager). ConfigError (exit
    status 2) for TLS files that are missing; Unavailable when the manager does not answer."""
    url = config.container.swarm_manager
    if not url:
        return None
    tls = manager_tls(config.container.swarm_manager_tls)
    try:
        client = docker.DockerClient(base_url=url, tls=tls, timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        raise Unavailable(
            f"the Swarm manager at {url} (container.swarm_manager) does not answer: {exc}; "
            "check that its dockerd listens there"
            + (" with --tlsverify" if tls else "")
            + " and that this host reaches it (docs/deploy.md)"
        ) from None
    return client


def manager_tls(directory: str) -> docker.tls.TLSConfig | None:
    """TLS for the manager's API from a directory of `ca.pem`, `cert.pem`, `key.pem`: the
    manager's certificate is checked against `ca.pem` and this runner shows its own."""
    if not directory:
        return None
    where = Path(directory).expanduser()
    missing = [name for name in TLS_FILES if not (where / name).is_file()]
    if missing:
        raise ConfigError(
            f"container.swarm_manager_tls {where} lacks {', '.join(missing)}: it needs the "
            "CA (ca.pem) and this host's client certificate and key (cert.pem, key.pem) that "
            "the manager's dockerd --tlsverify accepts (docs/deploy.md)",
            key="container.swarm_manager_tls",
        )
    return docker.tls.TLSConfig(
        client_cert=(str(where / "cert.pem"), str(where / "key.pem")),
        ca_cert=str(where / "ca.pem"),
        verify=True,
    )


def reachable(timeout: float = 2.0) -> bool:
    try:
        client = docker.from_env(timeout=max(1, int(timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def hardening(config: Config) -> dict[str, Any]:
    """`containers.run` arguments for the isolation every job gets (see the module doc)."""
    limit = parse_size(config.container.memory)
    return {
        "user": JOB_USER,
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={config.container.tmp_size}"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": config.container.pids_limit,
        "mem_limit": limit,
        "memswap_limit": limit,
        "log_config": docker.types.LogConfig(type="json-file", config=log_options(config)),
    }


def log_options(config: Config) -> dict[str, str]:
    """The engine keeps at most about twice what the runner will deliver of a job's output."""
    return {"max-size": str(max(config.worker.max_log_bytes, 1 << 20)), "max-file": "2"}
