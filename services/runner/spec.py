"""The job's container: its environment, devices, network and the hardening every job gets.

Every container runs the job image's in-job runner as a non-root user on a read-only root
filesystem; `/job` (the job's directory, bind-mounted) and `/tmp` (tmpfs) are the only writable
places; all capabilities are dropped, no new privileges, memory and pids limited, and no network
unless the job asks for it.
"""

from __future__ import annotations

from typing import Any

import docker

from services.runner.backend import Launch
from shared.config import Config
from shared.sizes import parse_size

JOB_USER = "65534:65534"
"""nobody:nogroup; the job's files in its bind-mounted directory belong to it."""
_HOST_ONLY = ("PATH", "LANG", "LC_ALL", "PYTHONPATH")


def wants_network(launch: Launch) -> bool:
    """The job gets the default network only if its spec says so (`network`, which the gateway
    allows by the user's policy); nothing in its environment can turn it on."""
    return launch.network


def job_env(launch: Launch) -> dict[str, str]:
    """The job's environment inside the image: the host's paths stay outside."""
    env = {k: v for k, v in launch.env.items() if k not in _HOST_ONLY}
    env.update({"HOME": "/tmp", "CUMULUS_JOB_DIR": "/job"})
    if launch.requirements:
        env["CUMULUS_DEPS_DIR"] = "/env/site"
    return env


def nvidia_devices(env: dict[str, str]) -> list[str]:
    """The partition's real NVIDIA devices (UUIDs), or none for virtual devices."""
    if "nvidia" not in env.get("CHRONOS_DEVICE_KIND", ""):
        return []
    return [d for d in env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if d]


def engine(timeout: int = 60) -> docker.DockerClient:
    return docker.from_env(timeout=timeout)


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
