"""A job behaves the same on the process backend and on the Docker engine: the function's local
modules (a second module, a package directory) travel with it, `import cumulus` works in the
job (the SDK is in the job image), requirements install from the operator's wheelhouse on
both, and a module the job image lacks fails with a hint that says where the job runs and what
to do. Through the real stack; the Docker half is marked `docker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cumulus import AsyncClient, JobOptions
from services.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
CUMULUS = str(Path(sys.executable).parent / "cumulus")

# The user's code: a module that imports the SDK at its top and uses `@cumulus.remote`, a
# second local module and a local package. Names unique to this file (they enter sys.modules).
USER_FILES = {
    "samejob_main.py": '''\
import cumulus

import samejob_helper
from samejob_pkg import offset


@cumulus.remote(gpu=0.1, duration=600)
def double(x):
    return 2 * x


def compute(x):
    """Calls the remote helper directly: in a job it runs right there, in the job."""
    return {
        "value": offset(samejob_helper.scale(double(x))),
        "sdk": cumulus.__name__,
        "errors": cumulus.InvalidArgument.__mro__[1].__name__,
    }


def needs_tinystats(xs):
    import tinystats

    return tinystats.mean(xs)


def needs_a_missing_module():
    import samejob_not_installed  # MISSING-LINE

    return samejob_not_installed
''',
    "samejob_helper.py": "def scale(x):\n    return x * 10\n",
    "samejob_pkg/__init__.py": "from samejob_pkg.core import offset\n",
    "samejob_pkg/core.py": "OFFSET = 7\n\n\ndef offset(x):\n    return x + OFFSET\n",
}
EXPECTED = {"value": 47, "sdk": "cumulus", "errors": "CumulusError"}
"""What compute(2) gives here, with no job: the same must come back from every backend."""
OPTIONS = JobOptions(gpu=0.1, duration=600)


@pytest.fixture(scope="module")
def user_code(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ModuleType]]:
    """The user's files in a directory of their own, imported as the user's script would."""
    where = tmp_path_factory.mktemp("user-code")
    for name, text in USER_FILES.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(text)
    sys.path.insert(0, str(where))
    try:
        import samejob_main

        yield where, samejob_main
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m.startswith("samejob_")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
async def docker_stack(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path
) -> AsyncIterator[Stack]:
    """A Docker-engine stack with the operator's wheelhouse, as the process one has it."""
    from tests.security.test_docker_backend import docker_needed

    docker_needed()
    s = Stack(
        data_dir=tmp_path_factory.mktemp("stack-same-docker"),
        workers=["docker-1"],
        devices="1x16GiB",
        backend="docker",
        env={"CUMULUS_CONTAINER_WHEELHOUSE": str(wheelhouse)},
    )
    try:
        await s.start()
        yield s
    finally:
        s.stop()


async def _local_modules_and_the_sdk(client: AsyncClient, user: ModuleType) -> None:
    assert user.compute(2) == EXPECTED  # here, no job
    for packaging in ("pickle", "source"):
        got = await client.run_call(
            user.compute, (2,), None, OPTIONS.replace(packaging=packaging), logs=False
        )
        assert got == EXPECTED, packaging


async def _requirements_from_the_wheelhouse(client: AsyncClient, user: ModuleType) -> None:
    with pytest.raises(ModuleNotFoundError):
        import tinystats  # noqa: F401  (not here: only in the job)
    options = OPTIONS.replace(requirements=["tinystats"])
    got = await client.run_call(user.needs_tinystats, ([1.0, 2.0, 6.0],), None, options, logs=False)
    assert got == 3.0


def _missing_line(where: Path) -> int:
    text = (where / "samejob_main.py").read_text().splitlines()
    return next(n for n, line in enumerate(text, 1) if line.endswith("# MISSING-LINE"))


def _first(err: Any) -> str:
    """The error's message without the remote traceback it carries after it."""
    return str(err.message).partition("\n\nRemote traceback:")[0]


async def _missing_module(client: AsyncClient, user: ModuleType) -> ModuleNotFoundError:
    with pytest.raises(ModuleNotFoundError, match="samejob_not_installed") as info:
        await client.run_call(user.needs_a_missing_module, (), None, OPTIONS, logs=False)
    err: Any = info.value
    trace = err.remote_traceback
    # The user's traceback as ever: their file, the line that failed, Python's own message.
    assert "samejob_main.py" in trace, trace
    assert "in needs_a_missing_module" in trace, trace
    assert "ModuleNotFoundError: No module named 'samejob_not_installed'" in trace, trace
    assert "job_image" not in trace, trace
    return info.value


# -- the process backend ----------------------------------------------------------------------


async def test_local_modules_and_the_sdk_travel_with_the_job_on_the_process_backend(
    client: AsyncClient, user_code: tuple[Path, ModuleType]
) -> None:
    await _local_modules_and_the_sdk(client, user_code[1])


async def test_requirements_install_from_the_wheelhouse_on_the_process_backend(
    client: AsyncClient, user_code: tuple[Path, ModuleType]
) -> None:
    await _requirements_from_the_wheelhouse(client, user_code[1])


async def test_a_missing_module_on_the_process_backend_has_no_image_hint(
    client: AsyncClient, user_code: tuple[Path, ModuleType]
) -> None:
    err: Any = await _missing_module(client, user_code[1])
    # The job ran in the worker's own environment: Python's message alone.
    assert _first(err) == "ModuleNotFoundError: No module named 'samejob_not_installed'"


# -- the Docker engine ------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_local_modules_and_the_sdk_travel_with_the_job_on_docker(
    docker_stack: Stack, user_code: tuple[Path, ModuleType]
) -> None:
    async with AsyncClient(profile=docker_stack.profile()) as client:
        await _local_modules_and_the_sdk(client, user_code[1])


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_requirements_install_from_the_wheelhouse_on_docker(
    docker_stack: Stack, user_code: tuple[Path, ModuleType]
) -> None:
    async with AsyncClient(profile=docker_stack.profile()) as client:
        await _requirements_from_the_wheelhouse(client, user_code[1])


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_module_missing_from_the_job_image_says_where_the_job_runs(
    docker_stack: Stack, user_code: tuple[Path, ModuleType]
) -> None:
    where, user = user_code
    async with AsyncClient(profile=docker_stack.profile()) as client:
        err = await _missing_module(client, user)
    said = _first(err)
    assert said.startswith("ModuleNotFoundError: No module named 'samejob_not_installed': "), said
    assert "the job runs in the job image cumulus-job:latest" in said, said
    assert "not in the Python environment it was submitted from" in said, said
    assert "requirements=['samejob_not_installed']" in said, said
    assert "wheelhouse" in said, said
    # The traceback is Python's own, as on the process backend: the hint is in the message.
    trace = getattr(err, "remote_traceback", "")
    assert f'samejob_main.py", line {_missing_line(where)}, in needs_a_missing_module' in trace
    assert trace.rstrip().endswith("No module named 'samejob_not_installed'"), trace


def _cli(argv: list[str], stack: Stack, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CUMULUS_NATS_URL": stack.url,
        "CUMULUS_PROFILE": stack.profile(),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [CUMULUS, "run", "--quiet", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_cumulus_run_of_a_function_that_imports_cumulus_on_docker(
    docker_stack: Stack, user_code: tuple[Path, ModuleType]
) -> None:
    where = user_code[0]
    done = _cli(["samejob_main.py:compute", "2"], docker_stack, where)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == EXPECTED, done.stdout
    # The example the README shows, on the Docker engine too.
    done = _cli(["examples/train.py:train", "epochs=40"], docker_stack, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(trained["w"] - 3) < 0.2, trained
    assert abs(trained["b"] - 0.5) < 0.1, trained
