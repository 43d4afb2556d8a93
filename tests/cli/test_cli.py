"""`cumulus` driven as a user drives it: a subprocess against the embedded stack, reading its
output and exit status (the codes are documented in docs/cli.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import cumulus
from services.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
CUMULUS = str(Path(sys.executable).parent / "cumulus")

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def env(stack: Stack) -> dict[str, str]:
    return {
        **os.environ,
        "CUMULUS_NATS_URL": stack.url,
        "CUMULUS_PROFILE": stack.profile(),  # the `default` user's identity
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def cli(env: dict[str, str], tmp_path: Path) -> Cli:
    def invoke(
        *args: str, timeout: float = 90, cwd: Path = tmp_path
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CUMULUS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    return invoke


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "jobs.py").write_text(
        textwrap.dedent(
            """
            import sys, time

            def train(lr, epochs=2):
                for e in range(epochs):
                    print(f"epoch {e} lr={lr}")
                print("careful", file=sys.stderr)
                return {"lr": lr, "epochs": epochs}

            def boom():
                raise RuntimeError("the model diverged")

            def sleepy():
                print("sleeping", flush=True)
                time.sleep(120)
            """
        )
    )
    (tmp_path / "hello.py").write_text(
        "import sys\nprint('hello', *sys.argv[1:])\nprint('oops', file=sys.stderr)\n"
    )
    (tmp_path / "exits.py").write_text("import sys\nprint('bye')\nsys.exit(3)\n")
    (tmp_path / "long.py").write_text(
        "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n"
    )
    return tmp_path


def test_run_a_function_streams_logs_prints_the_value_and_exits_0(cli: Cli, project: Path) -> None:
    done = cli("run", "--gpu", "0.2", "--duration", "600", "jobs:train", "0.5", "epochs=3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "epoch 0 lr=0.5",
        "epoch 1 lr=0.5",
        "epoch 2 lr=0.5",
        '{"lr": 0.5, "epochs": 3}',
    ]
    assert "careful" in done.stderr
    assert "running on worker-1" in done.stderr  # progress, on stderr
    assert "packaged as cloudpickle" in done.stderr


def test_run_json_keeps_stdout_for_the_outcome(cli: Cli, project: Path) -> None:
    done = cli("run", "--json", "jobs:train", "2")
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["status"] == "COMPLETED"
    assert outcome["result"] == {"lr": 2, "epochs": 2}
    assert "epoch 1 lr=2" in done.stderr


def test_run_a_script_with_arguments(cli: Cli, project: Path) -> None:
    done = cli("run", "-q", "hello.py", "world", "--loud")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # --quiet: no logs
    done = cli("run", "hello.py", "world", "--loud")
    assert done.stdout.splitlines() == ["hello world --loud"]
    assert "oops" in done.stderr


def test_a_failing_job_exits_1_with_its_traceback(cli: Cli, project: Path) -> None:
    done = cli("run", "jobs:boom")
    assert done.returncode == 1
    assert "RuntimeError: the model diverged" in done.stderr
    assert "FAILED: INTERNAL" in done.stderr
    done = cli("run", "exits.py")
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["bye"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["run", "--gpu", "2.3", "jobs:train", "1"],
            2,
            "INVALID_ARGUMENT: Invalid GPU amount: 2.3. Must be 0.1-0.9 or whole number 1-8",
        ),
        (
            ["run", "--duration", "59", "jobs:train", "1"],
            2,
            "INVALID_ARGUMENT: Invalid duration: 59. Must be 60-86400 seconds",
        ),
        (["status", "no-such-job"], 3, "NOT_FOUND: Job no-such-job not found"),
        (["logs", "no-such-job"], 3, "NOT_FOUND: Job no-such-job not found"),
        (["run", "nothing_here.py"], 2, "is neither a file, a directory nor module:function"),
        (["run", "jobs:missing"], 2, "jobs has no 'missing'"),
        (
            ["run", "--gpu", "8", "jobs:train", "1"],
            6,
            "RESOURCE_EXHAUSTED: No workers with sufficient GPU capacity "
            "(requested: 8, max available: 2)",
        ),
        (["--url", "nats://127.0.0.1:1", "jobs"], 6, "UNAVAILABLE: cannot reach Cumulus"),
    ],
)
def test_errors_carry_the_seed_code_and_a_documented_exit_status(
    cli: Cli, project: Path, args: list[str], code: int, message: str
) -> None:
    done = cli(*args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr


def test_submit_then_status_logs_jobs(cli: Cli, project: Path) -> None:
    done = cli("submit", "--gpu", "0.3", "jobs:train", "7")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("j")
    # logs -f on a job that is running or already finished: the whole log, then it exits
    done = cli("logs", "-f", job_id, timeout=60)
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["epoch 0 lr=7", "epoch 1 lr=7"]
    assert done.stderr.splitlines() == ["careful"]
    status = json.loads(cli("status", "--json", job_id).stdout)
    assert status["status"] == "COMPLETED"
    assert status["gpu"] == "0.3"
    human = cli("status", job_id).stdout
    assert "COMPLETED" in human
    assert "worker-1" in human
    jobs = json.loads(cli("jobs", "--json", "--limit", "500").stdout)["jobs"]
    assert job_id in [j["job_id"] for j in jobs]
    table = cli("jobs", "--status", "completed", "--limit", "500").stdout
    assert job_id in table
    assert "COMPLETED" in table
    assert "JOB" in table


def test_logs_f_on_a_finished_job_prints_the_whole_log_and_exits(
    cli: Cli, project: Path, stack: Stack
) -> None:
    job_id = cli("submit", "jobs:train", "1", "epochs=40").stdout.strip()
    with cumulus.Client(profile=stack.profile()) as client:
        assert client.get_job(job_id).wait(timeout=60) == "COMPLETED"
    started = time.monotonic()
    done = cli("logs", "-f", job_id, timeout=30)
    assert done.returncode == 0
    assert done.stdout.splitlines() == [f"epoch {e} lr=1" for e in range(40)]
    assert time.monotonic() - started < 10
    assert cli("logs", job_id).stdout == done.stdout


def test_cancel(cli: Cli, project: Path) -> None:
    job_id = cli("submit", "jobs:sleepy").stdout.strip()
    done = cli("cancel", job_id)
    assert done.returncode == 0
    assert f"cancel requested for job {job_id}" in done.stdout
    done = cli("run", "--json", "jobs:train", "1")  # the cluster goes on
    assert json.loads(done.stdout)["status"] == "COMPLETED"
    status = json.loads(cli("status", "--json", job_id).stdout)
    assert status["status"] == "CANCELLED"
    assert "already ended: CANCELLED" in cli("cancel", job_id).stdout


def test_workers_show_devices_with_allocated_and_free_shares(cli: Cli) -> None:
    reply = json.loads(cli("workers", "--json").stdout)
    worker = reply["workers"][0]
    assert worker["worker_id"] == "worker-1"
    assert [d["index"] for d in worker["devices"]] == [0, 1]
    assert {"allocated", "free", "jobs"} <= set(worker["devices"][0])
    table = cli("workers").stdout
    for column in ("WORKER", "ALLOCATED", "FREE", "worker-1", "Virtual GPU 16GiB"):
        assert column in table
    health = json.loads(cli("health", "--json").stdout)
    assert health["status"] == "SERVING"


def test_events_replays_a_jobs_history_readably(cli: Cli, project: Path) -> None:
    job_id = cli("submit", "jobs:train", "3").stdout.strip()
    subject = f"jobs.*.{job_id}.>"
    done = cli("events", "--replay", "--count", "6", subject, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"jobs.default.{job_id}._.submitted submitted gpu 0.5, 3600 s, function" in lines[0]
    assert any(".started started process" in line for line in lines)
    output = cli("events", "--replay", "--count", "1", f"logs.default.{job_id}.>", timeout=60)
    assert output.returncode == 0, output.stderr
    assert "  │ epoch 0 lr=3" in output.stdout.splitlines()
    as_json = cli("events", "--replay", "--json", "--count", "1", subject).stdout
    first = json.loads(as_json)
    assert first["subject"].endswith(".submitted")
    assert first["data"]["type"] == "cumulus.job.v1.submitted"


def test_events_tails_live_like_nats_sub(env: dict[str, str], cli: Cli, project: Path) -> None:
    tail = subprocess.Popen(
        [CUMULUS, "events", "--count", "2", "jobs.*.*.*.submitted"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # let it subscribe
        for _ in range(2):
            assert cli("submit", "--gpu", "0.1", "jobs:train", "1").returncode == 0
        out, _ = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0
    assert [line.split()[2] for line in out.splitlines()] == ["submitted", "submitted"]


def test_ctrl_c_during_run_cancels_the_job_and_says_so(
    env: dict[str, str], project: Path, stack: Stack
) -> None:
    proc = subprocess.Popen(
        [CUMULUS, "run", "long.py"],
        env=env,
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        first = ""
        while not first.startswith("tick") and time.monotonic() < deadline:
            first = proc.stdout.readline()
        assert first.startswith("tick"), "the job never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted; cancelling job" in err
    job_id = err.split("cancelling job ")[1].split()[0]
    assert f"job {job_id} cancelled" in err
    with cumulus.Client(profile=stack.profile()) as client:
        assert client.get_job(job_id).status().status == "CANCELLED"


def test_run_a_directory_with_its_requirements_from_a_wheelhouse(cli: Cli) -> None:
    # The session stack's operator set `container.wheelhouse` (tests/conftest.py); a job may
    # not point CUMULUS_WHEELHOUSE anywhere itself.
    refused = cli(
        "run", "--env", "CUMULUS_WHEELHOUSE=/tmp", "examples/script_job/train.py", cwd=ROOT
    )
    assert refused.returncode == 2, refused.stderr
    assert "CUMULUS_WHEELHOUSE" in refused.stderr
    done = cli("run", "examples/script_job/train.py", "--epochs", "2", cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "epoch 0: mean 3.00, stdev 1.58",
        "epoch 1: mean 6.00, stdev 3.16",
        "done with tinystats 0.1.0",
    ]
    assert "using requirements from examples/script_job/requirements.txt" in done.stderr


def test_up_reads_its_config_and_a_wrong_enum_exits_2_naming_the_key(
    cli: Cli, tmp_path: Path
) -> None:
    config = tmp_path / "cumulus.yaml"
    config.write_text("scheduler:\n  backfill: sometimes\n")
    done = cli("demo", "--config", str(config), timeout=60)
    assert done.returncode == 2, done.stderr
    assert "scheduler.backfill" in done.stderr
    assert "reserve, none, greedy" in done.stderr
