"""Live progress output: a job's progress bar (redrawn with carriage returns, no newline until
it ends) shows its intermediate states in `cumulus run` and `cumulus logs -f` on a terminal
while the job runs, not only at the next newline; a file or pipe gets each line once."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cumulus import AsyncClient
from services.runner.lines import PARTIAL_S, Live, shown
from services.stack import Stack
from shared import events as ev

CUMULUS = str(Path(sys.executable).parent / "cumulus")

BAR = """\
import sys, time
time.sleep({lead})
for i in range(1, 11):
    sys.stderr.write(f"\\rprogress {{i * 10}}%")
    sys.stderr.flush()
    time.sleep({pause})
sys.stderr.write("\\n")
print("done", flush=True)
"""

Chunks = list[tuple[float, bytes]]


def bar(lead: float = 0.0, pause: float = 0.5) -> str:
    return BAR.format(lead=lead, pause=pause)


def progress_bar(pause: float) -> str:
    """The same bar as a function job."""
    import sys as s
    import time as t

    for i in range(1, 11):
        s.stderr.write(f"\rprogress {i * 10}%")
        s.stderr.flush()
        t.sleep(pause)
    s.stderr.write("\n")
    return "done"


@pytest.fixture(scope="module")
def env(stack: Stack) -> dict[str, str]:
    return {
        **os.environ,
        "CUMULUS_NATS_URL": stack.url,
        "CUMULUS_PROFILE": stack.profile(),
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "120",
    }


def on_a_terminal(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 90) -> Chunks:
    """Run `argv` with a pseudo-terminal as its stdout and stderr; what it wrote, when."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks: Chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append((time.monotonic(), data))
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
    assert proc.returncode == 0, b"".join(c for _, c in chunks).decode(errors="replace")
    return chunks


def seen_at(chunks: Chunks, text: str) -> float:
    """When `text` had first appeared on the terminal."""
    so_far = b""
    for at, data in chunks:
        so_far += data
        if text.encode() in so_far:
            return at
    raise AssertionError(f"{text!r} never shown: {so_far.decode(errors='replace')!r}")


def test_run_on_a_terminal_draws_the_bar_while_the_job_runs(
    env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "bar.py").write_text(bar(pause=0.4))
    chunks = on_a_terminal([CUMULUS, "run", "bar.py"], env, tmp_path)
    done = seen_at(chunks, "done")
    # 50% is drawn ~2 s before the job ends; without live lines it came with the newline.
    assert done - seen_at(chunks, "progress 50%") >= 1.0
    assert seen_at(chunks, "progress 20%") < seen_at(chunks, "progress 50%")
    assert b"\x1b[K" in b"".join(c for _, c in chunks)  # redrawn in place


def test_logs_follow_on_a_terminal_draws_the_bar_live(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bar.py").write_text(bar(lead=2.0, pause=0.5))
    submitted = subprocess.run(
        [CUMULUS, "submit", "bar.py"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job_id = submitted.stdout.strip().splitlines()[-1]
    chunks = on_a_terminal([CUMULUS, "logs", "-f", job_id], env, tmp_path)
    assert seen_at(chunks, "done") - seen_at(chunks, "progress 70%") >= 0.5


def test_a_pipe_gets_each_line_once(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bar.py").write_text(bar(pause=0.3))
    proc = subprocess.run(
        [CUMULUS, "run", "bar.py"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["done"]
    assert proc.stderr.count("progress 100%") == 1
    assert "\x1b[" not in proc.stderr


async def test_the_sdk_sees_partial_states_and_complete_lines_apart(
    client: AsyncClient,
) -> None:
    job = await client.submit(progress_bar, 0.3, gpu=0.1, duration=600)
    partial: list[str] = []
    async for event in job.events():
        if isinstance(event, ev.JobLog) and event.partial:
            partial += [line.text for line in event.lines]
    assert len(partial) >= 3
    assert partial[0] != partial[-1]
    assert all(text.startswith("progress ") and "\r" not in text for text in partial)
    lines = [line.text async for line in job.logs()]  # complete lines only
    assert len(lines) == 1
    assert lines[0].endswith("progress 100%")
    assert await job.result() == "done"


def test_a_partial_line_is_published_on_a_carriage_return_or_when_quiet() -> None:
    live = Live()
    assert live.look({"stderr": b"\rprogress 10%"}, 0.0) == [("stderr", "progress 10%")]
    assert not live.due(PARTIAL_S / 2)
    assert live.look({"stderr": b"\rprogress 10%"}, PARTIAL_S) == []  # unchanged
    assert live.look({"stdout": b"typing a li"}, 2 * PARTIAL_S) == []  # still being written
    assert live.look({"stdout": b"typing a li"}, 3 * PARTIAL_S) == [("stdout", "typing a li")]
    live.ended(["stdout"])
    assert live.look({"stdout": b"typing a li"}, 4 * PARTIAL_S) == []
    assert live.look({"stdout": b"typing a li"}, 5 * PARTIAL_S) == [("stdout", "typing a li")]
    # the last non-empty redraw, never the in-job runner's markers
    assert shown(b"a\rb\r") == "b"
    assert shown(b"x\x1eCUMULUS-RESULT abc") == "x"
    assert shown("50% ██".encode()[:-1]) == "50% █"


@pytest.mark.docker
@pytest.mark.slow
async def test_docker_engine_jobs_show_partial_states_while_running(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.runner.conftest import need

    need("docker")
    s = Stack(
        data_dir=tmp_path_factory.mktemp("stack-progress-docker"),
        workers=["docker-1"],
        backend="docker",
    )
    try:
        await s.start()
        async with AsyncClient(profile=s.profile()) as c:
            job = await c.submit(progress_bar, 0.4, gpu=0.1, duration=600)
            seen: list[tuple[float, str]] = []
            ended = 0.0

            async def follow() -> None:
                nonlocal ended
                async for event in job.events():
                    if isinstance(event, ev.JobLog) and event.partial:
                        seen.extend((time.monotonic(), line.text) for line in event.lines)
                    elif isinstance(event, ev.Terminal):
                        ended = time.monotonic()

            await asyncio.wait_for(follow(), 120)
            assert len({text for _, text in seen}) >= 3
            assert ended - seen[0][0] >= 1.0  # while the job ran
            assert await job.result() == "done"
    finally:
        s.stop()
