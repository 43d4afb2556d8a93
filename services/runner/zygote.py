"""A warm fork server for the process backend: jobs start in milliseconds, not ~100 ms or more.

`python -m services.runner.zygote SOCKET RUNNER_PID [WARM_JSON]` imports everything a job needs
(the in-job runner, cloudpickle) once, then serves requests on a Unix socket: for each job
directory it starts the job's launcher (`services.runner.launcher`, its own session, so it and
the job outlive both the zygote and the runner) and answers with the launcher's pid. The
zygote exits when the runner that started it is gone (its pid is passed in: the runner may die
before the zygote first looks), or on request; launchers it started carry on.

Unsandboxed (`worker.sandbox: none`), the launcher is a fork of the zygote and so is the job:
no interpreter starts. A sandboxed job is a fresh interpreter in bwrap (~150 ms to start and
import), so with WARM_JSON the zygote keeps `spares` sandboxes warm: a spare is a launcher
forked from here that has leased its uid, made its directory and started the sandboxed in-job
runner, which does its imports and waits for a job (`job_image.runner --wait-fd`). A job a
spare can run (`sandbox.fits_spare`: no network, requirements or GPU devices, the start-up
variables unchanged) is handed to one, a ready one first: the spare acknowledges at once and
from then on the job is its own. It claims the job as any launcher would; once its sandbox is
ready it moves the job's files into the sandbox's directory and that directory into the
job's, and sends the job's environment; should the sandbox fail, it runs the job in a sandbox
of its own. Other jobs, and every job while no spare is left, get a launcher forked for them
alone. The zygote never waits for a sandbox to start.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Imported here so that every forked job starts with them loaded.
import cloudpickle  # noqa: F401

import job_image.runner  # noqa: F401
from services.runner import launcher, sandbox

POLL_S = 0.5
HAND_OVER_S = 2.0
"""How long the zygote waits for a spare to acknowledge a job (it answers at once)."""
READY_S = 60.0
"""How long a spare that was handed a job waits for its sandbox to be ready (normally done)."""
MAX_SPARE_FAILURES = 3
"""Spares that die unused, in a row, before the zygote stops keeping any."""


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _fork() -> int:
    """fork(), with every object this process holds frozen first (`gc.freeze`): a child's
    collections then never walk the inherited heap, so they neither cost its CPU nor copy its
    pages (copy on write: a collection writes to every object it visits)."""
    gc.freeze()
    return os.fork()


def _launch(job_dir: str, inherited: list[socket.socket]) -> int:
    pid = _fork()
    if pid:
        return pid
    code = 1
    try:
        for sock in inherited:
            sock.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = launcher.main([job_dir])
    finally:
        os._exit(code)


@dataclass
class _Held:
    """The zygote's end of one spare: its launcher's pid, its socket, whether it said ready."""

    pid: int
    conn: socket.socket
    ready: bool = False

    def poll(self) -> bool | None:
        """Ready now (True), still starting (False), or gone (None); never waits."""
        if self.ready:
            return True
        try:
            said = self.conn.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return None
        self.ready = said == b"ready"
        return True if self.ready else None


class Spares:
    """The warm sandboxes: each a spare launcher process and the zygote's end of its socket.

    A spare says `ready` once its sandboxed interpreter has done its imports. A job goes to
    a ready spare, else to one still starting (for at most HAND_OVER_S), else gets a launcher
    of its own.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.want: int = int(config.get("spares", 0))
        self.held: list[_Held] = []
        self.failures = 0

    def sockets(self) -> list[socket.socket]:
        return [spare.conn for spare in self.held]

    def fill(self, inherited: list[socket.socket]) -> None:
        while len(self.held) < self.want and self.failures < MAX_SPARE_FAILURES:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = _fork()
            if pid == 0:
                code = 1
                try:
                    for sock in [*inherited, *self.sockets(), ours]:
                        sock.close()
                    os.setsid()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    code = _spare(theirs, self.config)
                finally:
                    os._exit(code)
            theirs.close()
            self.held.append(_Held(pid, ours))

    def _pick(self) -> _Held | None:
        """A ready spare, else one still starting (it has a head start on a sandbox made
        now), taken out; spares found gone are dropped."""
        starting = None
        for spare in list(self.held):
            state = spare.poll()
            if state is None:
                self.held.remove(spare)
                spare.conn.close()
                self.failures += 1
            elif state:
                self.held.remove(spare)
                return spare
            elif starting is None:
                starting = spare
        if starting is not None:
            self.held.remove(starting)
        return starting

    def hand(self, job_dir: str) -> int | None:
        """The pid of the spare launcher that took the job; None: start one for it."""
        if not self.want:
            return None
        try:
            spec = json.loads((Path(job_dir) / "launch.json").read_text())
        except (OSError, ValueError):
            return None
        if not sandbox.fits_spare(spec, self.config["env"]):
            return None
        while (spare := self._pick()) is not None:
            try:
                spare.conn.settimeout(HAND_OVER_S)
                spare.conn.send(job_dir.encode())
                reply = spare.conn.recv(16)
                while reply == b"ready":
                    reply = spare.conn.recv(16)
            except OSError:  # gone, or too slow: whoever claims the job first runs it
                reply = b""
            spare.conn.close()
            if reply == b"got":
                self.failures = 0
                return spare.pid
            self.failures += 1
        return None

    def close(self) -> None:
        """Let every spare go: each sees its socket close and removes what it made."""
        for spare in self.held:
            spare.conn.close()
        self.held.clear()


def _spare(conn: socket.socket, config: dict[str, Any]) -> int:
    """A spare launcher: start a warm sandbox, wait for a job, then be that job's launcher."""
    box = sandbox.Sandbox.from_spec(config["sandbox"])
    lease = sandbox.Lease.take(box.own_users, f"spare-{os.getpid()}")
    home = Path(config["root"]) / f".spare-{os.getpid()}"
    own = home / "job"
    own.mkdir(mode=0o700, parents=True)
    if lease.uid is not None and lease.gid is not None:
        os.chown(own, lease.uid, lease.gid)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            conn.close()
            ours.close()
            # A group of its own: a sandbox still starting must be killed whole (bwrap's
            # inner half, mid-setup, would otherwise wait forever for its outer half).
            os.setpgid(0, 0)
            launcher.redirect(home)
            fd = theirs.detach()
            os.set_inheritable(fd, True)
            argv, _ = box.command(
                lease,
                [box.python, "-m", "job_image.runner", "--job-dir", sandbox.JOB_DIR]
                + ["--wait-fd", str(fd)],
                config["env"],
                job=own,
            )
            os.execve(box.bwrap, argv, {"PATH": os.defpath})
        finally:
            os._exit(1)
    # Set the group from this side too: a spare let go at once must not signal a group the
    # child has not made yet (its killpg would miss, and the sandbox would live on).
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    theirs.close()
    return _Spare(conn, home, pid, ours).run(lease)


class _Spare:
    """Inside a spare launcher: its warm sandbox (`pid`, talking on `sandboxed`) and home."""

    def __init__(self, conn: socket.socket, home: Path, pid: int, sandboxed: socket.socket) -> None:
        self.conn = conn
        self.home = home
        self.pid = pid
        self.sandboxed = sandboxed
        self.ready: bool | None = None
        """Whether the sandbox said ready; None until it has said anything."""

    def run(self, lease: sandbox.Lease) -> int:
        job_dir = self.wait()
        if job_dir is None:
            self.let_go()
            return 0
        spec = json.loads((job_dir / "launch.json").read_text())
        if not launcher.claim(job_dir, spec):  # another launcher has it
            self.let_go()
            return 0
        pid = self.pid
        try:
            if not self._ready() or os.waitpid(self.pid, os.WNOHANG)[0] != 0:
                raise OSError("the spare sandbox did not start")
            self.hand_over(job_dir, spec)
        except Exception as exc:  # claimed, so ours to run: in a sandbox of its own
            print(f"spare hand-over failed: {exc!r}", file=sys.stderr)
            self.end_sandbox()
            pid = os.fork()
            if pid == 0:
                launcher.child(job_dir, spec, lease)
        return launcher.finish(job_dir, spec, pid)

    def wait(self) -> Path | None:
        """Until a job is handed over (its directory; acknowledged at once), or this spare
        is let go or its sandbox fails before it had one (None). Meanwhile, tell the zygote
        when the sandbox is ready."""
        watch: list[socket.socket] = [self.conn, self.sandboxed]
        while True:
            readable, _, _ = select.select(watch, [], [])
            if self.sandboxed in readable:
                watch.remove(self.sandboxed)
                if not self._ready():
                    return None
                with contextlib.suppress(OSError):
                    self.conn.send(b"ready")
            if self.conn in readable:
                try:
                    message = self.conn.recv(4096)
                    self.conn.send(b"got")
                except OSError:
                    message = b""
                self.conn.close()
                return Path(message.decode()) if message else None

    def hand_over(self, job_dir: Path, spec: dict[str, Any]) -> None:
        """Make the ready sandbox the job's: its files in, the sandbox's directory moved to
        the job's (the sandbox's /job follows it, as do the output files it holds open), and
        the job's environment sent."""
        own, theirs = self.home / "job", job_dir / "job"
        owner = os.stat(own)
        for name in os.listdir(theirs):
            os.rename(theirs / name, own / name)
            os.chown(own / name, owner.st_uid, owner.st_gid)
        os.rmdir(theirs)
        os.rename(own, theirs)
        for name in ("stdout.log", "stderr.log"):
            os.rename(self.home / name, job_dir / name)
        os.rmdir(self.home)
        env = sandbox.job_env(spec["env"], None)
        self.sandboxed.sendall(json.dumps(env).encode() + b"\n")
        self.sandboxed.close()

    def let_go(self) -> None:
        """End the warm sandbox unused: told there is no job, it exits by itself."""
        if self.ready:
            self.sandboxed.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        else:
            self.end_sandbox()
        shutil.rmtree(self.home, ignore_errors=True)

    def end_sandbox(self) -> None:
        """Kill the sandbox whole, whatever it is doing (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # in whatever group it is
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        shutil.rmtree(self.home, ignore_errors=True)

    def _ready(self) -> bool:
        """Has the sandboxed interpreter said `ready` (its imports done, /job mounted)?
        Waits for it (at most READY_S) until it has said anything."""
        if self.ready is None:
            self.sandboxed.settimeout(READY_S)
            try:
                self.ready = self.sandboxed.recv(16) == b"ready\n"
            except OSError:
                self.ready = False
        return self.ready


def sweep(root: Path) -> None:
    """Remove spare directories left by a spare that was killed (not let go)."""
    for home in root.glob(".spare-*"):
        pid = home.name.rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(home, ignore_errors=True)


def serve(path: Path, parent: int, warm: dict[str, Any] | None = None) -> None:
    """Serve until `parent` (the runner) is gone: it may die before this process looks."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    server.settimeout(POLL_S)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    spares = Spares(warm or {})
    root = Path(warm["root"]) if warm else None
    if root is not None:
        sweep(root)
    spares.fill([server])
    while os.getppid() == parent:
        try:
            conn, _ = server.accept()
        except (TimeoutError, InterruptedError):
            if root is not None:  # a spare killed meanwhile leaves its directory behind
                sweep(root)
            continue
        with conn:
            conn.settimeout(5)
            request = conn.makefile("r").readline().strip()
            if request == "exit":
                break
            if not request:
                continue
            try:
                pid = spares.hand(request)
                if pid is None:
                    pid = _launch(request, [server, *spares.sockets()])
                conn.sendall(f"{pid}\n".encode())
            except OSError as exc:
                conn.sendall(f"error {exc}\n".encode())
        spares.fill([server])
    spares.close()
    if root is not None:
        sweep(root)
    server.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    warm = json.loads(Path(args[2]).read_text()) if len(args) > 2 else None
    serve(Path(args[0]), int(args[1]) if len(args) > 1 else os.getppid(), warm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
