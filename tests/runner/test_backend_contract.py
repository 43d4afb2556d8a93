"""The runner backend contract, written once and run against every backend.

process (no engine), docker (one container per job) and swarm (one service per job): each
starts a job idempotently, delivers its output as lines in order (the unterminated last line
and the result frame whole), leaves a result too large for its frame in the file
`result_path` names, reports how it ended, resumes output from a cursor, kills, lists what it
holds and cleans up without leaving anything behind.
"""

from __future__ import annotations

import asyncio
import pickle
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cumulus import package_function
from job_image.runner import end_marker, parse_frame
from services.runner.backend import Backend, Exit, Launch
from services.runner.config import make_backend
from services.runner.results import open_result
from shared.config import load
from tests.runner.conftest import leftovers, need

BACKENDS = [
    pytest.param("process", id="process"),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
    pytest.param("swarm", id="swarm", marks=pytest.mark.docker),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    need(kind)
    config = load(environ={"CUMULUS_WORKER_BACKEND": kind, "CUMULUS_WORKER_ID": "contract"})
    made = make_backend(config, tmp_path / "runner", tmp_path / "launches.log")
    yield made
    for job_id, attempt in await made.held():
        await made.cleanup(job_id, attempt)
    close = getattr(made, "close", None)
    if close is not None:
        await close()


@dataclass
class Run:
    backend: Backend
    job_id: str = field(default_factory=lambda: f"c{secrets.token_hex(5)}")
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    handle: str = ""
    lines: list[tuple[str, str]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    exit: Exit | None = None
    cursor: dict[str, int] = field(default_factory=dict)

    async def start(self, func: Any, *args: Any, **env: str) -> Run:
        package = package_function(func, args)
        launch = Launch(
            job_id=self.job_id, attempt=1, package=package, nonce=self.nonce, env=dict(env)
        )
        self.handle = await self.backend.start(launch)
        return self

    async def follow(self, timeout: float = 60, stop_after: int | None = None) -> Run:
        """Read like the runner does, until the end (or `stop_after` lines)."""
        out = self.backend.output(self.job_id, 1, self.handle, self.nonce, self.cursor)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.exit is None:
                    self.exit = await self.backend.exited(self.job_id, 1, self.handle)
                final = self.exit is not None or out.complete
                got = await out.read(final)
                for name, text in got:
                    if text == end_marker(self.nonce):
                        continue
                    framed = parse_frame(text, self.nonce) if name == "stdout" else None
                    if framed is not None:
                        before, self.result = framed
                        if before:
                            self.lines.append((name, before))
                    else:
                        self.lines.append((name, text))
                self.cursor = out.cursor()
                if stop_after is not None and len(self.lines) >= stop_after:
                    return self
                if final and out.done:
                    return self
                if not got:
                    await out.wait(0.05)
        finally:
            out.close()
        raise TimeoutError(f"job {self.job_id} did not end in {timeout} s: {self.lines[-3:]}")

    def out(self, stream: str = "stdout") -> list[str]:
        return [text for name, text in self.lines if name == stream]

    def value(self, limit: int = 1 << 30) -> Any:
        """The job's value: from its frame, or (too large for it) from its result file."""
        assert self.result is not None
        if not self.result.get("file"):
            return self.result["data"]
        path = self.backend.result_path(self.job_id, 1)
        source, size = open_result(path, limit)
        with source:
            assert size == self.result["size"]
            return pickle.load(source)


def add(a: int, b: int) -> int:
    return a + b


def many_lines(n: int) -> int:
    import sys

    for i in range(n):
        print(f"line {i}")
    print("to stderr", file=sys.stderr)
    sys.stdout.write("last line without newline")
    return n


def big_result(n: int) -> str:
    return "r" * n


def crash() -> None:
    import os

    print("about to die", flush=True)
    os._exit(7)


def boom() -> None:
    raise ValueError("bad input")


def sleeper(seconds: float) -> str:
    import time as t

    print("sleeping", flush=True)
    t.sleep(seconds)
    return "woke"


def slow_lines(n: int, pause: float) -> int:
    import time as t

    for i in range(n):
        print(f"slow {i}", flush=True)
        t.sleep(pause)
    return n


async def test_two_plus_two(backend: Backend) -> None:
    run = await (await Run(backend).start(add, 2, 2)).follow()
    assert run.result == {"ok": True, "encoding": "json", "data": 4}
    # The end markers may tell the job is over before the engine does.
    assert run.exit is None or run.exit.code == 0


async def test_ten_thousand_lines_in_order_none_lost(backend: Backend) -> None:
    run = await (await Run(backend).start(many_lines, 10_000)).follow()
    assert run.out() == [f"line {i}" for i in range(10_000)] + ["last line without newline"]
    assert run.out("stderr") == ["to stderr"]
    assert run.result is not None
    assert run.result["data"] == 10_000


async def test_a_result_far_larger_than_a_log_line_comes_back_whole(backend: Backend) -> None:
    run = await (await Run(backend).start(big_result, 150_000)).follow()
    assert run.result is not None
    assert run.result["data"] == "r" * 150_000


async def test_a_result_too_large_for_its_frame_is_left_in_its_file(backend: Backend) -> None:
    run = await (await Run(backend).start(big_result, 3_000_000)).follow()
    assert run.result is not None
    assert run.result["file"] is True
    assert run.value() == "r" * 3_000_000


async def test_a_result_over_the_maximum_is_reported_not_kept(backend: Backend) -> None:
    run = Run(backend)
    await run.start(big_result, 3_000_000, CUMULUS_MAX_RESULT_BYTES="1000000")
    await run.follow()
    assert run.result is not None
    assert run.result["ok"] is False
    assert run.result["code"] == "RESOURCE_EXHAUSTED"
    assert 3_000_000 < run.result["size"] < 3_001_000
    assert not run.backend.result_path(run.job_id, 1).exists()


async def test_a_raising_job_reports_its_error(backend: Backend) -> None:
    run = await (await Run(backend).start(boom)).follow()
    assert run.result is not None
    assert run.result["ok"] is False
    assert run.result["type"] == "ValueError"


async def test_a_crashing_job_ends_without_a_result(backend: Backend) -> None:
    run = await (await Run(backend).start(crash)).follow()
    assert run.result is None
    assert run.out() == ["about to die"]
    assert run.exit is not None
    assert run.exit.code == 7


async def test_a_second_start_adopts_the_first(backend: Backend) -> None:
    run = await Run(backend).start(sleeper, 1.0)
    again = await backend.start(
        Launch(
            job_id=run.job_id,
            attempt=1,
            package=package_function(sleeper, (1.0,)),
            nonce=run.nonce,
            env={},
        )
    )
    assert again == run.handle
    await run.follow()
    assert run.result is not None
    assert run.result["data"] == "woke"


async def test_output_resumes_from_a_cursor_without_repeats(backend: Backend) -> None:
    run = await Run(backend).start(slow_lines, 20, 0.02)
    await run.follow(stop_after=5)
    first = list(run.lines)
    # A restarted runner: a new reader from the recorded cursor.
    await run.follow()
    assert [t for _, t in first] == [f"slow {i}" for i in range(len(first))]
    assert run.out() == [f"slow {i}" for i in range(20)]


async def test_kill_then_cleanup_leaves_nothing(backend: Backend) -> None:
    run = await Run(backend).start(sleeper, 60.0)
    await run.follow(stop_after=1)
    assert (run.job_id, 1) in await backend.held()
    started = time.monotonic()
    await backend.kill(run.job_id, 1, run.handle)
    await backend.cleanup(run.job_id, 1)
    assert time.monotonic() - started < 2.0
    assert (run.job_id, 1) not in await backend.held()
    if backend.name != "process":
        from services.runner.spec import engine

        client = engine()
        try:
            assert leftovers(client, run.job_id) == []
        finally:
            client.close()


async def test_many_jobs_at_once(backend: Backend) -> None:
    runs = [await Run(backend).start(add, i, i) for i in range(4)]
    done = await asyncio.gather(*(run.follow() for run in runs))
    assert [r.result["data"] for r in done if r.result] == [0, 2, 4, 6]
