"""Issue 11, findings 2, 3 and 5: poison events, a crash in the first batch, a full disk.

Through a real nats-server (and, where the finding was seen there, a real stack): an event
that cannot be applied is set aside with its error while the service keeps serving; a service
that crashed in its very first batch gets that batch again after a restart; a data disk that
fills up pauses consumption (a log line, a metric) and work resumes by itself once space
returns, with no job lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

import cumulus
from services.stack import Proc, Stack, free_port, nats_server_binary
from shared import bus, subjects
from shared import config as config_mod
from shared import events as ev
from shared.service import ConsumerSpec, EventService
from tests.conftest import StackFactory

# -- a service of our own over a real nats-server --------------------------------------------


class Crash(BaseException):
    """Stands for the process dying in the middle of a batch (nothing after it runs)."""


class Recorder(EventService[list[str]]):
    """Consumes every `workers.*.heartbeat`; records the workers it applied, in order."""

    name = "recorder"
    crash_first_batch = False
    poison = ""

    def new_state(self) -> list[str]:
        return []

    def consumers(self) -> list[ConsumerSpec]:
        return [ConsumerSpec(subjects.WORKERS_STREAM, "recorder", ["workers.*.heartbeat"])]

    def apply(self, event: Any) -> None:
        if self.crash_first_batch:
            raise Crash
        if event.worker_id == self.poison:
            self.state.append("half-applied")
            raise IndexError("list index out of range")
        self.state.append(event.worker_id)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = Proc(
        "nats",
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)],
        dict(os.environ),
        tmp_path / "nats.log",
    )
    proc.start()
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    conn = await bus.connect(nats_url, "test")
    await bus.ensure_streams(conn.jetstream())
    try:
        yield conn
    finally:
        await conn.close()


def recorder(tmp_path: Path, url: str) -> Recorder:
    env = {"CUMULUS_DATA_DIR": str(tmp_path / "data"), "CUMULUS_NATS_URL": url}
    return Recorder(config_mod.load(environ=env))


async def heartbeats(nc: Client, *workers: str) -> None:
    js = nc.jetstream()
    for worker in workers:  # one subject each: the stream keeps the latest per subject
        await bus.publish(js, ev.WorkerHeartbeat(worker_id=worker))


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_crash_in_the_very_first_batch_loses_nothing(tmp_path: Path, nc: Client) -> None:
    url = nc.connected_url
    assert url is not None
    first = [f"w{i}" for i in range(5)]
    await heartbeats(nc, *first)
    dying = recorder(tmp_path, url.geturl())
    dying.crash_first_batch = True
    await dying.start()
    await until(lambda: all(t.done() for t in dying._loops[:1]), 10, "the first batch to crash")
    await dying._release()  # the process is gone: nothing acked, nothing committed
    later = [f"v{i}" for i in range(5)]
    await heartbeats(nc, *later)

    again = recorder(tmp_path, url.geturl())
    await again.start()
    try:
        # Well inside the consumer's 30 s ack wait: the first batch comes from the restart.
        await until(lambda: len(again.state) >= 10, 10, "every heartbeat to be applied")
        assert again.state == first + later
    finally:
        await again.stop()


async def test_a_delivery_lost_on_the_way_is_delivered_again(
    tmp_path: Path, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's leader that dies with a delivery in flight: the message never arrives,
    later ones do. Acking them (AckAll) would acknowledge it unseen; the service sees the
    skipped consumer sequence, makes its consumer anew from what it applied, and gets it."""
    url = nc.connected_url
    assert url is not None
    service = recorder(tmp_path, url.geturl())
    await service.start()
    try:
        await heartbeats(nc, "w0", "w1")
        await until(lambda: service.state == ["w0", "w1"], 10, "the first heartbeats")
        take = bus.Puller._take
        dropped: list[int] = []

        def lossy(puller: bus.Puller, msg: Any, out: list[Any]) -> None:
            if not dropped and msg.subject == "workers.lost.heartbeat":
                dropped.append(bus.stream_seq(msg))  # gone on the way, as with a dead leader
                return
            take(puller, msg, out)

        monkeypatch.setattr(bus.Puller, "_take", lossy)
        await heartbeats(nc, "lost", "w2", "w3")
        await until(lambda: len(service.state) >= 5, 10, "every heartbeat to be applied")
        assert dropped, "the delivery was not dropped"
        assert service.state == ["w0", "w1", "lost", "w2", "w3"]
        await heartbeats(nc, "w4")
        await until(lambda: service.state[-1:] == ["w4"], 10, "a heartbeat after the recovery")
        assert service.state == ["w0", "w1", "lost", "w2", "w3", "w4"]
    finally:
        await service.stop()


async def test_an_event_that_cannot_be_applied_is_set_aside_and_the_rest_applied(
    tmp_path: Path, nc: Client
) -> None:
    url = nc.connected_url
    assert url is not None
    service = recorder(tmp_path, url.geturl())
    service.poison = "bad"
    await heartbeats(nc, "a", "bad", "b")
    await service.start()
    try:
        await until(lambda: len(service.state) >= 2, 10, "the good events")
        await heartbeats(nc, "c")
        await until(lambda: len(service.state) >= 3, 10, "a later event")
        # The half-applied poison left no trace: the state was rebuilt from the log.
        assert service.state == ["a", "b", "c"]
        assert service.failure is None
        assert not service._stopping.is_set()
    finally:
        await service.stop()
    with contextlib.closing(sqlite3.connect(service.db_path)) as db:
        dead = db.execute("SELECT subject, error FROM dead").fetchall()
    assert dead == [("workers.bad.heartbeat", "cannot apply: IndexError: list index out of range")]
    # After a restart (replay) the state is the same, and the poison is not retried.
    again = recorder(tmp_path, url.geturl())
    again.poison = "bad"
    await again.start()
    try:
        await asyncio.sleep(0.5)
        assert again.state == ["a", "b", "c"]
    finally:
        await again.stop()


async def test_a_consumer_that_fails_unexpectedly_exits_non_zero(
    tmp_path: Path, nc: Client
) -> None:
    url = nc.connected_url
    assert url is not None

    class Broken(Recorder):
        def ignore(self, subject: str) -> bool:
            raise RuntimeError("a bug outside any one event")

    service = Broken(recorder(tmp_path, url.geturl()).config)
    await heartbeats(nc, "a")
    code: Any = 0
    try:
        async with asyncio.timeout(30):  # in this task: asyncio re-raises SystemExit from others
            await service.run_forever()
    except SystemExit as exited:
        code = exited.code
    assert code != 0
    assert "a bug outside any one event" in str(code)


# -- through a real stack ------------------------------------------------------------------


def submitted(job_id: str, user: str = "default", **spec: Any) -> ev.JobSubmitted:
    return ev.JobSubmitted(
        job_id=job_id,
        user=user,
        spec=ev.JobSpec(code_ref="0" * 64, **spec),  # type: ignore[arg-type]
    )


def dead_letters(stack: Stack, service: str) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(stack.data_dir / f"{service}.sqlite")) as db:
        return [(r[0], r[1]) for r in db.execute("SELECT subject, error FROM dead")]


def double(x: int) -> int:
    return 2 * x


async def test_poison_submits_are_refused_or_set_aside_and_scheduling_goes_on(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    admin = await stack.connect()  # the operator may publish anywhere: the worst case
    try:
        js = admin.jetstream()
        negative = submitted("jneg", gpu_tenths=-5)
        await bus.publish(js, negative)
        # A body whose user is not a subject token, on a subject that is one.
        spaced = submitted("jspace", user="a b")
        await js.publish(subjects.job("default", "jspace", "", "submitted"), ev.encode(spaced))
        async with cumulus.AsyncClient(profile=stack.profile()) as client:
            # A share the gateway would never accept is refused by the scheduler too, with the
            # seed's code and message: the job ends, nothing is placed, nothing is set aside.
            with pytest.raises(cumulus.CumulusError) as refused:
                await client.get_job("jneg").result(timeout=60)
            assert refused.value.code == "INVALID_ARGUMENT"
            assert "Invalid GPU amount: -0.5" in refused.value.message
            for _ in range(2):  # and the scheduler keeps placing jobs, every time
                job = await client.submit(double, 21, gpu=0.5, duration=60)
                assert await asyncio.wait_for(job.result(), 60) == 42
    finally:
        await admin.close()
    stack._check_alive()
    assert {name: proc.pid for name, proc in stack.procs.items()} == pids
    errors = dict(dead_letters(stack, "scheduler"))
    assert subjects.job("default", "jneg", "", "submitted") not in errors
    assert "not a subject token" in errors[subjects.job("default", "jspace", "", "submitted")]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB data disk (tmpfs), its `logs` directory bound from elsewhere so the test can
    read what the services said once the disk is full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small data disk needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    try:
        (disk / "logs").mkdir()
        (tmp_path / "logs").mkdir()
        subprocess.run(["mount", "--bind", str(tmp_path / "logs"), str(disk / "logs")], check=True)
        try:
            yield disk
        finally:
            subprocess.run(["umount", str(disk / "logs")], check=False)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    """Write `path` until the disk takes no more."""
    with open(path, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * (1 << 20))
            out.flush()


async def test_a_full_data_disk_pauses_and_work_resumes_when_space_returns(
    small_disk: Path,
) -> None:
    # The embedded layout: nats-server's store shares the disk (after a write error it takes
    # no more writes until it restarts: the stack's watchdog does that once space is back).
    small = {  # streams that fit the small disk's JetStream budget (75% of it)
        f"CUMULUS_RETENTION_{name}_MAX_BYTES": "6m"
        for name in ("JOBS", "LOGS", "RESULTS", "MAP_INPUTS")
    }
    stack = Stack(data_dir=small_disk, env={"CUMULUS_WORKER_SANDBOX": "none", **small})
    filler = small_disk / "filler"
    try:
        await stack.start()
        await _fill_and_free(stack, filler)
    finally:
        stack.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(filler)


async def _submit_or_refused(client: cumulus.AsyncClient, i: int) -> tuple[Any, str]:
    """(the job, "") if the submit was accepted, else (None, the error's code)."""
    try:
        return await client.submit(double, i, gpu=0.1, duration=60), ""
    except cumulus.CumulusError as exc:
        return None, exc.code


async def _fill_and_free(stack: Stack, filler: Path) -> None:
    async with cumulus.AsyncClient(profile=stack.profile()) as client:
        before = [await client.submit(double, i, gpu=0.1, duration=60) for i in range(3)]
        assert [await asyncio.wait_for(j.result(), 60) for j in before] == [0, 2, 4]
        running = [await client.submit(slow_double, i, gpu=0.1, duration=60) for i in range(3)]
        await asyncio.to_thread(_fill, filler)
        # A submit now is accepted (and runs later) or refused at once, UNAVAILABLE: never
        # half-done, never a silent loss.
        tried = [await _submit_or_refused(client, i) for i in range(3)]
        assert {code for _, code in tried} <= {"", "UNAVAILABLE"}, tried
        during = [(i, job) for i, (job, _) in enumerate(tried) if job is not None]
        logs = stack.data_dir / "logs"
        deadline = time.monotonic() + 30
        while "consumption paused" not in _read_logs(logs):
            assert time.monotonic() < deadline, "no service said it paused"
            await asyncio.sleep(0.2)
        # The log line says what SQLite said, not a rollback's complaint about it.
        assert "database or disk is full" in _read_logs(logs)
        assert "cannot rollback" not in _read_logs(logs)
        await asyncio.sleep(2)
        stack._check_alive()  # nobody exited on the full disk
        os.unlink(filler)
        # A job running while its own output could not be written may fail (that is the
        # job's disk too), but every job ends, and a value that comes is the right one.
        for i, job in enumerate(running):
            outcome = await _outcome(job, 120)
            assert outcome in (2 * i, "INTERNAL"), outcome
        for i, job in during:
            assert await _outcome(job, 60) in (2 * i, "INTERNAL")
        assert "consumption resumed" in _read_logs(logs)
        after = await client.submit(double, 50, gpu=0.5, duration=60)
        assert await asyncio.wait_for(after.result(), 60) == 100
    stack._check_alive()


async def _outcome(job: Any, timeout: float) -> Any:
    """The job's value, or the code of the error it ended with."""
    try:
        return await asyncio.wait_for(job.result(), timeout)
    except cumulus.CumulusError as exc:
        return exc.code


def slow_double(x: int) -> int:
    import time

    time.sleep(3)
    return 2 * x


def _read_logs(logs: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))


# -- finding 1, the runtime's side: no event larger than the bus carries ---------------------


class Echo(EventService[list[str]]):
    """Answers each `submitted` with a `queued` whose reason is as long as the job id says."""

    name = "echo"

    def new_state(self) -> list[str]:
        return []

    def apply(self, event: Any) -> None:
        self.state.append(event.name)

    def decide(self, event: Any) -> list[ev.Event]:
        if isinstance(event, ev.JobSubmitted):
            size = int(event.job_id.removeprefix("j"))
            return [ev.JobQueued(job_id=event.job_id, position=1, reason="x" * size)]
        return []


def test_an_event_over_the_bus_limit_fails_its_job_instead_of_being_recorded(
    tmp_path: Path,
) -> None:
    service = Echo(config_mod.load(environ={"CUMULUS_DATA_DIR": str(tmp_path)}))
    fits = service.step(submitted("j1000"))
    assert [e.name for e in fits] == ["queued"]
    too_big = service.step(submitted(f"j{2 * 1024 * 1024}"))
    assert [e.name for e in too_big] == ["failed"]
    failure = too_big[0]
    assert isinstance(failure, ev.JobFailed)
    assert failure.code == "RESOURCE_EXHAUSTED"
    assert "over the bus's limit" in failure.message
    assert len(ev.encode(failure)) < 4096
    # The oversized event never reached the state; its replacement did.
    assert service.state == ["submitted", "queued", "submitted", "failed"]
