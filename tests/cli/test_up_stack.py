"""`cumulus up` as an operator meets it: a second `up` on the same data dir or port is refused
and leaves the first alone; a nats-server killed under a running stack is restarted (loudly,
a bounded number of times) without the services flooding their logs; Ctrl-C stops the jobs
the stack runs, and a job that outlives its stack anyway dies when its partition expires.

Every `cumulus up` here runs as a process of its own, in its own $CUMULUS_HOME, and is
stopped by its pid."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cumulus import AsyncClient, package_function
from services.runner.backend import Launch
from services.runner.process import ProcessBackend
from services.stack import LOCK_FILE, Stack, free_port
from tests.conftest import StackFactory

CUMULUS = str(Path(sys.executable).parent / "cumulus")

pytestmark = pytest.mark.slow


class Up:
    """One `cumulus up` process: its output in a file, its profiles in its own home."""

    def __init__(self, tmp: Path, name: str, *args: str, home: Path | None = None) -> None:
        self.home = home or tmp / "home"
        self.env = {**os.environ, "CUMULUS_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        for key in ("CUMULUS_NATS_URL", "CUMULUS_PROFILE", "CUMULUS_CONFIG"):
            self.env.pop(key, None)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.log = tmp / f"{name}.log"
        self.args = args
        self.cwd = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path | None = None) -> Up:
        self.cwd = cwd or self.cwd
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [CUMULUS, "up", *self.args],
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, words: str, timeout: float = 90) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while words not in self.text:
            assert self.proc.poll() is None, self.text
            assert time.monotonic() < deadline, f"no {words!r} within {timeout} s: {self.text}"
            time.sleep(0.1)

    def ready(self) -> Up:
        self.wait_for("press Ctrl-C")
        return self

    def nats_pid(self) -> int:
        """The recorded nats-server's pid; 0 while there is no record."""
        try:
            return int(json.loads((self.home / "stack.json").read_text())["nats_pid"])
        except (OSError, ValueError, KeyError):
            return 0

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        """SIGINT, as Ctrl-C; SIGKILL if it does not end."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CUMULUS, *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[list[Up]]:
    made: list[Up] = []
    try:
        yield made
    finally:
        for up in reversed(made):
            up.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _holders(root: Path) -> list[str]:
    """Processes with a file open under `root` (pid and command)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            targets = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(t.startswith(f"{root}/") for t in targets):
            found.append(f"{proc.name} {command}")
    return found


def _until(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def _logs_size(data: Path) -> int:
    return sum(p.stat().st_size for p in (data / "logs").glob("*.log") if p.name != "nats.log")


JOB = "import sys\nprint('hello from', sys.argv[1:], flush=True)\n"


def test_a_second_up_on_the_same_data_dir_or_port_is_refused(tmp_path: Path, ups: list[Up]) -> None:
    port, data = free_port(), tmp_path / "data"
    first = Up(tmp_path, "first", "--port", str(port), "--data-dir", str(data))
    ups.append(first.start().ready())
    config = (data / "nats.conf").read_bytes()
    nats_pid = first.nats_pid()
    (tmp_path / "job.py").write_text(JOB)

    same_dir = Up(tmp_path, "same-dir", "--port", str(free_port()), "--data-dir", str(data))
    ups.append(same_dir.start())
    assert same_dir.wait() == 2, same_dir.text
    same_port = Up(tmp_path, "same-port", "--port", str(port), "--data-dir", str(tmp_path / "d2"))
    ups.append(same_port.start())
    assert same_port.wait() == 2, same_port.text

    for refused in (same_dir, same_port):
        assert "Traceback" not in refused.text, refused.text
        assert "press Ctrl-C" not in refused.text
        assert "stopping Cumulus" not in refused.text
    assert first.proc is not None
    assert (
        f"another Cumulus stack (pid {first.proc.pid}) runs on the data dir {data}: stop it "
        "first, or give this one another --data-dir" in same_dir.text
    )
    assert (
        f"port {port} is in use by the Cumulus stack in {data} (nats-server pid {nats_pid}): "
        "stop it first, or start this one with another --port" in same_port.text
    )
    assert not (tmp_path / "d2" / "nats.conf").exists()
    # Nothing of the first was touched: its server, its config, its record; it still serves.
    assert (data / "nats.conf").read_bytes() == config
    assert first.nats_pid() == nats_pid
    assert _alive(nats_pid)
    ran = first.cli("run", "--gpu", "0.1", "--duration", "60", "job.py", "x")
    assert ran.returncode == 0, ran.stderr
    assert "hello from ['x']" in ran.stdout
    assert first.stop() == 0, first.text


def test_a_killed_nats_server_is_restarted_on_the_same_store(tmp_path: Path, ups: list[Up]) -> None:
    port, data = free_port(), tmp_path / "data"
    up = Up(tmp_path, "up", "--port", str(port), "--data-dir", str(data))
    ups.append(up.start().ready())
    (tmp_path / "job.py").write_text(JOB)
    before = up.cli("submit", "--gpu", "0.1", "--duration", "60", "job.py", "before")
    assert before.returncode == 0, before.stderr
    job_before = before.stdout.strip()
    _until("the first job ends", lambda: "COMPLETED" in up.cli("status", job_before).stdout, 60)

    killed = up.nats_pid()
    assert killed > 0
    size = _logs_size(data)
    os.kill(killed, signal.SIGKILL)
    up.wait_for(f"restarted it on port {port} with the same store", timeout=15)
    assert f"nats-server (pid {killed}) died (killed by SIGKILL)" in up.text
    _until("the record names the new server", lambda: up.nats_pid() != killed, 10)
    # The services reconnect: a job submitted now runs; the one from before is still known.
    ran = up.cli("run", "--gpu", "0.1", "--duration", "60", "job.py", "after")
    assert ran.returncode == 0, ran.stderr
    assert "hello from ['after']" in ran.stdout
    status = up.cli("status", job_before)
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout
    grown = _logs_size(data) - size
    assert grown < 64 * 1024, f"the services' logs grew by {grown} bytes"
    assert up.stop() == 0, up.text


def test_a_nats_server_that_keeps_dying_stops_the_stack_loudly(
    tmp_path: Path, ups: list[Up]
) -> None:
    data = tmp_path / "data"
    up = Up(tmp_path, "up", "--port", str(free_port()), "--data-dir", str(data))
    ups.append(up.start().ready())
    for death in range(1, 7):
        pid = up.nats_pid()
        assert pid > 0, up.text
        os.kill(pid, signal.SIGKILL)
        if death <= 5:  # restarted, and recorded
            _until(f"restart {death}", lambda pid=pid: up.nats_pid() not in (0, pid), 15)
    assert up.wait(timeout=60) == 6, up.text
    assert "6 times within 60 s: not restarting it; the stack stops" in up.text
    assert "cannot be kept up" in up.text
    assert "Traceback" not in up.text
    _until("nothing of the stack is left", lambda: _holders(data) == [], 20)


def test_ctrl_c_stops_the_jobs_of_the_stack(tmp_path: Path, ups: list[Up]) -> None:
    data = tmp_path / "data"
    up = Up(tmp_path, "up", "--port", str(free_port()), "--data-dir", str(data))
    ups.append(up.start().ready())
    assert "stopping it (Ctrl-C) stops its jobs" in up.text
    (tmp_path / "sleeper.py").write_text(
        "import time\nprint('sleeping', flush=True)\ntime.sleep(300)\n"
    )
    submitted = up.cli("submit", "--gpu", "0.1", "--duration", "600", "sleeper.py")
    assert submitted.returncode == 0, submitted.stderr
    job_dir = data / "runner-worker-1" / "jobs" / f"{submitted.stdout.strip()}.1"
    _until(
        "the job runs",
        lambda: "sleeping" in _read(job_dir / "stdout.log") and (job_dir / "child.pid").exists(),
        60,
    )
    launcher = int((job_dir / "launcher.pid").read_text())
    child = int((job_dir / "child.pid").read_text())
    assert _alive(launcher)
    assert _alive(child)
    assert up.stop() == 0, up.text
    assert not _alive(child), "the job outlived its stack"
    assert not _alive(launcher)
    _until("nothing of the stack is left", lambda: _holders(data) == [], 20)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("sandbox", ["none", "bwrap"])
async def test_a_job_that_outlives_its_runner_dies_when_its_partition_expires(
    tmp_path: Path, sandbox: str
) -> None:
    # No runner watches this job (as after `kill -9` of up and its runner): its launcher does.
    backend = ProcessBackend(tmp_path / "jobs", sandbox=sandbox, data_dir=tmp_path)
    expires = time.time() + 3
    package = package_function(time.sleep, (300,))
    env = {"CHRONOS_PARTITION_EXPIRES_AT": str(int(expires)), "PYTHONUNBUFFERED": "1"}
    try:
        handle = await backend.start(Launch("j-expiring", 1, package, "n" * 32, env))
        began = time.time()
        ended = None
        while ended is None and time.time() < began + 30:
            await asyncio.sleep(0.1)
            ended = backend.exit_status("j-expiring", 1, handle)
        assert ended is not None, "the job ran on past its partition's expiry"
        assert time.time() < expires + 5
        assert ended.code in (-9, 128 + 9), ended
        stderr = (backend.job_dir("j-expiring", 1) / "stderr.log").read_text()
        assert "the job ran past its partition's expiry" in stderr
    finally:
        await backend.close()


async def test_stopping_a_stack_object_kills_its_jobs_and_frees_its_data_dir(
    make_stack: StackFactory,
) -> None:
    stack: Stack = await make_stack()
    async with AsyncClient(profile=stack.profile()) as client:
        job = await client.submit(time.sleep, 300, gpu=0.1, duration=600)
        job_dir = stack.data_dir / "runner-worker-1" / "jobs" / f"{job.job_id}.1"
        deadline = time.monotonic() + 60
        while not (job_dir / "child.pid").exists():
            assert time.monotonic() < deadline, "the job did not start"
            await asyncio.sleep(0.1)
        child = int((job_dir / "child.pid").read_text())
    stack.stop()
    assert not _alive(child)
    assert _lock_free(stack.data_dir / LOCK_FILE)


def _lock_free(path: Path) -> bool:
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


async def test_the_services_do_not_flood_their_logs_while_the_bus_is_away(
    make_stack: StackFactory,
) -> None:
    stack: Stack = await make_stack()
    size = _logs_size(stack.data_dir)
    stack.kill9("nats")  # on purpose: the watchdog leaves it down
    await asyncio.sleep(6)
    grown = _logs_size(stack.data_dir) - size
    # Each service tries to reconnect four times a second; each failure is logged at most
    # once per 10 s (it was each time: ~20 KB/s for the stack).
    assert grown < 8 * 1024, f"the services' logs grew by {grown} bytes in 6 s"
    stack.restart("nats")
    await stack.wait_ready()
    async with AsyncClient(profile=stack.profile()) as client:
        assert await client.run(sum, [1, 2, 3], gpu=0.1, duration=60, logs=None) == 6


def test_an_up_killed_with_sigkill_leaves_its_data_dir_locked_while_its_processes_run(
    tmp_path: Path, ups: list[Up]
) -> None:
    data = tmp_path / "data"
    killed = Up(tmp_path, "killed", "--port", str(free_port()), "--data-dir", str(data))
    ups.append(killed.start().ready())
    assert killed.proc is not None
    lock = data / LOCK_FILE
    try:
        killed.proc.kill()  # its nats-server and services run on, orphaned
        killed.proc.wait(timeout=10)
        orphans = _holders_of(lock)
        assert orphans, "nothing of the stack outlived its up: nothing to test"
        # Even on another port, a second stack must not share their store and logs.
        again = Up(tmp_path, "again", "--port", str(free_port()), "--data-dir", str(data))
        ups.append(again.start())
        assert again.wait() == 2, again.text
        assert (
            f"processes of a Cumulus stack whose `cumulus up` (pid {killed.proc.pid}) ended "
            f"without stopping them still run on the data dir {data}: stop them (kill "
            in again.text
        )
        assert "Traceback" not in again.text
    finally:
        for pid in _holders_of(lock):
            os.kill(pid, signal.SIGKILL)
    _until("the orphans are gone", lambda: not _holders_of(lock), 20)
    # A process killed is gone from /proc's fd tables a moment before the kernel drops its
    # flock (its files are released at the end of its exit): the lock frees within a bound.
    _until("the lock is free", lambda: _lock_free(lock), 5)


def _holders_of(path: Path) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                    found.add(int(proc.name))
            except OSError:
                continue
    return found
