"""The process backend's supervisor: the job's "container" when there is no container engine.

`python -m services.runner.launcher JOB_DIR` runs in a session of its own, so the job outlives
a crash of the runner that started it. It forks: the child points stdout and stderr at files
the runner tails and becomes the in-job runner (no second interpreter start); the parent waits
and writes `exit.json` atomically. The runner finds everything again in JOB_DIR after a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path


def _child(job_dir: Path, spec: dict[str, object]) -> None:
    """Become the job: redirect output, take the job's environment, run the in-job runner."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(job_dir / "stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(job_dir / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        env: dict[str, str] = spec["env"]  # type: ignore[assignment]
        os.environ.update(env)
        os.chdir(str(spec.get("cwd") or job_dir))
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        from job_image import runner

        code = runner.main(["--job-dir", str(job_dir)])
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
    spec = json.loads((job_dir / "launch.json").read_text())
    # Exactly one launcher runs a job: a runner that crashed after asking for a launch and
    # its successor may both have asked. The loser steps aside at once.
    try:
        os.close(os.open(job_dir / "launched", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return 0
    tmp_pid = job_dir / "launcher.pid.tmp"
    tmp_pid.write_text(str(os.getpid()))
    os.replace(tmp_pid, job_dir / "launcher.pid")
    ledger = spec.get("ledger")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{spec['job_id']} {os.getpid()} {time.time():.6f}\n")
    pid = os.fork()
    if pid == 0:
        _child(job_dir, spec)
    (job_dir / "child.pid").write_text(str(pid))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    tmp = job_dir / "exit.json.tmp"
    tmp.write_text(json.dumps({"code": code, "ts": time.time()}))
    os.replace(tmp, job_dir / "exit.json")
    notify = spec.get("notify")
    if notify:  # wake the runner now rather than at its next poll; it may be down: no matter
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(str(job_dir).encode(), notify)
    return 0


if __name__ == "__main__":
    sys.exit(main())
