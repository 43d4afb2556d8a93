"""`cumulus doctor` as an operator runs it (issue 16): all green on a healthy stack, and on
stacks with one thing broken each it names that thing and its fix (exit 1). The command is a
subprocess with the operator's profile; the stacks are real (nats-server, the services)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.stack import Stack
from tests.conftest import StackFactory

CUMULUS = str(Path(sys.executable).parent / "cumulus")


def run_doctor(
    stack: Stack, *args: str, profile: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    """`cumulus doctor` as the operator (or `profile`), on the stack's data dir."""
    return subprocess.run(
        [CUMULUS, "--profile", profile or stack.credentials("admin", "admin"), "doctor", *args],
        env={
            **os.environ,
            "CUMULUS_DATA_DIR": str(stack.data_dir),
            "CUMULUS_WORKER_BACKEND": "process",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def doctor(
    stack: Stack, *args: str, profile: str = "", **env: str
) -> tuple[int, dict[str, Any], str]:
    """Run `cumulus doctor --json`; (exit status, its report, stderr)."""
    out = run_doctor(stack, "--json", *args, profile=profile, **env)
    return out.returncode, json.loads(out.stdout or "{}"), out.stderr


def by_check(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in report["checks"]}


def failing(report: dict[str, Any]) -> set[str]:
    return {c["check"] for c in report["checks"] if c["status"] == "FAIL"}


async def test_a_healthy_stack_is_all_green(make_stack: StackFactory) -> None:
    stack = await make_stack()
    status, report, _ = doctor(stack)
    assert status == 0, report
    assert report["ok"] is True
    checks = by_check(report)
    for name in ("credentials", "nats", "jetstream", "streams", "consumers", "services"):
        assert checks[name]["status"] == "ok", checks[name]
    for service in ("gateway default", "scheduler default", "runner worker-1"):
        assert checks[f"service {service}"]["status"] == "ok", checks  # each one's own health
    assert checks["workers"]["status"] == "ok"
    assert "worker-1" in checks["workers"]["detail"]
    assert checks["clock"]["status"] == "ok"  # the worker's heartbeats against the bus's clock
    assert checks["disk"]["status"] == "ok"
    assert str(stack.data_dir) in checks["disk"]["detail"]
    # The text form says the same to a person, with a summary line.
    text = run_doctor(stack)
    assert text.returncode == 0
    assert "0 problem(s)" in text.stdout.splitlines()[-1]


@pytest.mark.docker
async def test_a_missing_job_image_is_named_with_its_fix(make_stack: StackFactory) -> None:
    from tests.security.test_docker_backend import docker_needed

    docker_needed()
    stack = await make_stack()
    status, report, _ = doctor(
        stack, CUMULUS_WORKER_BACKEND="docker", CUMULUS_CONTAINER_IMAGE="cumulus-job:no-such-tag"
    )
    assert status == 1
    assert failing(report) == {"job image"}
    image = by_check(report)["job image"]
    assert "cumulus-job:no-such-tag" in image["detail"]
    assert "build-images.sh" in image["fix"]
    assert by_check(report)["docker"]["status"] == "ok"
    # The image that is there is named by its ID.
    status, report, _ = doctor(stack, CUMULUS_WORKER_BACKEND="docker")
    assert by_check(report)["job image"]["detail"].startswith("cumulus-job:latest is sha256:")


async def test_a_service_down_then_the_bus_down(make_stack: StackFactory) -> None:
    stack = await make_stack()
    # A worker's runner gone: its partitioner still heartbeats, so the worker looks ready.
    stack.procs["runner-worker-1"].stop()
    status, report, _ = doctor(stack)
    assert status == 1
    assert failing(report) == {"service runner worker-1"}, report
    assert "no runner answers" in by_check(report)["service runner worker-1"]["detail"]
    stack.procs["runner-worker-1"].start()

    stack.procs["scheduler"].stop()
    status, report, _ = doctor(stack)
    assert status == 1
    assert "services" in failing(report)
    services = by_check(report)["services"]
    assert "scheduler" in services["detail"]
    assert "cumulus scheduler" in services["fix"]
    assert by_check(report)["nats"]["status"] == "ok"  # the bus itself is fine

    stack.kill9("nats")
    status, report, _ = doctor(stack, "--timeout", "2")
    assert status == 1
    nats = by_check(report)["nats"]
    assert nats["status"] == "FAIL"
    assert stack.url.removeprefix("nats://") in nats["detail"]
    assert "nats-server" in nats["fix"]
    assert by_check(report)["workers"]["status"] == "skip"


@pytest.mark.docker
async def test_a_wheelhouse_jobs_cannot_read(make_stack: StackFactory, tmp_path: Path) -> None:
    from tests.security.test_docker_backend import docker_needed

    docker_needed()
    stack = await make_stack()
    private = tmp_path / "wheels"
    private.mkdir(mode=0o700)
    (private / "a-1.0-py3-none-any.whl").write_bytes(b"")
    status, report, _ = doctor(
        stack, CUMULUS_WORKER_BACKEND="docker", CUMULUS_CONTAINER_WHEELHOUSE=str(private)
    )
    assert status == 1
    wheelhouse = by_check(report)["wheelhouse"]
    assert wheelhouse["status"] == "FAIL"
    assert "chmod o+rx" in wheelhouse["fix"]
    private.chmod(0o755)
    status, report, _ = doctor(
        stack, CUMULUS_WORKER_BACKEND="docker", CUMULUS_CONTAINER_WHEELHOUSE=str(private)
    )
    assert by_check(report)["wheelhouse"]["status"] == "ok"


async def test_a_users_profile_skips_what_it_may_not_read(make_stack: StackFactory) -> None:
    stack = await make_stack()
    status, report, _ = doctor(stack, profile=stack.profile())
    assert status == 0, report
    jetstream = by_check(report)["jetstream"]
    assert jetstream["status"] == "skip"
    assert "--profile admin" in jetstream["fix"]
    assert by_check(report)["services"]["status"] == "ok"
