"""Which backend runs a job is said, never switched silently (issue 15, bug 2): `cumulus up`
prints it and why, `cumulus workers` shows it (what `auto` resolved to), `cumulus run` names
it beside the worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.stack import free_port
from tests.cli.test_up_stack import CUMULUS, Up
from tests.runner.conftest import need

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("backend", "kind", "why"),
    [
        ("process", "process", "as configured"),
        pytest.param(
            "auto",
            "docker",
            "auto: the Docker engine holds the job image cumulus-job:latest",
            marks=[pytest.mark.docker],
        ),
    ],
)
def test_up_workers_and_run_say_which_backend_runs_the_jobs(
    tmp_path: Path, backend: str, kind: str, why: str
) -> None:
    need(kind)
    (tmp_path / "jobs.py").write_text("def one():\n    return 1\n")
    data = str(tmp_path / "data")
    up = Up(tmp_path, "up", "--port", str(free_port()), "--data-dir", data, "--backend", backend)
    try:
        up.start().ready()
        assert f"  backend: {kind} ({why}); jobs run " in up.text, up.text

        def cumulus(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [CUMULUS, *args],
                env=up.env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )

        workers = cumulus("workers")
        assert workers.returncode == 0, workers.stderr
        [row] = [line for line in workers.stdout.splitlines() if "worker-1" in line]
        assert kind in row.split(), workers.stdout
        done = cumulus("run", "--gpu", "0.1", "--duration", "600", "jobs:one")
        assert done.returncode == 0, done.stderr
        assert f"running on worker-1 ({kind})" in done.stderr
        assert done.stdout.strip() == "1"
    finally:
        up.stop()
