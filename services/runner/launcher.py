"""The process backend's supervisor: the job's "container" when there is no container engine.

`python -m services.runner.launcher JOB_DIR` runs in a session of its own, so the job outlives
a crash of the runner that started it. It forks: the child points stdout and stderr at files
the runner tails and becomes the in-job runner on JOB_DIR/job, the job's own directory, either
sandboxed (`services/runner/sandbox.py`: bwrap and a fresh interpreter, as a uid this process
leases) or, with `worker.sandbox: none`, right here (no second interpreter start); the parent
waits and writes `exit.json` atomically. The runner finds everything again in JOB_DIR after a
restart; the job never sees JOB_DIR itself, only JOB_DIR/job.

The job carries its own deadline: the launcher kills it when its partition expires
(CHRONOS_PARTITION_EXPIRES_AT: the job's duration plus the partitioner's grace), whether or
not a runner is still there to enforce the duration (a stack stopped by SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from services.runner import sandbox


def redirect(job_dir: Path) -> None:
    """stdin from /dev/null, stdout and stderr to the files the runner tails."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(job_dir / "stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = os.open(job_dir / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (devnull, out, err):
        if fd > 2:
            os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def child(job_dir: Path, spec: dict[str, Any], lease: sandbox.Lease | None) -> None:
    """Become the job: redirect output, then run the in-job runner in its sandbox (bwrap, a
    fresh interpreter) or, unsandboxed, right here with the job's environment."""
    code = 1
    try:
        redirect(job_dir)
        if lease is not None:
            sandbox.start(job_dir, spec, lease)
        os.environ.clear()
        env: dict[str, str] = spec["env"]
        os.environ.update(env)
        os.chdir(str(spec.get("cwd") or job_dir))
        from job_image import runner

        code = runner.main(["--job-dir", str(job_dir / "job")])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def claim(job_dir: Path, spec: dict[str, Any]) -> bool:
    """Win the job (its `launched` marker), record this process's pid; False if another did.

    Exactly one launcher runs a job: a runner that crashed after asking for a launch and its
    successor may both have asked. The loser steps aside at once.
    """
    try:
        os.close(os.open(job_dir / "launched", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    tmp_pid = job_dir / "launcher.pid.tmp"
    tmp_pid.write_text(str(os.getpid()))
    os.replace(tmp_pid, job_dir / "launcher.pid")
    ledger = spec.get("ledger")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{spec['job_id']} {os.getpid()} {time.time():.6f}\n")
    return True


def finish(job_dir: Path, spec: dict[str, Any], pid: int) -> int:
    """Wait for the job's process, write `exit.json` atomically, wake the runner."""
    (job_dir / "child.pid").write_text(str(pid))
    _expire_at(job_dir, spec, pid)
    _, status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    code = os.waitstatus_to_exitcode(status)
    tmp = job_dir / "exit.json.tmp"
    tmp.write_text(json.dumps({"code": code, "ts": time.time()}))
    os.replace(tmp, job_dir / "exit.json")
    notify = spec.get("notify")
    if notify:  # wake the runner now rather than at its next poll; it may be down: no matter
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(str(job_dir).encode(), notify)
    return 0


EXPIRES_AT = "CHRONOS_PARTITION_EXPIRES_AT"
"""The job's partition's end (epoch seconds, cumulus_core/env.py): the job's own deadline."""


def _expire_at(job_dir: Path, spec: dict[str, Any], pid: int) -> None:
    """Kill the job (`pid`) when its partition expires, should it still run then (SIGALRM
    interrupts the launcher's wait, which then goes on and records the exit)."""
    try:
        expires = float(spec["env"][EXPIRES_AT])
    except (KeyError, TypeError, ValueError):
        return

    def expire(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError), open(job_dir / "stderr.log", "a") as err:
            err.write(
                "[cumulus] the job ran past its partition's expiry (its duration and a grace "
                "period, with no runner to end it): killed\n"
            )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != os.getpgrp():  # a spare's sandbox: a group of its own
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(expires - time.time(), 0.001))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
    spec = json.loads((job_dir / "launch.json").read_text())
    if not claim(job_dir, spec):
        return 0
    # A sandboxed job's uid is leased here, for as long as this process lives.
    box = spec.get("sandbox")
    lease = sandbox.Lease.take(bool(box["own_users"]), str(job_dir)) if box else None
    pid = os.fork()
    if pid == 0:
        child(job_dir, spec, lease)
    return finish(job_dir, spec, pid)


if __name__ == "__main__":
    sys.exit(main())
