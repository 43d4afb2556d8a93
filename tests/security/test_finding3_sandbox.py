"""Finding 3: on the process backend jobs ran as root; a job found the NATS URL and data
directory in /proc/*/environ, read every service's SQLite file, forged another job's result by
appending to its output file, and killed it with killpg.

Now each job runs in bubblewrap (services/runner/sandbox.py) as a uid of its own, in its own
PID, IPC and network namespaces, with only its own directory writable and the services' data
absent. Bob's hostile job tries everything the finding did against alice's running job, from
inside the sandbox, and reports what it got; alice's job finishes with its real output.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
from pathlib import Path
from typing import Any

from cumulus import AsyncClient
from services.stack import Stack
from tests.security.conftest import running, sleeper


def _readable(paths: list[str]) -> list[str]:
    import contextlib

    got = []
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            f.read(16)
            got.append(path)
    return got


def _environ_with_secrets() -> list[str]:
    import contextlib
    import glob as g

    found = []
    for path in g.glob("/proc/[0-9]*/environ"):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            data = f.read()
            if b"CUMULUS_NATS" in data or b"CUMULUS_DATA_DIR" in data:
                found.append(path)
    return found


def _listable(paths: list[str]) -> list[str]:
    import contextlib
    import os as o

    got: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            got += [f"{path}/{n}" for n in o.listdir(path)]
    return got


def _writable(paths: list[str]) -> list[str]:
    import contextlib

    got = []
    for path in paths:
        with contextlib.suppress(OSError), open(path, "a") as f:
            f.write("forged by bob\n")
            got.append(path)
    return got


def _signalled(pids: list[int]) -> list[int]:
    import contextlib
    import os as o
    import signal

    got = []
    for pid in pids:
        for how in (o.kill, o.killpg):
            with contextlib.suppress(OSError):
                how(pid, signal.SIGKILL)
                got.append(pid)
    return got


def hostile(targets: dict[str, Any]) -> dict[str, Any]:
    """What a job can reach: run inside the sandbox as bob's job."""
    import os as o
    import socket

    found: dict[str, Any] = {
        "uid": o.getuid(),
        "euid": o.geteuid(),
        "own_env": sorted(k for k in o.environ if k.startswith(("CUMULUS_NATS", "NATS_"))),
        "environ": _environ_with_secrets(),
        "read": _readable(targets["read"]),
        "listed": _listable(targets["list"]),
        "wrote": _writable(targets["write"]),
        "signalled": _signalled(targets["pids"]),
    }
    try:
        with socket.create_connection(("127.0.0.1", targets["port"]), timeout=2) as s:
            found["bus"] = s.recv(64).decode(errors="replace")
    except OSError as exc:
        found["bus"] = ""
        found["bus_error"] = str(exc)
    return found


def job_dirs(stack: Stack, job_id: str) -> list[Path]:
    return [Path(p) for p in glob.glob(str(stack.data_dir / "runner-*" / "jobs" / f"{job_id}.*"))]


def pids_of(job_dir: Path) -> list[int]:
    pids = []
    for name in ("launcher.pid", "child.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.append(int((job_dir / name).read_text().split()[0]))
    return pids


async def test_bobs_job_cannot_reach_alices_job_or_the_services(
    stack: Stack, alice: AsyncClient, bob: AsyncClient
) -> None:
    victim = await alice.submit(sleeper, 8, gpu=0.1, duration=600)
    await running(victim)
    dirs = job_dirs(stack, victim.job_id)
    assert dirs, "alice's job directory"
    data = stack.data_dir
    targets: dict[str, Any] = {
        "read": [
            *map(str, sorted(data.glob("*.sqlite"))),
            *map(str, sorted((data / "auth" / "creds").glob("*.json"))),
            str(data / "nats.conf"),
            *(str(d / "stdout.log") for d in dirs),
            *(str(d / "job" / ".nonce") for d in dirs),
            *(str(d / "job" / "package.zip") for d in dirs),
        ],
        "list": [str(data), str(data / "auth"), *map(str, dirs)],
        "write": [*(str(d / "stdout.log") for d in dirs), *(str(d / "job" / "x") for d in dirs)],
        "pids": [p for d in dirs for p in pids_of(d)],
        "port": stack.port,
    }
    assert targets["pids"], "alice's job's processes"
    found = await bob.run(hostile, targets, gpu=0.1, duration=600, logs=None, timeout=90)

    assert found["uid"] != 0, found
    assert found["euid"] != 0, found
    assert found["own_env"] == [], found
    assert found["environ"] == [], found
    assert found["read"] == [], found
    assert found["listed"] == [], found
    assert found["wrote"] == [], found
    assert found["signalled"] == [], found
    assert found["bus"] == "", found  # no INFO line from nats-server: the bus is unreachable

    # alice's job is whole: its value and its output, with nothing of bob's in it
    assert await victim.result(timeout=60) == "alice's real value"
    lines = [line.text async for line in victim.logs()]
    assert lines, "alice's output"
    assert all(text.startswith("secret line") for text in lines), lines


async def test_the_data_directory_files_are_private(stack: Stack) -> None:
    """Outside any sandbox too: credentials and the bus config are 0600 in a 0700 directory."""
    auth = stack.data_dir / "auth"
    assert os.stat(auth).st_mode & 0o077 == 0
    for path in [*(auth / "creds").glob("*.json"), stack.data_dir / "nats.conf"]:
        assert os.stat(path).st_mode & 0o077 == 0, path
    await asyncio.sleep(0)
