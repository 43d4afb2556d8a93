"""The process backend's sandbox (bubblewrap), attacked from inside a job.

Real bwrap, the real process backend, real processes, a real SQLite file and a real listening
port: a hostile job looks for the bus in other processes' environments, reads the services'
data and another job's directory, forges the other job's output, signals it and connects to
the host; each attempt fails and the victim finishes with its own result. Also: per-job users,
cleanup on kill, the shared requirements environment, the network switch, and the runner's
refusal to start without bwrap (or its explicit opt-in to unsandboxed jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cumulus import package_function
from job_image.runner import end_marker, parse_frame
from services.runner import sandbox
from services.runner.backend import Exit, Launch
from services.runner.process import ProcessBackend
from shared.errors import ConfigError
from tests.runner.conftest import make_wheel

ROOT = Path(__file__).resolve().parents[2]

RUNNER_ENV = {
    **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")},
    "PYTHONUNBUFFERED": "1",
}
"""What the runner gives every job of its own (services/runner/handlers.py)."""
COLD = {"PYTHONHASHSEED": "0"}
"""A variable read at interpreter start: such a job gets a sandbox of its own, not a spare."""

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="bubblewrap sandboxes are Linux namespaces"
)


@pytest.fixture(scope="module", autouse=True)
def _bwrap() -> None:
    """bubblewrap is part of the worker's set-up (infra/ci/setup-sandbox.sh); CI must have it."""
    import shutil

    if shutil.which("bwrap") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("bubblewrap needed in CI: sudo infra/ci/setup-sandbox.sh")
        pytest.skip("bubblewrap not installed (sudo infra/ci/setup-sandbox.sh)")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory as the stack keeps it: a service's SQLite file, the runner's jobs."""
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "gateway.sqlite")
    db.execute("CREATE TABLE secrets (nonce TEXT)")
    db.execute("INSERT INTO secrets VALUES ('the-victims-nonce')")
    db.commit()
    db.close()
    return data


@pytest.fixture
async def backend(data_dir: Path) -> AsyncIterator[ProcessBackend]:
    made = ProcessBackend(
        data_dir / "runner-w" / "jobs", ledger=data_dir / "launches.log", data_dir=data_dir
    )
    assert made.sandbox is not None
    yield made
    for job_id, attempt in await made.held():
        await made.cleanup(job_id, attempt)
    await made.close()


@pytest.fixture(params=["warm", "cold"])
def start_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Jobs handed to a warm spare sandbox, or started in a sandbox of their own."""
    return {} if request.param == "warm" else dict(COLD)


@pytest.fixture
def listener() -> Iterator[int]:
    """A port listening on the host's loopback, as nats-server's would."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def service(data_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running process with a service's environment: the bus URL and the data dir."""
    env = {
        "PATH": os.defpath,
        "CUMULUS_NATS_URL": "nats://127.0.0.1:4222",
        "CUMULUS_DATA_DIR": str(data_dir),
    }
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env)
    yield proc
    proc.kill()
    proc.wait(timeout=10)


@dataclass
class Job:
    backend: ProcessBackend
    job_id: str = field(default_factory=lambda: f"s{secrets.token_hex(5)}")
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    handle: str = ""
    lines: list[tuple[str, str]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    exit: Exit | None = None
    cursor: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.backend.job_dir(self.job_id, 1)

    async def start(
        self,
        func: Any,
        *args: Any,
        network: bool = False,
        requirements: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Job:
        launch = Launch(
            job_id=self.job_id,
            attempt=1,
            package=package_function(func, args),
            nonce=self.nonce,
            env={**RUNNER_ENV, **(env or {})},
            requirements=list(requirements),
            network=network,
        )
        self.handle = await self.backend.start(launch)
        return self

    async def follow(self, timeout: float = 60, until: str | None = None) -> Job:
        """Read the output like the runner does, to the end (or to a line starting `until`)."""
        out = self.backend.output(self.job_id, 1, self.handle, self.nonce, self.cursor)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.exit is None:
                    self.exit = await self.backend.exited(self.job_id, 1, self.handle)
                final = self.exit is not None
                got = await out.read(final)
                for name, text in got:
                    framed = parse_frame(text, self.nonce) if name == "stdout" else None
                    if framed is not None:
                        self.result = framed[1]
                    elif text != end_marker(self.nonce):
                        self.lines.append((name, text))
                self.cursor = out.cursor()
                if until is not None and any(t.startswith(until) for _, t in self.lines):
                    return self
                if final and out.done:
                    return self
                if not got:
                    await out.wait(0.02)
        finally:
            out.close()
        raise TimeoutError(f"job {self.job_id} did not end in {timeout} s: {self.lines[-5:]}")

    def value(self) -> Any:
        assert self.result is not None, self.lines
        assert self.result["ok"], self.result
        return self.result["data"]

    def stdout(self) -> list[str]:
        return [t for n, t in self.lines if n == "stdout"]


# -- the jobs (shipped by value: they import what they use) ---------------------------------


def victim(seconds: float) -> str:
    import time as t

    print("victim started", flush=True)
    t.sleep(seconds)
    return "victim's own result"


def hostile(victim_dir: str, victim_pids: list[int], db: str, port: int) -> dict[str, Any]:
    """Everything finding 3 of issue 10 did as a job, and what became of each attempt."""
    import glob
    import os
    import signal
    import socket

    seen: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid()}
    leaks = []
    for path in glob.glob("/proc/*/environ"):
        try:
            with open(path, "rb") as f:
                if b"CUMULUS_NATS_URL" in f.read() or b"CUMULUS_DATA_DIR" in f.read():
                    leaks.append(path)
        except OSError:
            pass
    seen["environ_leaks"] = leaks
    seen["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())

    def attempt(name: str, action: Any) -> None:
        try:
            action()
            seen[name] = "done"
        except OSError as exc:
            seen[name] = type(exc).__name__

    def read(path: str) -> None:
        with open(path, "rb") as f:
            f.read(16)

    def append(path: str) -> None:
        with open(path, "a") as f:
            f.write("forged line\n")

    attempt("read_db", lambda: read(db))
    attempt("list_data_dir", lambda: os.listdir(os.path.dirname(db)))
    attempt("list_victim", lambda: os.listdir(victim_dir))
    attempt("read_victim_package", lambda: read(os.path.join(victim_dir, "job", "package.zip")))
    attempt("forge_output", lambda: append(os.path.join(victim_dir, "stdout.log")))
    attempt("forge_exit", lambda: append(os.path.join(victim_dir, "exit.json")))
    for pid in victim_pids:
        attempt(f"killpg {pid}", lambda pid=pid: os.killpg(pid, signal.SIGKILL))
        attempt(f"kill {pid}", lambda pid=pid: os.kill(pid, signal.SIGKILL))
    attempt("connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=3).close())
    return seen


def whoami() -> dict[str, Any]:
    import os
    import time as t

    print(f"uid {os.getuid()}", flush=True)
    t.sleep(1.0)
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}


def sleeper(seconds: float) -> None:
    import os
    import time as t

    print(f"sleeping as {os.getuid()}", flush=True)
    t.sleep(seconds)


def connect(port: int) -> str:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        return type(exc).__name__
    return "connected"


def probe_requirements() -> dict[str, Any]:
    import os

    import cumulus_probe

    where = os.path.dirname(cumulus_probe.__file__)
    try:
        with open(os.path.join(where, "__init__.py"), "a") as f:
            f.write("VALUE = 666\n")
        poisoned = "written"
    except OSError as exc:
        poisoned = type(exc).__name__
    return {"value": cumulus_probe.VALUE, "where": where, "poison": poisoned}


def add(a: int, b: int) -> int:
    return a + b


def ordinary() -> dict[str, Any]:
    """What jobs do that the sandbox must leave working."""
    import getpass
    import multiprocessing
    import os
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w") as f:
        f.write("scratch")
    with open(os.path.expanduser("~/.cache-probe"), "w") as f:
        f.write("home")
    with open("result.txt", "w") as f:  # the working directory: /job/work
        f.write("kept")
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(abs, [-1, -2, -3])
    return {
        "user": getpass.getuser(),
        "squares": squares,
        "shell": subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True).stdout,
        "cwd": os.getcwd(),
    }


# -- the attack ------------------------------------------------------------------------------


def _uids(uid: int) -> list[int]:
    """Host processes running as `uid`."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                found.append(int(status.parent.name))
    return found


async def test_a_hostile_job_cannot_reach_the_services_or_another_job(
    backend: ProcessBackend,
    data_dir: Path,
    listener: int,
    service: subprocess.Popen[bytes],
    start_env: dict[str, str],
) -> None:
    victim_job = await Job(backend).start(victim, 4.0, env=start_env)
    await victim_job.follow(until="victim started")
    pids = [int(victim_job.handle), int((victim_job.dir / "child.pid").read_text())]
    attacker = await Job(backend).start(
        hostile,
        str(victim_job.dir),
        pids,
        str(data_dir / "gateway.sqlite"),
        listener,
        env=start_env,
    )
    seen = (await attacker.follow()).value()

    assert seen["environ_leaks"] == []  # the services' environment is out of sight
    assert len(seen["processes"]) <= 3, seen["processes"]  # its own PID namespace
    assert seen["uid"] != 0
    assert seen["gid"] != 0
    if os.geteuid() == 0:
        assert sandbox.UID_BASE <= seen["uid"] < sandbox.UID_BASE + sandbox.UID_COUNT
    refused = {"FileNotFoundError", "PermissionError"}
    for attack in (
        "read_db",
        "list_data_dir",
        "list_victim",
        "read_victim_package",
        "forge_output",
        "forge_exit",
    ):
        assert seen[attack] in refused, (attack, seen[attack])
    for pid in pids:
        assert seen[f"killpg {pid}"] == "ProcessLookupError"
        assert seen[f"kill {pid}"] == "ProcessLookupError"
    assert seen["connect"] in {"ConnectionRefusedError", "OSError", "TimeoutError"}

    await victim_job.follow()
    assert victim_job.value() == "victim's own result"
    assert victim_job.stdout() == ["victim started"]
    assert victim_job.exit is not None
    assert victim_job.exit.code == 0
    assert service.poll() is None


async def test_each_running_job_has_a_user_of_its_own(
    backend: ProcessBackend, start_env: dict[str, str]
) -> None:
    jobs = [await Job(backend).start(whoami, env=start_env) for _ in range(3)]
    results = [(await job.follow()).value() for job in jobs]
    uids = {r["uid"] for r in results}
    assert len(uids) == 3
    assert 0 not in uids
    for r in results:
        assert r["gid"] == r["uid"] if os.geteuid() == 0 else r["gid"] != 0
        assert 0 not in r["groups"]


async def test_kill_leaves_no_process_of_the_job(
    backend: ProcessBackend, start_env: dict[str, str]
) -> None:
    job = await (await Job(backend).start(sleeper, 120.0, env=start_env)).follow(
        until="sleeping as"
    )
    uid = int(job.stdout()[0].split()[-1])
    if os.geteuid() == 0:
        assert _uids(uid)
    started = time.monotonic()
    await backend.kill(job.job_id, 1, job.handle)
    await backend.cleanup(job.job_id, 1)
    assert time.monotonic() - started < 2.0
    if os.geteuid() == 0:
        for _ in range(40):
            if not _uids(uid):
                break
            await asyncio.sleep(0.05)
        assert _uids(uid) == []
    assert _gone(int(job.handle))
    assert not job.dir.exists()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def started_how() -> str:
    import sys

    return "warm" if "--wait-fd" in sys.argv else "cold"


async def test_a_fitting_job_takes_a_warm_sandbox_and_others_their_own(
    backend: ProcessBackend, listener: int
) -> None:
    """Spares have no network, requirements or GPUs, and the runner's start-up variables."""
    warm = [await (await Job(backend).start(started_how)).follow() for _ in range(3)]
    assert [job.value() for job in warm] == ["warm"] * 3
    cold = await (await Job(backend).start(started_how, env=COLD)).follow()
    assert cold.value() == "cold"
    networked = await (await Job(backend).start(started_how, network=True)).follow()
    assert networked.value() == "cold"
    # No spare directory is left in the jobs' root but those waiting now.
    spares = [p for p in backend.root.iterdir() if p.name.startswith(".spare-")]
    assert len(spares) <= 2


async def test_a_job_still_runs_when_the_spares_died(backend: ProcessBackend) -> None:
    if os.geteuid() != 0:
        pytest.skip("spares are found by their uids, which only a root runner gives")
    first = await (await Job(backend).start(started_how)).follow()
    assert first.value() == "warm"
    for _ in range(100):  # both spares up
        if len(list(backend.root.glob(".spare-*/job"))) == 2:
            break
        await asyncio.sleep(0.05)
    for home in backend.root.glob(".spare-*/job"):
        for pid in _uids(home.stat().st_uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    job = await (await Job(backend).start(add, 20, 22)).follow()
    assert job.value() == 42


async def test_closing_lets_the_spares_go_without_leftovers(data_dir: Path) -> None:
    """Spares let go at once, even while their sandboxes are still starting."""
    made = ProcessBackend(data_dir / "runner-w" / "jobs", data_dir=data_dir)
    job = await (await Job(made).start(add, 1, 1)).follow()
    assert job.value() == 2
    await made.cleanup(job.job_id, 1)
    uids = [p.stat().st_uid for p in made.root.glob(".spare-*/job")]
    await made.close()
    for _ in range(200):
        if not any(_uids(uid) for uid in uids) and not list(made.root.glob(".spare-*")):
            break
        await asyncio.sleep(0.05)
    assert list(made.root.glob(".spare-*")) == []
    if os.geteuid() == 0:
        assert uids
        assert [uid for uid in uids if _uids(uid)] == []


async def test_a_job_can_still_do_what_jobs_do(
    backend: ProcessBackend, start_env: dict[str, str]
) -> None:
    job = await (await Job(backend).start(ordinary, env=start_env)).follow()
    got = job.value()
    assert got["squares"] == [1, 2, 3]
    assert got["shell"] == "hi\n"
    assert got["cwd"] == f"{sandbox.JOB_DIR}/work"
    assert got["user"] == ("cumulus-job" if os.geteuid() == 0 else "nobody")
    assert (job.dir / "job" / "work" / "result.txt").read_text() == "kept"


async def test_no_network_unless_the_launch_allows_it(
    backend: ProcessBackend, listener: int
) -> None:
    closed = await (await Job(backend).start(connect, listener)).follow()
    assert closed.value() in {"ConnectionRefusedError", "OSError", "TimeoutError"}
    open_ = await (await Job(backend).start(connect, listener, network=True)).follow()
    assert open_.value() == "connected"


async def test_the_job_sees_only_its_own_environment(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch, start_env: dict[str, str]
) -> None:
    monkeypatch.setenv("CUMULUS_NATS_URL", "nats://runner-secret:4222")

    def environment() -> dict[str, str]:
        import os

        return dict(os.environ)

    env = {
        "CUDA_VISIBLE_DEVICES": "0",
        "MINE": "1",
        "CUMULUS_NATS_URL": "nats://leaked:4222",
        "CUMULUS_DATA_DIR": "/leaked",
        "CUMULUS_NATS_CREDENTIALS": "/leaked.creds",
        **start_env,
    }
    seen = (await (await Job(backend).start(environment, env=env)).follow()).value()
    assert seen["CUDA_VISIBLE_DEVICES"] == "0"
    assert seen["MINE"] == "1"
    assert seen["HOME"] == "/tmp"
    assert seen["CUMULUS_JOB_DIR"] == "/job"
    assert not any(k.startswith(("CUMULUS_NATS", "CUMULUS_DATA_DIR")) for k in seen)


async def test_requirements_are_shared_and_read_only(
    backend: ProcessBackend, tmp_path: Path
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    make_wheel(wheelhouse)
    env = {
        "CUMULUS_WHEELHOUSE": str(wheelhouse),
        "CUMULUS_REQUIREMENTS": json.dumps(["cumulus_probe"]),
    }
    first = await (
        await Job(backend).start(probe_requirements, requirements=("cumulus_probe",), env=env)
    ).follow()
    got = first.value()
    assert got["value"] == 42
    assert got["where"].startswith(sandbox.DEPS_DIR)
    assert got["poison"] in {"PermissionError", "OSError"}
    envs = list((backend.root.parent / "envs").iterdir())
    assert [p.name for p in envs if not p.name.startswith(".")] == [envs[0].name]
    if os.geteuid() == 0:
        assert all(p.stat().st_uid == 0 for p in envs[0].rglob("*"))
    second = await (
        await Job(backend).start(probe_requirements, requirements=("cumulus_probe",), env=env)
    ).follow()
    assert second.value()["value"] == 42
    assert not any("installing requirements" in t for _, t in second.lines)


async def test_a_failed_install_is_reported_as_before(
    backend: ProcessBackend, tmp_path: Path
) -> None:
    wheelhouse = tmp_path / "empty-wheelhouse"
    wheelhouse.mkdir()
    env = {
        "CUMULUS_WHEELHOUSE": str(wheelhouse),
        "CUMULUS_REQUIREMENTS": json.dumps(["no_such_package_here"]),
    }
    job = await (
        await Job(backend).start(add, 1, 2, requirements=("no_such_package_here",), env=env)
    ).follow()
    assert job.result is not None
    assert job.result["ok"] is False
    assert job.result["stage"] == "setup"
    assert "no_such_package_here" in job.result["message"]


# -- opting out, and refusing to start -------------------------------------------------------


async def test_without_bwrap_the_backend_refuses_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap there
    with pytest.raises(ConfigError, match="install bubblewrap") as caught:
        ProcessBackend(tmp_path / "jobs", sandbox="bwrap")
    assert "worker.sandbox: none" in caught.value.message
    assert "CUMULUS_WORKER_SANDBOX=none" in caught.value.message
    assert caught.value.key == "worker.sandbox"
    assert "\n" not in caught.value.message


def test_runner_refuses_to_start_without_bwrap(tmp_path: Path) -> None:
    """The runner exits with status 2 and one line naming the fix, like any config error."""
    env = {
        "PATH": str(tmp_path),  # no bwrap there
        "PYTHONPATH": str(ROOT),
        "CUMULUS_CONFIG": "",
        "CUMULUS_DATA_DIR": str(tmp_path / "data"),
        "CUMULUS_WORKER_BACKEND": "process",
        "CUMULUS_WORKER_SANDBOX": "bwrap",
        "CUMULUS_NATS_URL": "nats://127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.runner"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "install bubblewrap" in lines[0]
    assert "worker.sandbox: none" in lines[0]


async def test_opting_out_runs_jobs_as_before_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.runner.process"):
        made = ProcessBackend(tmp_path / "jobs", sandbox="none")
    assert made.sandbox is None
    assert any("unsandboxed" in r.getMessage() for r in caplog.records)
    try:
        job = await (await Job(made).start(whoami)).follow()
        assert job.value()["uid"] == os.getuid()
        assert (await (await Job(made).start(add, 2, 2)).follow()).value() == 4
    finally:
        for job_id, attempt in await made.held():
            await made.cleanup(job_id, attempt)
        await made.close()


def test_an_unknown_sandbox_kind_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Must be one of bwrap, none"):
        ProcessBackend(tmp_path / "jobs", sandbox="chroot")


async def test_a_killed_spare_leaves_no_directory(backend: ProcessBackend) -> None:
    """A spare launcher killed outright (kill -9: it cannot clean up) leaves its directory;
    the zygote sweeps it within a poll or two, not only at its next start (chaos run)."""
    first = await (await Job(backend).start(add, 1, 2)).follow()
    assert first.value() == 3
    homes: list[Path] = []
    for _ in range(100):  # a spare up
        homes = list(backend.root.glob(".spare-*"))
        if homes:
            break
        await asyncio.sleep(0.05)
    assert homes
    victim = homes[0]
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(victim.name.rpartition("-")[2]), signal.SIGKILL)
    for _ in range(100):
        if not victim.exists():
            break
        await asyncio.sleep(0.05)
    assert not victim.exists()
