"""Which backend runs this worker's jobs: `worker.backend` = process | docker | swarm | auto."""

from __future__ import annotations

import logging
import typing
from pathlib import Path

from services.runner.backend import Backend
from services.runner.process import ProcessBackend
from shared.config import BackendKind, Config
from shared.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS: tuple[BackendKind, ...] = typing.get_args(BackendKind)


def detect(config: Config) -> str:
    """`docker` when an engine answers and holds the job image, else `process`."""
    kind, why = explain(config)
    if kind == "process" and why != NO_ENGINE:
        log.warning(
            "a Docker engine is reachable but the job image is missing; using the process "
            "backend (build it: infra/images/build-images.sh)",
            extra={"fields": {"image": config.container.image}},
        )
    return kind


NO_ENGINE = "no Docker engine answers"


def explain(config: Config) -> tuple[str, str]:
    """What `auto` resolves to here, and why, in words (`cumulus up` prints them)."""
    from services.runner.spec import engine, reachable

    image = config.container.image
    if not reachable():
        return "process", NO_ENGINE
    client = engine(timeout=5)
    try:
        client.images.get(image)
    except Exception:
        return "process", f"the Docker engine has no job image {image}"
    finally:
        client.close()
    return "docker", f"the Docker engine holds the job image {image}"


def make_backend(config: Config, root: Path, ledger: Path) -> Backend:
    kind: str = config.worker.backend
    if kind not in BACKENDS:  # load() refuses it; a Config built in code is checked here
        raise ConfigError(
            f"Invalid worker.backend: {kind!r}. Must be one of {', '.join(BACKENDS)}",
            key="worker.backend",
            allowed=BACKENDS,
        )
    if kind == "auto":
        kind = detect(config)
        log.info("runner backend detected", extra={"fields": {"backend": kind}})
    if kind == "docker":
        from services.runner.docker_engine import DockerBackend

        return DockerBackend(config, root, config.worker_id)
    if kind == "swarm":
        from services.runner.swarm import SwarmBackend

        return SwarmBackend(config, root, config.worker_id)
    return ProcessBackend(
        root / "jobs", ledger=ledger, sandbox=config.worker.sandbox, data_dir=config.data_path
    )
