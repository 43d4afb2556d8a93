"""Which backend runs this worker's jobs: `worker.backend` = process | docker | swarm | auto."""

from __future__ import annotations

import logging
from pathlib import Path

from services.runner.backend import Backend
from services.runner.process import ProcessBackend
from shared.config import Config
from shared.errors import InvalidArgument

log = logging.getLogger(__name__)

BACKENDS = ("process", "docker", "swarm", "auto")


def detect(config: Config) -> str:
    """`docker` when an engine answers and holds the job image, else `process`."""
    from services.runner import containers

    if not containers.reachable():
        return "process"
    client = containers.engine(timeout=5)
    try:
        client.images.get(config.container.image)
    except Exception:
        log.warning(
            "a Docker engine is reachable but the job image is missing; using the process "
            "backend (build it: infra/images/build-images.sh)",
            extra={"fields": {"image": config.container.image}},
        )
        return "process"
    finally:
        client.close()
    return "docker"


def make_backend(config: Config, root: Path, ledger: Path) -> Backend:
    kind = config.worker.backend
    if kind not in BACKENDS:
        raise InvalidArgument(
            f"Invalid worker.backend: {kind!r}. Must be one of {', '.join(BACKENDS)}"
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
    return ProcessBackend(root / "jobs", ledger=ledger)
