"""Every command `cumulus up` prints works as printed: against the port it was given (not the
default 4222), on the process backend and on the Docker engine backend."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import free_port
from tests.cli.test_up_stack import Up
from tests.runner.conftest import need

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _printed_commands(banner: str) -> list[list[str]]:
    """The commands the banner suggests: its `cumulus …` and `python …` lines, comments off."""
    out = []
    for line in banner.split("Cumulus is up", 1)[1].splitlines():
        words = shlex.split(line, comments=True)
        if line.startswith("  ") and words and words[0] in ("cumulus", "python"):
            out.append(words)
    return out


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    made = Up(tmp_path, "up")
    try:
        yield made
    finally:
        made.stop()


@pytest.mark.parametrize("backend", ["process", pytest.param("docker", marks=[pytest.mark.docker])])
def test_the_commands_up_prints_work_as_printed(tmp_path: Path, up: Up, backend: str) -> None:
    need(backend)
    port = free_port()
    assert port != 4222
    up.args = ("--port", str(port), "--data-dir", str(tmp_path / "data"), "--backend", backend)
    up.start(cwd=ROOT).ready()
    commands = _printed_commands(up.text)
    assert [c[0] for c in commands] == ["cumulus", "python", "python"], up.text
    for argv in commands:
        done = subprocess.run(
            argv, env=up.env, cwd=ROOT, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, f"{shlex.join(argv)}: {done.stdout}\n{done.stderr}"
        assert done.stdout.strip(), shlex.join(argv)
    assert up.stop() == 0, up.text
