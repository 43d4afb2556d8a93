"""The process backend's supervisor: the job's "container" when there is no container engine.

`python -m services.runner.launcher JOB_DIR` runs in a session of its own, so the job outlives
a crash of the runner that started it. It starts the command in `JOB_DIR/launch.json` with
stdout and stderr going to files the runner tails, waits, and writes `exit.json` atomically.
The runner finds everything it needs again in JOB_DIR after a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
    spec = json.loads((job_dir / "launch.json").read_text())
    ledger = spec.get("ledger")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{spec['job_id']} {os.getpid()} {time.time():.6f}\n")
    with (
        open(job_dir / "stdout.log", "ab") as out,
        open(job_dir / "stderr.log", "ab") as err,
        open(os.devnull, "rb") as devnull,
    ):
        proc = subprocess.Popen(
            spec["argv"], cwd=spec.get("cwd") or job_dir, env=spec["env"],
            stdin=devnull, stdout=out, stderr=err,
        )
        (job_dir / "child.pid").write_text(str(proc.pid))
        code = proc.wait()
    tmp = job_dir / "exit.json.tmp"
    tmp.write_text(json.dumps({"code": code, "ts": time.time()}))
    os.replace(tmp, job_dir / "exit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
