"""Docs are executed: the README's and docs/sdk.md's Python blocks, docs/cli.md's session and
every example run against the embedded stack, as a reader would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def env(stack: Stack) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "CUMULUS_NATS_URL": stack.url,
        "CUMULUS_PROFILE": stack.profile(),  # the `default` user's identity
        "PATH": path,
        "PYTHONUNBUFFERED": "1",
    }


def python_blocks(doc: Path) -> str:
    """The document's Python blocks as one script (later blocks build on earlier ones)."""
    blocks = re.findall(r"^```python\n(.*?)^```", doc.read_text(), re.S | re.M)
    assert blocks, f"{doc} has no python blocks"
    return "\n".join(f"# --- {doc.name}, block {i + 1}\n{block}" for i, block in enumerate(blocks))


def run_python(source: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run(
        [sys.executable, "-c", source],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("doc", ["README.md", "docs/sdk.md"])
def test_python_blocks_run(doc: str, env: dict[str, str], tmp_path: Path) -> None:
    run_python(python_blocks(ROOT / doc), env, tmp_path)


def test_readme_keeps_its_first_two_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert first is not None
    assert first.group(1).splitlines()[:2] == [
        "bash scripts/demo.sh   # start the embedded stack, run an example function on 0.5 GPU,"
        " print its logs and result, stop",
        "bash scripts/test.sh   # run the tests (real nats-server, SQLite, subprocess jobs)",
    ]


def test_the_cli_session_runs(env: dict[str, str]) -> None:
    """The session stack's operator configured the wheelhouse the example's requirements
    install from (`container.wheelhouse`, tests/conftest.py)."""
    text = (ROOT / "docs/cli.md").read_text()
    session = re.search(r"```console\n(.*?)```", text, re.S)
    assert session is not None
    script = ["set -u"]
    commands = 0
    for line in session.group(1).splitlines():
        if not line.startswith("$ ") or "skipped by the docs test" in line:
            continue
        command = line[2:]
        expected = re.search(r"# exits (\d+)", command)
        want = int(expected.group(1)) if expected else 0
        script += [
            command,
            f'rc=$?; if [ $rc -ne {want} ]; then echo "FAILED (exit $rc, want {want}): '
            f'{command.replace(chr(34), chr(39))}" >&2; exit 1; fi',
        ]
        commands += 1
    assert commands >= 10
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "done with tinystats 0.1.0" in done.stdout


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, f"examples/{example}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


def test_the_examples_are_the_ones_documented() -> None:
    assert EXAMPLES == ["sweep.py", "train.py"]
    assert (ROOT / "examples/script_job/requirements.txt").read_text().count("tinystats") == 1


@pytest.mark.slow
def test_the_readme_demo_command_runs() -> None:
    """`bash scripts/demo.sh`, the README's first command (the second runs this suite)."""
    done = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "result: " in done.stdout
    assert "stopping Cumulus" in done.stdout
