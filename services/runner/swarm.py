"""The Docker Swarm backend (the seed's platform): each job one service pinned to the worker's node.

Two engines, which are one on a single host:

- the runner's own engine (`DOCKER_HOST`, else the local socket), a node of the Swarm: the
  job's directory is bind-mounted from this host, its requirements volume is prepared here
  (a named local volume, which the task on this node mounts by name), the worker id's claim
  marker runs here, the job image is pulled here;
- the manager (`container.swarm_manager`, with TLS from `container.swarm_manager_tls`; empty:
  the own engine, which must then be a manager), through which services are created,
  inspected, followed, listed and removed, and nodes looked up: a worker node's engine
  cannot make services.

The job is pinned to `container.swarm_node` (ID or hostname; default: the own engine's
node). Setting `DOCKER_HOST` itself to a manager on another host (the older way) still runs
jobs without requirements on the configured node, but a job with requirements is refused
there: its volume would be prepared on the manager's engine, not on the node that runs it.

The service `cumulus-<job>-<attempt>` is created from the job image's ID (with a tag, Swarm
asks a registry first), or, when `container.image` is `<registry>/<name>@sha256:<digest>`,
from that reference as is (the node pulls it by digest; no tag is looked up), restart
condition none, placement `node.id==<the worker's node>`, the
partition's environment (NVIDIA_VISIBLE_DEVICES for the nvidia runtime), the job's labels
(with its stack's owner: a runner touches only its own stack's services, `claim.py`) and
the same isolation as the engine backend, except that Swarm has no `none` network: a job
without network is attached to an internal overlay network (no route to the host or out).
Swarm has no no-new-privileges option before API 1.46: the in-job runner sets it itself
(prctl, and `setpriv --no-new-privs` in the image's entrypoint).

Output is the service's log stream, which never ends by itself; the end is the task's state,
polled every POLL_S, or the in-job runner's end markers in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import (
    ContainerSpec,
    DriverConfig,
    Mount,
    Placement,
    Resources,
    RestartPolicy,
    TaskTemplate,
)

from services.runner import containers as ct
from services.runner import labels as lb
from services.runner import spec as sp
from services.runner.backend import Exit, Launch, Output
from services.runner.docker_engine import describe
from services.runner.logstream import LogStream
from shared.config import Config
from shared.errors import ConfigError
from shared.sizes import parse_size

POLL_S = 0.05
ENDED = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}


class SwarmBackend:
    name = "swarm"

    def __init__(self, config: Config, root: Path, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        self.client = sp.engine()
        """The runner's own engine: job directories, volumes, the claim, the image."""
        try:
            self.manager = sp.manager(config) or self.client
            """Where services are made and followed (`container.swarm_manager`)."""
        except BaseException:
            self.client.close()
            raise
        self.jobs = ct.Jobs(config, root, worker_id)
        own = self.client.info()["Swarm"]
        self.node = self._node(own)
        self.remote = self.node != str(own.get("NodeID", ""))
        """The jobs run on another node than the runner's own engine's (DOCKER_HOST is a
        manager on another host): nothing prepared on the own engine reaches them."""
        self.claim = self.jobs.claim(self.client)
        self._exits: dict[str, Exit] = {}
        self._pollers: dict[str, threading.Thread] = {}
        self._network_ready = False

    def _node(self, own: dict[str, Any]) -> str:
        """The worker's node ID, checked with the manager: a ConfigError (exit status 2, one
        line) when the own engine is in no Swarm, the manager cannot make services, or the
        node does not exist there."""
        separate = self.manager is not self.client
        if own.get("LocalNodeState") != "active":
            raise ConfigError(
                f"the Docker engine at {_where()} is not part of a Swarm: run docker swarm "
                "join on this host (docker swarm join-token worker on a manager prints the "
                "command)" + ("" if separate else ", or docker swarm init"),
                key="worker.backend",
            )
        if not self.manager.info()["Swarm"].get("ControlAvailable"):
            if separate:
                raise ConfigError(
                    f"container.swarm_manager {self.config.container.swarm_manager} is not a "
                    "Swarm manager (docker node ls there lists the managers)",
                    key="container.swarm_manager",
                )
            raise ConfigError(
                f"the Docker engine at {_where()} is a Swarm worker, and services are made "
                "through a manager: set container.swarm_manager to a manager's Docker API "
                "(with container.swarm_manager_tls; docs/deploy.md)",
                key="container.swarm_manager",
            )
        wanted = self.config.container.swarm_node or str(own["NodeID"])
        try:
            return str(self.manager.api.inspect_node(wanted)["ID"])
        except docker.errors.NotFound:
            raise ConfigError(
                f"no Swarm node {wanted!r} (ID or hostname) in the Swarm of {self._managed()}; "
                "docker node ls on a manager lists them",
                key="container.swarm_node",
            ) from None

    def _managed(self) -> str:
        """The manager the backend makes services through, as the user configured it."""
        return self.config.container.swarm_manager or _where()

    async def close(self) -> None:
        await asyncio.to_thread(self.claim.close)
        if self.manager is not self.client:
            self.manager.close()
        self.client.close()

    async def start(self, launch: Launch) -> str:
        return await asyncio.to_thread(self._start, launch)

    def _start(self, launch: Launch) -> str:
        name = lb.container_name(launch.job_id, launch.attempt)
        existing = self._service(name)
        if existing is not None:
            return existing
        if launch.requirements and self.remote:
            raise RuntimeError(
                "jobs with requirements need the runner's own Docker engine (DOCKER_HOST) on "
                "the node its jobs run on: their environment volume is prepared on that "
                f"engine, and {_where()} is not that node's; point DOCKER_HOST at this host's "
                "engine and container.swarm_manager at the manager (docs/deploy.md)"
            )
        prepared = self.jobs.prepare(self.client, launch)
        limit = parse_size(self.config.container.memory)
        resources = Resources(mem_limit=limit)
        resources["Limits"]["Pids"] = self.config.container.pids_limit
        tmp = Mount(
            "/tmp", None, type="tmpfs", tmpfs_size=parse_size(self.config.container.tmp_size)
        )
        spec = ContainerSpec(
            self.jobs.job_image(self.client, launch),
            args=["--job-dir", "/job"],
            env=sp.job_env(launch, self.config.container.image),
            workdir="/job",
            user=sp.JOB_USER,
            labels=self._labels(launch),
            mounts=[*prepared.mounts, tmp],
            read_only=True,
            cap_drop=["ALL"],
        )
        networks = None if sp.wants_network(launch) else [self._isolated_network()]
        template = TaskTemplate(
            spec,
            resources=resources,
            restart_policy=RestartPolicy(condition="none"),
            placement=Placement(constraints=[f"node.id=={self.node}"]),
            log_driver=DriverConfig("json-file", sp.log_options(self.config)),
            networks=networks,
        )
        try:
            created = self.manager.api.create_service(
                template,
                name=name,
                labels=self._labels(launch),
            )
        except docker.errors.APIError as exc:
            found = self._service(name) if exc.status_code == 409 else None
            if found is None:
                raise
            return found
        return str(created["ID"])

    def _labels(self, launch: Launch) -> dict[str, str]:
        return lb.labels(self.worker_id, launch.job_id, launch.attempt, self.jobs.owner)

    def _service(self, name: str) -> str | None:
        for service in self.manager.api.services(filters={"name": name}):
            if service["Spec"]["Name"] == name:
                ct.check_owner(self.jobs.owner, name, service["Spec"].get("Labels"))
                return str(service["ID"])
        return None

    def _isolated_network(self) -> str:
        name = self.config.container.swarm_network
        if not self._network_ready:
            if not self.manager.networks.list(names=[name]):
                with contextlib.suppress(docker.errors.APIError):  # made concurrently
                    self.manager.networks.create(
                        name,
                        driver="overlay",
                        internal=True,
                        attachable=False,
                        labels={"cumulus.network": "isolated"},
                    )
            self._network_ready = True
        return name

    def output(
        self, job_id: str, attempt: int, handle: str, nonce: str, cursor: dict[str, int]
    ) -> Output:
        return LogStream(self.manager, f"/services/{handle}/logs", nonce, cursor)

    def result_path(self, job_id: str, attempt: int) -> Path:
        # The job's directory is bind-mounted from this host: the service runs on its node.
        return self.jobs.result_path(job_id, attempt)

    async def exited(self, job_id: str, attempt: int, handle: str) -> Exit | None:
        if handle not in self._pollers:
            poller = threading.Thread(target=self._poll, args=(handle,), daemon=True)
            self._pollers[handle] = poller
            poller.start()
        return self._exits.get(handle)

    def _poll(self, handle: str) -> None:
        """Watch the service's task until it ends (the log stream never says so)."""
        while handle in self._pollers:
            try:
                tasks = self.manager.api.tasks(filters={"service": handle})
            except docker.errors.NotFound:
                tasks = None
            except Exception:
                time.sleep(POLL_S * 4)
                continue
            if tasks is None or (not tasks and self._service_gone(handle)):
                self._exits[handle] = Exit(None, "the job's service was removed from outside")
                return
            for task in tasks:
                status = task.get("Status", {})
                if status.get("State") in ENDED:
                    self._exits[handle] = self._exit(status)
                    return
            time.sleep(POLL_S)

    def _service_gone(self, handle: str) -> bool:
        try:
            self.manager.api.inspect_service(handle)
        except docker.errors.NotFound:
            return True
        return False

    def _exit(self, status: dict[str, Any]) -> Exit:
        state = status.get("State", "")
        code = status.get("ContainerStatus", {}).get("ExitCode")
        if state == "complete":
            return Exit(0, "the job's container exited with code 0")
        if code is not None and state == "failed" and code != 0:
            return Exit(int(code), describe(int(code), False, self.config))
        err = status.get("Err") or status.get("Message") or state
        return Exit(None, f"Swarm ended the job's task ({state}): {err}")

    async def kill(self, job_id: str, attempt: int, handle: str) -> None:
        await asyncio.to_thread(self._remove, job_id, attempt, handle)

    def _remove(self, job_id: str, attempt: int, handle: str | None) -> None:
        if handle:
            with contextlib.suppress(docker.errors.NotFound):
                self.manager.api.remove_service(handle)
        # Swarm removes the task's container 1-2.5 s after the service, on the node it ran
        # on; on the own engine (that node) we don't wait for it.
        wanted = lb.label_filter(self.worker_id, job_id, attempt)
        for container in self._own(self.client.api.containers(all=True, filters=wanted)):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                self.client.api.remove_container(container["Id"], force=True)

    async def cleanup(self, job_id: str, attempt: int) -> None:
        await asyncio.to_thread(self._cleanup, job_id, attempt)

    def _cleanup(self, job_id: str, attempt: int) -> None:
        for service in self._services(job_id, attempt):
            handle = str(service["ID"])
            self._pollers.pop(handle, None)
            self._exits.pop(handle, None)
            self._remove(job_id, attempt, handle)
        self._remove(job_id, attempt, None)
        self.jobs.dirs.remove(job_id, attempt)

    def _services(self, job_id: str | None = None, attempt: int | None = None) -> list[Any]:
        wanted = lb.label_filter(self.worker_id, job_id, attempt)
        found = self.manager.api.services(filters=wanted)
        return [s for s in found if lb.owned(s["Spec"].get("Labels"), self.jobs.owner)]

    def _own(self, containers: list[Any]) -> list[Any]:
        """The containers (as the low-level API lists them) this stack made."""
        return [c for c in containers if lb.owned(c.get("Labels"), self.jobs.owner)]

    async def held(self) -> list[tuple[str, int]]:
        def find() -> list[tuple[str, int]]:
            found = {lb.parse_labels(s["Spec"].get("Labels")) for s in self._services()}
            containers = self._own(
                self.client.api.containers(all=True, filters=lb.label_filter(self.worker_id))
            )
            found |= {lb.parse_labels(c.get("Labels")) for c in containers}
            return sorted({f for f in found if f is not None} | set(self.jobs.dirs.scan()))

        return await asyncio.to_thread(find)


def _where() -> str:
    """The engine the backend talks to, as the user configured it."""
    return os.environ.get("DOCKER_HOST") or "the local socket"
