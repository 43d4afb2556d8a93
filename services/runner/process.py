"""The process backend: each job in its own directory and process session, no engine needed.

The embedded default on machines without Docker. A job is `python -m job_image.runner` under
`services.runner.launcher`, which survives a runner crash; the runner re-adopts it from the
job directory (launcher.pid, stdout.log, stderr.log, exit.json) after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from services.runner.backend import Exit, FileOutput, Launch, Output


class ProcessBackend:
    name = "process"

    def __init__(self, root: Path, ledger: Path | None = None) -> None:
        self.root = root
        self.ledger = ledger
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def job_dir(self, job_id: str, attempt: int) -> Path:
        return self.root / f"{job_id}.{attempt}"

    async def start(self, launch: Launch) -> str:
        """Start the job, or return the handle of the one a crashed runner already started."""
        env = dict(launch.env)
        if launch.requirements:
            # The environment cache: jobs with the same requirements share one install.
            env["CUMULUS_DEPS_DIR"] = str(self.root.parent / "envs" / requirements_key(launch))
        return await asyncio.to_thread(
            self._start, launch.job_id, launch.attempt, launch.package, launch.nonce, env
        )

    def _start(
        self, job_id: str, attempt: int, package: bytes, nonce: str, env: dict[str, str]
    ) -> str:
        job_dir = self.job_dir(job_id, attempt)
        pid_file = job_dir / "launcher.pid"
        if pid_file.exists():
            return pid_file.read_text().strip()
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "package.zip").write_bytes(package)
        (job_dir / ".nonce").write_text(nonce)
        launch = {
            "job_id": job_id,
            "env": env,
            "cwd": str(job_dir),
            "ledger": str(self.ledger) if self.ledger else None,
        }
        (job_dir / "launch.json").write_text(json.dumps(launch))
        with open(job_dir / "launcher.log", "ab") as launcher_log:  # the child keeps a copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.runner.launcher", str(job_dir)],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=launcher_log,
            )
        self._children[proc.pid] = proc
        tmp = job_dir / "launcher.pid.tmp"
        tmp.write_text(str(proc.pid))
        os.replace(tmp, pid_file)
        return str(proc.pid)

    def output_paths(self, job_id: str, attempt: int) -> dict[str, Path]:
        job_dir = self.job_dir(job_id, attempt)
        return {"stdout": job_dir / "stdout.log", "stderr": job_dir / "stderr.log"}

    def output(
        self, job_id: str, attempt: int, handle: str, nonce: str, cursor: dict[str, int]
    ) -> Output:
        return FileOutput(self.output_paths(job_id, attempt), cursor)

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
        shutil.rmtree(self.job_dir(job_id, attempt), ignore_errors=True)

    async def held(self) -> list[tuple[str, int]]:
        return self.handles()

    def handles(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every job directory present, for reconciling after a crash."""
        out = []
        for path in self.root.glob("*.*"):
            job_id, _, attempt = path.name.rpartition(".")
            if attempt.isdigit():
                out.append((job_id, int(attempt)))
        return out


def requirements_key(launch: Launch) -> str:
    """The environment cache key: a hash of the requirements, order and case insensitive."""
    text = "\n".join(sorted(r.strip().lower() for r in launch.requirements))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the job's process was killed by {name}"
    return f"the job's process exited with code {code}"
