"""The process backend: each job in its own directory and process session, no engine needed.

The embedded default on machines without Docker. A job is the in-job runner under
`services.runner.launcher`, which survives a runner crash; the runner re-adopts it from the
job directory (launcher.pid, stdout.log, stderr.log, exit.json) after a restart. Launchers are
forked by a warm zygote (services/runner/zygote.py), or started as a process of their own if
the zygote cannot be reached.

Each job is sandboxed (`worker.sandbox: bwrap`, services/runner/sandbox.py): its own uid,
namespaces and filesystem, where it sees only `job/` inside its directory (package, nonce,
work); the launcher's files beside it (pid, exit, output) stay out of its reach. The runner
checks the sandbox when it starts and refuses to start without it unless the operator opted
in to unsandboxed jobs (`worker.sandbox: none`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from job_image.runner import RESULT_FILE
from services.runner import zygote as zygote_mod
from services.runner.backend import Exit, FileOutput, Launch, Output
from services.runner.jobdirs import PACKAGE, JobDirs, place_package, requirements_key
from services.runner.sandbox import Sandbox, warm_env
from shared.errors import ConfigError, InvalidArgument

log = logging.getLogger(__name__)

LAUNCHED = "launched"
"""Created exclusively by the one launcher that runs a job (see services/runner/launcher.py)."""
SPARES = 2
"""Sandboxes the zygote keeps warm, each waiting for a job (services/runner/zygote.py)."""


class ProcessBackend:
    name = "process"

    def __init__(
        self,
        root: Path,
        ledger: Path | None = None,
        zygote: bool = True,
        sandbox: str = "bwrap",
        data_dir: Path | None = None,
    ) -> None:
        """`sandbox` is `worker.sandbox`; `data_dir`, hidden from jobs, defaults to `root`.

        Raises ConfigError when the sandbox is asked for but cannot work here.
        """
        self.root = root
        self.sandbox = _sandbox(sandbox, data_dir or root)
        self.dirs = JobDirs(root)
        self.ledger = ledger
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._use_zygote = zygote
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_dir: str | None = None
        self._zygote_lock = threading.Lock()
        self._ended: dict[str, asyncio.Event] = {}
        self._notify: socket.socket | None = None
        self._notify_path: str | None = None

    def job_dir(self, job_id: str, attempt: int) -> Path:
        return self.dirs.path(job_id, attempt)

    async def start(self, launch: Launch) -> str:
        """Start the job, or return the handle of the one a crashed runner already started."""
        notify = await self._listen()
        return await asyncio.to_thread(self._start, launch, notify)

    def _spec(self, launch: Launch, notify: str | None) -> dict[str, object]:
        """launch.json: what the job's launcher needs."""
        env = dict(launch.env)
        deps = None
        if launch.requirements:
            # The environment cache: jobs with the same requirements share one install.
            deps = str(self.root.parent / "envs" / requirements_key(launch.requirements))
            if self.sandbox is None:
                env["CUMULUS_DEPS_DIR"] = deps
        job_dir = self.job_dir(launch.job_id, launch.attempt)
        spec: dict[str, object] = {
            "job_id": launch.job_id,
            "env": env,
            "cwd": str(job_dir),
            "ledger": str(self.ledger) if self.ledger else None,
            "notify": notify,
        }
        if self.sandbox is not None:
            # launch.network is the runner's decision (services/runner/spec.py wants_network).
            spec["sandbox"] = self.sandbox.spec(network=launch.network, deps=deps)
        return spec

    def _start(self, launch: Launch, notify: str | None = None) -> str:
        if launch.volumes:
            raise InvalidArgument(
                "Volumes are mounted by the docker and swarm backends only; this worker runs "
                "jobs as processes (worker.backend)",
                field="volumes",
            )
        job_dir = self.job_dir(launch.job_id, launch.attempt)
        pid_file = job_dir / "launcher.pid"
        if pid_file.exists():
            return pid_file.read_text().strip()
        if (job_dir / LAUNCHED).exists():
            # A crashed runner's launcher won the job and is about to record its pid.
            return self._launcher_pid(job_dir)
        # The launcher's files are its own (0700); the job gets `job/` alone.
        job_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        own = job_dir / "job"
        own.mkdir(mode=0o700, exist_ok=True)
        place_package(launch.package, own / PACKAGE)
        (own / ".nonce").write_text(launch.nonce)
        (job_dir / "launch.json").write_text(json.dumps(self._spec(launch, notify)))
        pid = self._fork_launcher(job_dir) if self._use_zygote else None
        if pid is None:
            with open(job_dir / "launcher.log", "ab") as launcher_log:  # the child keeps a copy
                proc = subprocess.Popen(
                    [sys.executable, "-m", "services.runner.launcher", str(job_dir)],
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=launcher_log,
                )
            self._children[proc.pid] = proc
        # The launcher that won the job's LAUNCHED marker records its pid: if a crashed runner
        # had already asked for one, that one may be the winner and this one steps aside.
        return self._launcher_pid(job_dir)

    def _launcher_pid(self, job_dir: Path, timeout: float = 30.0) -> str:
        pid_file = job_dir / "launcher.pid"
        deadline = time.monotonic() + timeout
        wait = 0.001
        while not pid_file.exists():
            if time.monotonic() > deadline:
                raise OSError(f"no launcher recorded its pid in {job_dir} within {timeout:.0f} s")
            # Backing off: under a burst launchers take a while, and each look costs a thread
            # wake-up that competes with the event loop for the GIL.
            time.sleep(wait)
            wait = min(wait * 2, 0.016)
        return pid_file.read_text().strip()

    def _fork_launcher(self, job_dir: Path) -> int | None:
        """The launcher's pid, forked by the zygote; None if the zygote cannot do it."""
        try:
            path = self._zygote_socket()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5)
                conn.connect(path)
                conn.sendall(f"{job_dir}\n".encode())
                reply = conn.makefile("r").readline().strip()
            return int(reply)
        except (OSError, ValueError) as exc:
            log.warning(
                "zygote unavailable; starting a launcher process",
                extra={"fields": {"error": repr(exc)}},
            )
            return None

    def _zygote_socket(self) -> str:
        with self._zygote_lock:
            if self._zygote is None or self._zygote.poll() is not None:
                # Unix socket paths are short (108 bytes): keep it out of deep data dirs.
                self._zygote_dir = self._zygote_dir or tempfile.mkdtemp(prefix="cumulus-z-")
                path = os.path.join(self._zygote_dir, "zygote.sock")
                self.root.mkdir(parents=True, exist_ok=True)
                argv = [sys.executable, "-m", "services.runner.zygote", path, str(os.getpid())]
                if self.sandbox is not None:
                    argv.append(self._warm_config(self._zygote_dir))
                with open(self.root / "zygote.log", "ab") as zlog:
                    self._zygote = subprocess.Popen(
                        argv,
                        start_new_session=True,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=zlog,
                    )
                deadline = time.monotonic() + 10
                while not os.path.exists(path):
                    if self._zygote.poll() is not None or time.monotonic() > deadline:
                        raise OSError("the zygote did not start; see zygote.log")
                    time.sleep(0.01)
            assert self._zygote_dir is not None
            return os.path.join(self._zygote_dir, "zygote.sock")

    def _warm_config(self, where: str) -> str:
        """The zygote's spare sandboxes: how to make them, and how many (a file's path)."""
        assert self.sandbox is not None
        config = {
            "sandbox": self.sandbox.spec(network=False, deps=None),
            "root": str(self.root),
            "spares": SPARES,
            "env": warm_env(os.environ),
        }
        path = os.path.join(where, "warm.json")
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    async def close(self) -> None:
        """Stop the zygote (jobs it started carry on)."""
        if self._notify is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._notify.close()
            self._notify = None
        zygote, self._zygote = self._zygote, None
        if zygote is not None and zygote.poll() is None:
            zygote.terminate()
            await asyncio.to_thread(zygote.wait, 5)
        if zygote is not None:
            # Its spares see their socket close and remove what they made; a spare that died
            # first (killed) cannot: its directory goes here, briefly waited for.
            for _ in range(40):
                if not any(self.root.glob(".spare-*")):
                    break
                await asyncio.sleep(0.05)
            zygote_mod.sweep(self.root)
        if self._zygote_dir:
            shutil.rmtree(self._zygote_dir, ignore_errors=True)

    def result_path(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id, attempt) / "job" / RESULT_FILE

    def output_paths(self, job_id: str, attempt: int) -> dict[str, Path]:
        job_dir = self.job_dir(job_id, attempt)
        return {"stdout": job_dir / "stdout.log", "stderr": job_dir / "stderr.log"}

    def output(
        self, job_id: str, attempt: int, handle: str, nonce: str, cursor: dict[str, int]
    ) -> Output:
        ended = self._ended.setdefault(str(self.job_dir(job_id, attempt)), asyncio.Event())
        return FileOutput(self.output_paths(job_id, attempt), cursor, ended)

    async def _listen(self) -> str | None:
        """The datagram socket launchers report their job's exit to (a job directory each)."""
        if self._notify_path is not None:
            return self._notify_path
        self._zygote_dir = self._zygote_dir or tempfile.mkdtemp(prefix="cumulus-z-")
        path = os.path.join(self._zygote_dir, "exits.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._exits, sock)
        except (OSError, NotImplementedError) as exc:
            sock.close()
            log.warning("no exit reports; polling only", extra={"fields": {"error": repr(exc)}})
            return None
        self._notify = sock
        self._notify_path = path
        return path

    def _exits(self, sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                data = sock.recv(4096)
                self._ended.setdefault(data.decode(errors="replace"), asyncio.Event()).set()

    async def exited(self, job_id: str, attempt: int, handle: str) -> Exit | None:
        return self.exit_status(job_id, attempt, handle)

    def exit_status(self, job_id: str, attempt: int, handle: str) -> Exit | None:
        """How the job ended, or None while it runs."""
        job_dir = self.job_dir(job_id, attempt)
        exit_file = job_dir / "exit.json"
        pid = int(handle)
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            self._children.pop(pid, None)
        if exit_file.exists():
            code = int(json.loads(exit_file.read_text())["code"])
            return Exit(code=code, reason=_describe(code))
        if not job_dir.exists() or not _alive(pid):
            return Exit(code=None, reason="the job's process disappeared (killed from outside?)")
        return None

    async def kill(self, job_id: str, attempt: int, handle: str) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(handle), signal.SIGKILL)
        child = self._children.pop(int(handle), None)
        if child is not None:
            child.wait(timeout=5)

    async def cleanup(self, job_id: str, attempt: int) -> None:
        # A job found after a crash may still run: its process session goes with its directory.
        pid_file = self.job_dir(job_id, attempt) / "launcher.pid"
        with contextlib.suppress(OSError, ValueError):
            handle = pid_file.read_text().strip()
            if _alive(int(handle)):
                await self.kill(job_id, attempt, handle)
            child = self._children.pop(int(handle), None)
            if child is not None:
                await asyncio.to_thread(child.wait, 5)
        self._ended.pop(str(self.job_dir(job_id, attempt)), None)
        self.dirs.remove(job_id, attempt)

    async def held(self) -> list[tuple[str, int]]:
        return self.handles()

    def handles(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every job directory present, for reconciling after a crash."""
        return self.dirs.scan()


def stop_jobs(root: Path, why: str, grace: float = 5.0) -> list[str]:
    """Kill every job still running under `root`, a process backend's job directories: the
    stack that runs them is stopping (a job outliving it would run on unwatched).

    `why` goes to each job's stderr. The job's process is killed first, so that its launcher
    records the exit (`exit.json`, read by the runner now or at its next start); then the
    launcher's whole process group. Returns the job directories' names."""
    running: list[tuple[Path, int]] = []
    for job_dir in sorted(root.glob("*.*")):
        pid = _launcher_of(job_dir)
        if pid is None:
            continue
        with contextlib.suppress(OSError), open(job_dir / "stderr.log", "a") as err:
            err.write(f"[cumulus] {why}\n")
        with contextlib.suppress(OSError, ValueError):
            child = int((job_dir / "child.pid").read_text().strip())
            if _parent(child) == pid:
                os.kill(child, signal.SIGKILL)
        running.append((job_dir, pid))
    deadline = time.monotonic() + grace
    for job_dir, pid in running:
        while not (job_dir / "exit.json").exists() and _alive(pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return [job_dir.name for job_dir, _ in running]


def _launcher_of(job_dir: Path) -> int | None:
    """The pid of the launcher still running the job in `job_dir`, checked to be one (a
    session leader running services.runner code), not a process that reused the pid."""
    try:
        pid = int((job_dir / "launcher.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        leader = os.getsid(pid) == pid
    except (OSError, ValueError):
        return None
    if (job_dir / "exit.json").exists() or not _alive(pid) or not leader:
        return None
    return pid if b"services.runner" in cmdline else None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _sandbox(kind: str, data_dir: Path) -> Sandbox | None:
    if kind == "none":
        log.warning(
            "worker.sandbox is none: jobs run unsandboxed, as this runner's user, and can read "
            "and signal what it can (install bubblewrap and set worker.sandbox: bwrap)"
        )
        return None
    if kind != "bwrap":
        raise ConfigError(
            f"Invalid worker.sandbox: {kind!r}. Must be one of bwrap, none",
            key="worker.sandbox",
            allowed=("bwrap", "none"),
        )
    sandbox = Sandbox.detect(hide=[data_dir])
    sandbox.self_test()
    return sandbox


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # ProcessLookupError: it went between the open and the read
        return False
    return state not in ("Z", "X")


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the job's process was killed by {name}"
    if 128 < code < 128 + signal.NSIG:
        # bwrap reports a job killed by a signal as 128 + the signal, as shells do.
        with contextlib.suppress(ValueError):
            name = signal.Signals(code - 128).name
            return f"the job's process exited with code {code} (killed by {name}?)"
    return f"the job's process exited with code {code}"
