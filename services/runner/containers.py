"""What the Docker engine and Swarm backends share: preparing a job's directory, mounts and
environment volume.

The job's directory is bind-mounted at `/job`; a job with requirements gets the environment
cache's volume (keyed by `jobdirs.requirements_key`) read-only at `/env`, installed once by a
short-lived container. The container itself is described in `spec.py`, its labels in
`labels.py`, its output read by `logstream.py`; the worker id's claim on the engine and the
stack's owner id are in `claim.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.types import Mount

from job_image.runner import RESULT_FILE
from services.runner.backend import Launch
from services.runner.claim import Claim, owner_id
from services.runner.jobdirs import JobDirs, requirements_key
from services.runner.labels import LABEL_ENV, LABEL_OWNER, LABEL_WORKER, owned
from services.runner.spec import hardening
from shared import volumes
from shared.config import Config
from shared.errors import ConfigError, InvalidArgument

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The job's directory on this host and what the container mounts."""

    job_dir: Path
    mounts: list[Mount]


class Jobs:
    """The job directories and the environment cache, shared by both container backends."""

    def __init__(self, config: Config, root: Path, worker_id: str) -> None:
        self.config = config
        self.root = root
        self.dirs = JobDirs(root / "jobs")
        self.worker_id = worker_id
        self.owner = owner_id(root)
        """This stack's owner label on everything made for its jobs (`labels.py`)."""
        self._env_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._image_id = ""

    def claim(self, client: docker.DockerClient) -> Claim:
        """Hold the worker id on the engine (`claim.py`); a ConfigError (exit status 2, one
        line) when another live stack holds it or the job image is missing."""
        try:
            image = self.image_id(client)
        except RuntimeError as exc:
            raise ConfigError(str(exc), key="container.image") from None
        held = Claim(client, self.worker_id, self.owner, image, self.config.data_path)
        held.take()
        return held

    def image_id(self, client: docker.DockerClient) -> str:
        """The job image's ID: Swarm then runs it without asking a registry first.

        An image given by digest (`<registry>/<name>@sha256:...`) is used as is: it names one
        image wherever it is pulled, so every node pulls exactly it and no tag is looked up.
        It is pulled here too when missing (the claim's marker runs it on this engine).
        """
        if not self._image_id:
            name = self.config.container.image
            if by_digest(name):
                self._image_id = _pulled(client, name)
                return self._image_id
            try:
                self._image_id = str(client.images.get(name).id)
            except docker.errors.ImageNotFound:
                raise RuntimeError(
                    f"the job image {name} is not on this engine; build it with "
                    "infra/images/build-images.sh (every node needs it: see docs/runner.md)"
                ) from None
        return self._image_id

    def job_image(self, client: docker.DockerClient, launch: Launch) -> str:
        """The image a job runs: its own (`image=`), taken from this engine only (no registry
        is asked), else the job image. InvalidArgument naming a missing image."""
        if not launch.image or launch.image == self.config.container.image:
            return self.image_id(client)
        try:
            return str(client.images.get(launch.image).id)
        except docker.errors.ImageNotFound:
            raise InvalidArgument(
                f"Image {launch.image} is not on this worker's Docker engine (no registry is "
                "asked): the operator builds it FROM the job image on every worker, or loads "
                "it there (docker load)",
                field="image",
            ) from None

    def result_path(self, job_id: str, attempt: int) -> Path:
        """The in-job runner's result file (`/job/<RESULT_FILE>` in the container)."""
        return self.dirs.path(job_id, attempt) / RESULT_FILE

    def prepare(self, client: docker.DockerClient, launch: Launch) -> Prepared:
        """Write the job's directory and get its environment ready; return the mounts."""
        job_dir = self.dirs.write(launch.job_id, launch.attempt, launch.package, launch.nonce)
        for path in (job_dir, job_dir / "package.zip", job_dir / ".nonce"):
            _give_to_job(path)
        mounts = [Mount("/job", str(job_dir), type="bind")]
        mounts += self._wheelhouse()
        offered = volumes.mounts(self.config.container.volumes, launch.volumes)
        mounts += [Mount(to, host, type="bind", read_only=ro) for host, to, ro in offered]
        if launch.requirements:
            volume = self.ensure_env(client, launch)
            mounts.append(Mount("/env", volume, type="volume", read_only=True))
        return Prepared(job_dir, mounts)

    def _wheelhouse(self) -> list[Mount]:
        path = self.config.container.wheelhouse
        if not path:
            return []
        return [Mount("/wheelhouse", str(Path(path).resolve()), type="bind", read_only=True)]

    def ensure_env(self, client: docker.DockerClient, launch: Launch) -> str:
        """The volume holding the job's requirements installed, prepared on first use.

        Keyed by the requirements' hash, so jobs with the same requirements share it. A
        short-lived container installs into it (from the mounted wheelhouse, or from the
        index with the default network, which the job itself never gets), then the job
        mounts it read-only: no job can change what the next one imports.
        """
        key = requirements_key(launch.requirements)
        name = f"cumulus-env-{key}"
        with self._lock:
            lock = self._env_locks.setdefault(key, threading.Lock())
        with lock:
            marker = self.root / "envs" / f"{key}.ready"
            try:
                client.volumes.get(name)
                if marker.exists():
                    return name
            except docker.errors.NotFound:
                client.volumes.create(name, labels={LABEL_ENV: key, LABEL_WORKER: self.worker_id})
            self._install(client, launch, name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("\n".join(launch.requirements))
            return name

    def _install(self, client: docker.DockerClient, launch: Launch, volume: str) -> None:
        env = {"CUMULUS_REQUIREMENTS": json.dumps(launch.requirements), "HOME": "/tmp"}
        if self.config.container.wheelhouse:
            env["CUMULUS_WHEELHOUSE"] = "/wheelhouse"
        started = time.monotonic()
        container = client.containers.run(
            self.image_id(client),
            ["--prepare", "/env/site"],
            detach=True,
            environment=env,
            mounts=[Mount("/env", volume, type="volume"), *self._wheelhouse()],
            labels={LABEL_ENV: requirements_key(launch.requirements), LABEL_WORKER: self.worker_id},
            network_mode="none" if self.config.container.wheelhouse else "bridge",
            **hardening(self.config),
        )
        try:
            code = int(container.wait(timeout=600)["StatusCode"])
            if code != 0:
                out = container.logs(stdout=True, stderr=True, tail=20).decode(errors="replace")
                raise RuntimeError(f"requirements could not be installed: {out.strip()}")
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        log.info(
            "environment prepared",
            extra={"fields": {"volume": volume, "seconds": round(time.monotonic() - started, 2)}},
        )


def by_digest(image: str) -> bool:
    """`repo@sha256:<hex>`: a reference to one image in a registry, not a tag or a local ID."""
    return "@sha256:" in image


def _pulled(client: docker.DockerClient, reference: str) -> str:
    """`reference` (by digest), pulled onto this engine first when it is not there."""
    try:
        client.images.get(reference)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(reference)
        except docker.errors.APIError as exc:
            raise RuntimeError(
                f"the job image {reference} could not be pulled: {exc.explanation or exc}; "
                "the engine must reach the registry (a plain-HTTP one listed in its "
                "insecure-registries: docs/deploy.md)"
            ) from None
    return reference


def check_owner(owner: str, name: str, found: dict[str, str] | None) -> None:
    """A job's container or service found by its name is adopted only if it is this stack's:
    another stack on the engine may have run a job with the same id (ids can be chosen)."""
    if not owned(found, owner):
        raise RuntimeError(
            f"{name} on this Docker engine belongs to another Cumulus stack (owner "
            f"{(found or {}).get(LABEL_OWNER)}); submit the job again under another job id"
        )


def _give_to_job(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        path.chmod(0o777 if path.is_dir() else 0o666)
