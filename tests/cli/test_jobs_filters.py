"""`cumulus jobs` filters and `--name`/`--tag`, driven as a user drives them: a subprocess
against the embedded stack, reading its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
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
        "CUMULUS_PROFILE": stack.profile(),  # the `default` user's identity
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def cli(env: dict[str, str], tmp_path: Path) -> Cli:
    (tmp_path / "hello.py").write_text("print('hello')\n")

    def invoke(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CUMULUS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )

    return invoke


def test_submit_with_a_name_and_tags_then_find_it(cli: Cli) -> None:
    name = f"nightly-{uuid.uuid4().hex[:8]}"
    out = cli("submit", "--name", name, "--tag", "team=ml", "--tag", "stage=eval", "hello.py")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    other = cli("submit", "--name", name, "--tag", "team=web", "hello.py")
    assert other.returncode == 0, other.stderr
    other_id = other.stdout.strip()

    table = cli("jobs", "--name", name, "--tag", "team=ml")
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if line.strip()).split()
    assert header[:3] == ["JOB", "NAME", "STATUS"]
    assert {"TARGET", "AGE"} <= set(header)
    rows = [line for line in table.stdout.splitlines() if job_id in line]
    assert len(rows) == 1
    assert name in rows[0]
    assert "hello.py" in rows[0]
    assert "ago" in rows[0]
    assert other_id not in table.stdout

    listed = json.loads(cli("jobs", "--name", name, "--tag", "team", "--json").stdout)["jobs"]
    assert {j["job_id"] for j in listed} == {job_id, other_id}
    assert {j["tags"]["team"] for j in listed} == {"ml", "web"}
    recent = json.loads(cli("jobs", "--name", name[:8] + "*", "--since", "10m", "--json").stdout)
    assert {job_id, other_id} <= {j["job_id"] for j in recent["jobs"]}

    # A unique prefix of the id stands for the job wherever an id is asked for.
    status = cli("status", job_id[:10], "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["job_id"], shown["name"], shown["tags"]) == (
        job_id,
        name,
        {"team": "ml", "stage": "eval"},
    )
    logs = cli("logs", job_id[:10], "-f")
    assert logs.returncode == 0, logs.stderr
    assert "hello" in logs.stdout
    ambiguous = cli("status", "j")
    assert ambiguous.returncode == 2
    assert "ambiguous" in ambiguous.stderr
    assert "jobs start with 'j'" in ambiguous.stderr


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (("submit", "--tag", "no-equals", "hello.py"), 2, "--tag wants KEY=VALUE"),
        (("submit", "--name", "bad name", "hello.py"), 2, "Invalid job name"),
        (("jobs", "--since", "soon"), 2, "Invalid age"),
        (("submit", "--retries", "11", "hello.py"), 2, "retries must be a whole number"),
        (("jobs", "--user", "alice"), 7, "only an observer or an operator"),
        (("jobs", "--all-users"), 7, "only an observer or an operator"),
        (("status", "jnosuchjob"), 3, "NOT_FOUND"),
    ],
)
def test_bad_filters_and_labels_exit_with_their_documented_status(
    cli: Cli, args: tuple[str, ...], status: int, says: str
) -> None:
    out = cli(*args)
    assert out.returncode == status, (out.stdout, out.stderr)
    assert says in out.stderr
