"""The Docker engine backend: each job one hardened container (`containers.run`).

The container is named `cumulus-<job>-<attempt>` and labelled with the job and its stack's
owner, so a second start adopts the first and a restarted runner finds it, and never another
stack's (the worker id's claim on the engine: `claim.py`). Real NVIDIA partitions get GPU device
requests for exactly their devices (the nvidia runtime); virtual devices get none. Output is
the container's log stream; the exit comes from the engine's wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import DeviceRequest

from services.runner import containers as ct
from services.runner import labels as lb
from services.runner import spec as sp
from services.runner.backend import Exit, Launch, Output
from services.runner.logstream import LogStream
from shared.config import Config


class DockerBackend:
    name = "docker"

    def __init__(self, config: Config, root: Path, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        self.client = sp.engine()
        self.jobs = ct.Jobs(config, root, worker_id)
        self.claim = self.jobs.claim(self.client)
        self._exits: dict[str, Exit] = {}
        self._waiters: dict[str, threading.Thread] = {}
        self._killed: set[str] = set()

    async def close(self) -> None:
        await asyncio.to_thread(self.claim.close)
        self.client.close()

    async def start(self, launch: Launch) -> str:
        return await asyncio.to_thread(self._start, launch)

    def _start(self, launch: Launch) -> str:
        name = lb.container_name(launch.job_id, launch.attempt)
        with contextlib.suppress(docker.errors.NotFound):
            found = self.client.containers.get(name)
            ct.check_owner(self.jobs.owner, name, found.labels)
            if found.status == "created":
                found.start()
            return str(found.id)
        prepared = self.jobs.prepare(self.client, launch)
        devices = sp.nvidia_devices(launch.env)
        requests = (
            [DeviceRequest(driver="nvidia", device_ids=devices, capabilities=[["gpu"]])]
            if devices
            else []
        )
        try:
            container = self.client.containers.run(
                self.jobs.job_image(self.client, launch),
                ["--job-dir", "/job"],
                name=name,
                detach=True,
                environment=sp.job_env(launch, self.config.container.image),
                labels=lb.labels(self.worker_id, launch.job_id, launch.attempt, self.jobs.owner),
                mounts=prepared.mounts,
                working_dir="/job",
                network_mode="bridge" if sp.wants_network(launch) else "none",
                device_requests=requests,
                **sp.hardening(self.config),
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: a concurrent start made it; adopt that one
                raise
            found = self.client.containers.get(name)
            ct.check_owner(self.jobs.owner, name, found.labels)
            return str(found.id)
        return str(container.id)

    def output(
        self, job_id: str, attempt: int, handle: str, nonce: str, cursor: dict[str, int]
    ) -> Output:
        path = f"/containers/{handle}/logs"
        return LogStream(self.client, path, nonce, cursor, attach=handle)

    def result_path(self, job_id: str, attempt: int) -> Path:
        return self.jobs.result_path(job_id, attempt)

    async def exited(self, job_id: str, attempt: int, handle: str) -> Exit | None:
        if handle not in self._waiters:
            waiter = threading.Thread(target=self._wait, args=(handle,), daemon=True)
            self._waiters[handle] = waiter
            waiter.start()
        return self._exits.get(handle)

    def _wait(self, handle: str) -> None:
        """Block on the engine until the container ends; record how."""
        try:
            code = int(self.client.api.wait(handle, timeout=None)["StatusCode"])
            state = self.client.api.inspect_container(handle)["State"]
        except docker.errors.NotFound:
            self._exits[handle] = Exit(None, "the job's container was removed from outside")
            return
        except Exception as exc:
            self._exits[handle] = Exit(None, f"lost the job's container: {exc}")
            return
        self._exits[handle] = Exit(code, describe(code, bool(state.get("OOMKilled")), self.config))

    async def kill(self, job_id: str, attempt: int, handle: str) -> None:
        self._killed.add(handle)
        await asyncio.to_thread(self._remove, handle)

    def _remove(self, ref: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(ref, force=True)

    async def cleanup(self, job_id: str, attempt: int) -> None:
        await asyncio.to_thread(self._cleanup, job_id, attempt)

    def _cleanup(self, job_id: str, attempt: int) -> None:
        for container in self._containers(job_id, attempt):
            self._remove(str(container.id))
            self._exits.pop(str(container.id), None)
            self._waiters.pop(str(container.id), None)
        self.jobs.dirs.remove(job_id, attempt)

    def _containers(self, job_id: str | None = None, attempt: int | None = None) -> list[Any]:
        wanted = lb.label_filter(self.worker_id, job_id, attempt)
        found = self.client.containers.list(all=True, filters=wanted)
        return [c for c in found if lb.owned(c.labels, self.jobs.owner)]

    async def held(self) -> list[tuple[str, int]]:
        def find() -> list[tuple[str, int]]:
            found = {lb.parse_labels(c.labels) for c in self._containers()}
            return sorted({f for f in found if f is not None} | set(self.jobs.dirs.scan()))

        return await asyncio.to_thread(find)


def describe(code: int, oom: bool, config: Config) -> str:
    if oom:
        return (
            f"the job ran out of memory (limit {config.container.memory}) and was killed "
            f"(exit {code})"
        )
    if code == 137:
        return "the job's container was killed with SIGKILL (exit 137), from outside Cumulus"
    if code == 143:
        return "the job's container was stopped with SIGTERM (exit 143), from outside Cumulus"
    return f"the job's container exited with code {code}"
