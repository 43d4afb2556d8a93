"""Finding 7: requirements lines reached pip as options (`-r/etc/shadow` put the file's first
line into the job's error message; `--index-url` was accepted).

Now each requirement is parsed as a PEP 508 specifier at the gateway (INVALID_ARGUMENT naming
the line, nothing published) and again in the job before pip runs, with `--` before them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient, InvalidArgument, package_function
from shared import api
from tests.security.conftest import watch


def add(a: int, b: int) -> int:
    return a + b


LINES = [
    "-r/etc/shadow",
    "-r /etc/passwd",
    "--requirement=/etc/passwd",
    "-c/etc/passwd",
    "--index-url http://x",
    "-i http://x",
    "--extra-index-url=http://x",
    "--find-links /tmp",
    "-e .",
    "pkg @ file:///etc/passwd",
    "pkg @ https://example.invalid/pkg.whl",
    "/etc/passwd",
    "./project",
    "git+https://example.invalid/repo.git",
    "numpy\n--index-url http://x",
]


def secret_lines() -> list[str]:
    found = []
    for path in ("/etc/passwd", "/etc/shadow"):
        with contextlib.suppress(OSError):
            found += [line for line in Path(path).read_text().splitlines() if line.strip()]
    return found


@pytest.fixture(scope="module")
def secrets() -> list[str]:
    lines = secret_lines()
    assert lines, "/etc/passwd has lines to leak"
    return lines


@pytest.mark.parametrize("line", LINES)
async def test_a_requirement_that_is_not_a_specifier_is_refused(
    alice: AsyncClient, admin: NatsClient, line: str, secrets: list[str]
) -> None:
    ref = await alice.upload(package_function(add, (1, 2), requirements=["numpy"]))
    published = await watch(admin, "jobs.alice.*._.submitted")
    body: dict[str, Any] = {
        "code_ref": ref,
        "gpu": 0.1,
        "duration": 600,
        "requirements": ["tomli>=2", line],
    }
    with pytest.raises(InvalidArgument) as refused:
        await api.request(alice.nc, "submit", body, dict, user="alice", timeout=5)
    message = str(refused.value)
    assert repr(line) in message or line.splitlines()[0] in message, message
    assert not any(secret in message for secret in secrets)
    assert published.got == []


async def test_the_sdk_refuses_them_too(alice: AsyncClient, secrets: list[str]) -> None:
    for line in ("-r/etc/shadow", "--index-url http://x", "-e .", "pkg @ file:///etc/passwd"):
        with pytest.raises(InvalidArgument) as refused:
            await alice.submit_call(add, (1, 2), requirements=[line], gpu=0.1, duration=600)
        assert not any(secret in str(refused.value) for secret in secrets)
