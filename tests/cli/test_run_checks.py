"""`cumulus run` as a user drives it (issue 15, bugs 2, 6, 7, 8): what it checks before a GPU is
taken, what it honours, what it says. A subprocess against the embedded stack (2 devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.stack import Stack

CUMULUS = str(Path(sys.executable).parent / "cumulus")

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def env(stack: Stack) -> dict[str, str]:
    return {
        **os.environ,
        "CUMULUS_NATS_URL": stack.url,
        "CUMULUS_PROFILE": stack.profile(),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def cli(env: dict[str, str], tmp_path: Path) -> Cli:
    def invoke(*args: str, timeout: float = 90, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CUMULUS, *args],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return invoke


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "jobs.py").write_text(
        textwrap.dedent(
            """
            import sys, time
            import cumulus

            def train(lr, epochs=2):
                return {"lr": lr, "epochs": epochs}

            @cumulus.remote(gpu=0.3, duration=120)
            def fit(x):
                return x * 2

            def sleepy(seconds):
                print("sleeping", flush=True)
                time.sleep(seconds)
            """
        )
    )
    (tmp_path / "boom.py").write_text("def helper():\n    raise KeyError('no such column')\n")
    (tmp_path / "main.py").write_text("import boom\nprint('start', flush=True)\nboom.helper()\n")
    (tmp_path / "exits.py").write_text("import sys\nprint('bye')\nsys.exit(3)\n")
    return tmp_path


def _status(cli: Cli, job_id: str) -> dict[str, object]:
    done = cli("status", "--json", job_id)
    assert done.returncode == 0, done.stderr
    status: dict[str, object] = json.loads(done.stdout)
    return status


# -- bug 7: an error retrying cannot change is not retried ---------------------------------------


def test_a_job_that_can_never_fit_fails_at_once(cli: Cli, project: Path) -> None:
    started = time.monotonic()
    done = cli("run", "--gpu", "8", "jobs:train", "1")
    took = time.monotonic() - started
    assert done.returncode == 6, done.stderr
    assert (
        "cumulus: RESOURCE_EXHAUSTED: No workers with sufficient GPU capacity "
        "(requested: 8, max available: 2)"
    ) in done.stderr
    assert "retrying" not in done.stderr  # one attempt: no "retrying in 1 s", "in 2 s"
    assert took < 10  # the whole command, interpreter start included (3.6 s of retries before)


# -- bug 8 ----------------------------------------------------------------------------------------


def test_version(cli: Cli) -> None:
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"cumulus {cumulus_version()}"


def cumulus_version() -> str:
    from importlib.metadata import version

    return version("cumulus")


def test_jobs_with_an_unknown_state_is_a_usage_error_naming_the_states(cli: Cli) -> None:
    done = cli("jobs", "--status", "bogus")
    assert done.returncode == 2
    assert "'bogus' is not a job state" in done.stderr
    assert "queued" in done.stderr
    assert "timed_out" in done.stderr
    assert "no jobs" not in done.stdout
    assert cli("jobs", "--status", "Completed", "--limit", "1").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs:train"], "cannot call train with these arguments: missing a required argument"),
        (["jobs:train", "1", "2", "3"], "cannot call train with these arguments: too many"),
        (["jobs:train", "1", "speed=3"], "got an unexpected keyword argument 'speed'"),
        (["jobs:train", "0.1", "--gpu", "1"], "options of `cumulus run` go before the target"),
    ],
)
def test_arguments_are_checked_against_the_signature_before_submitting(
    cli: Cli, project: Path, args: list[str], message: str
) -> None:
    # No stack to reach: a check that needed one (or a submit) would fail otherwise (exit 6).
    done = cli("run", *args, CUMULUS_PROFILE="", CUMULUS_NATS_URL="nats://127.0.0.1:9")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_status_of_a_queued_job_says_what_it_waits_for_once(cli: Cli, project: Path) -> None:
    hog = cli("submit", "--gpu", "2", "--duration", "300", "jobs:sleepy", "120").stdout.strip()
    waiting = ""
    try:
        deadline = time.monotonic() + 60
        while _status(cli, hog)["status"] != "RUNNING":
            assert time.monotonic() < deadline, _status(cli, hog)
            time.sleep(0.2)
        waiting = cli("submit", "--gpu", "1", "--duration", "60", "jobs:train", "1").stdout.strip()
        while _status(cli, waiting)["status"] != "QUEUED":
            assert time.monotonic() < deadline, _status(cli, waiting)
            time.sleep(0.2)
        shown = cli("status", waiting)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("waiting for") == 1, shown.stdout
        assert "waiting for 1 GPU" in shown.stdout
    finally:
        for job in (waiting, hog):
            if job:
                cli("cancel", job)


# -- bug 6: the function's @remote(...) options -------------------------------------------------


def test_run_honours_the_functions_remote_options(cli: Cli, project: Path) -> None:
    done = cli("run", "--json", "jobs:fit", "21")
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["result"] == 42
    status = _status(cli, outcome["job_id"])
    assert (status["gpu"], status["duration_s"]) == ("0.3", 120)
    # an option given on the command line wins; the others still come from @remote
    job = cli("submit", "--gpu", "0.2", "jobs:fit", "1").stdout.strip()
    status = _status(cli, job)
    assert (status["gpu"], status["duration_s"]) == ("0.2", 120)


# -- exit statuses and tracebacks as the user wrote them ------------------------------------------


def test_a_script_exiting_3_shows_its_exit_status_not_a_traceback(cli: Cli, project: Path) -> None:
    done = cli("run", "exits.py")
    assert done.returncode == 1  # the documented status of a failed job
    assert done.stdout.splitlines() == ["bye"]
    assert "FAILED: INTERNAL: the job exited with exit status 3" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_traceback_names_the_users_files_without_the_runners_frames(
    cli: Cli, project: Path
) -> None:
    done = cli("run", "main.py")
    assert done.returncode == 1
    assert 'File "main.py", line 3, in <module>' in done.stderr, done.stderr
    assert 'File "boom.py", line 2, in helper' in done.stderr, done.stderr
    assert "job_image" not in done.stderr, done.stderr
    assert "runpy" not in done.stderr, done.stderr
    assert "KeyError: 'no such column'" in done.stderr


# -- bug 2: which backend runs the job ----------------------------------------------------------


def test_run_says_which_backend_runs_the_job(cli: Cli, project: Path) -> None:
    done = cli("run", "jobs:train", "1")
    assert done.returncode == 0, done.stderr
    assert "running on worker-1 (process)" in done.stderr
    workers = cli("workers")
    assert "process" in workers.stdout
