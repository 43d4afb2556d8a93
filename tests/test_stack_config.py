"""Configuration at the edges: a service with a bad config exits 2 naming the key, and the
embedded stack passes the config file and the caller's CUMULUS_* variables to every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.stack import Stack
from shared import api
from shared.errors import ConfigError, InvalidArgument

ROOT = Path(__file__).parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    return {**env, **extra}


@pytest.mark.parametrize(
    ("text", "variables", "expected"),
    [
        (
            "scheduler:\n  backfill: reserv\n",
            {},
            "cumulus scheduler: Invalid scheduler.backfill: 'reserv' (in {path}). "
            "Must be one of reserve, none, greedy",
        ),
        (
            "",
            {"CUMULUS_SCHEDULER_BACKFILL": "greedyy"},
            "cumulus scheduler: Invalid scheduler.backfill: 'greedyy' "
            "(from CUMULUS_SCHEDULER_BACKFILL). Must be one of reserve, none, greedy",
        ),
        (
            "",
            {"CUMULUS_SCHEDULER_BACKFIL": "none"},
            "cumulus scheduler: Unknown config key scheduler.backfil "
            "(from CUMULUS_SCHEDULER_BACKFIL); the scheduler section has",
        ),
    ],
)
def test_service_with_bad_config_exits_2_with_one_line(
    tmp_path: Path, text: str, variables: dict[str, str], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "services.scheduler", "--config", str(path)],
        env=clean_env(**variables),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert done.stderr.startswith(expected.format(path=path))


async def test_stack_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("worker:\n  backend: dockr\n")
    stack = Stack(data_dir=tmp_path / "stack", config_path=str(path))
    with pytest.raises(ConfigError, match=r"worker\.backend: 'dockr'") as info:
        await stack.start()
    assert info.value.key == "worker.backend"
    assert not stack.procs  # not even nats-server was started


@pytest.mark.timeout(120)
async def test_stack_honours_config_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cumulus.yaml"
    path.write_text("limits:\n  max_job_duration: 120\nworker:\n  devices: 1x8GiB\n")
    monkeypatch.setenv("CUMULUS_LIMITS_MIN_DURATION", "90")  # the caller's own environment
    stack = Stack(data_dir=tmp_path / "stack", config_path=str(path))
    try:
        await stack.start()
        assert stack.config is not None
        assert stack.config.worker.backend == "process"  # the embedded default
        nc = await stack.connect()  # the operator
        try:
            with pytest.raises(InvalidArgument) as info:
                await api.request(
                    nc, "submit", {"code_ref": "0" * 64, "duration": 300}, api.SubmitReply
                )
            reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict)
        finally:
            await nc.close()
    finally:
        stack.stop()
    assert info.value.message == "Invalid duration: 300. Must be 90-120 seconds"
    (worker,) = reply["workers"]
    assert len(worker["devices"]) == 1  # the file's devices, not the embedded 2x16GiB
