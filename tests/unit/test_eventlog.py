"""The SQLite event log on real files: one transaction per batch, replay, outbox, tracking,
and one writer per file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.errors import EventLogError, Internal
from shared.eventlog import Batch, EventLog, OutboxRow, WriterLock, read_log


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "svc" / "svc.sqlite"


@pytest.fixture
async def log(db_path: Path) -> AsyncIterator[EventLog]:
    opened = await EventLog.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


def row(n: int) -> OutboxRow:
    return OutboxRow(
        subject=f"jobs.u.j{n}._.submitted", msg_id=f"m{n}", trace=f"t{n}", data=f"event{n}".encode()
    )


async def replayed(log: EventLog, upto: int | None = None) -> list[tuple[int, bytes]]:
    return [item async for item in log.replay(upto)]


def as_tuples(rows: list[OutboxRow]) -> list[tuple[int, str, str, str, bytes]]:
    return [(r.id, r.subject, r.msg_id, r.trace, r.data) for r in rows]


async def test_empty_log(log: EventLog) -> None:
    assert await replayed(log) == []
    assert await log.position() == 0
    assert await log.tracking() == {}
    assert await log.pending_outbox() == []
    assert await log.dead_letters() == []


async def test_commit_writes_log_outbox_and_tracking(log: EventLog) -> None:
    rows = await log.commit(
        Batch(log=[b"a", b"b"], outbox=[row(1), row(2)], tracking={"scheduler-jobs": 5})
    )
    assert [r.id for r in rows] == [1, 2]
    assert await replayed(log) == [(1, b"a"), (2, b"b")]
    assert await log.position() == 2
    assert await log.tracking() == {"scheduler-jobs": 5}
    assert as_tuples(await log.pending_outbox()) == as_tuples(rows)
    assert rows[0].data == b"event1"


async def test_outbox_ids_keep_growing_across_commits(log: EventLog) -> None:
    first = await log.commit(Batch(outbox=[row(1), row(2)]))
    second = await log.commit(Batch(outbox=[row(3)]))
    ids = [r.id for r in first + second]
    assert ids == sorted(set(ids))
    assert [r.msg_id for r in await log.pending_outbox()] == ["m1", "m2", "m3"]


async def test_published_rows_leave_the_outbox(log: EventLog) -> None:
    first = await log.commit(Batch(log=[b"a"], outbox=[row(1), row(2)]))
    second = await log.commit(Batch(log=[b"b"], outbox=[row(3)]))
    await log.published([r.id for r in first])
    assert [r.msg_id for r in await log.pending_outbox()] == ["m3"]
    await log.published([r.id for r in second])
    assert await log.pending_outbox() == []
    assert await replayed(log) == [(1, b"a"), (2, b"b")]  # the log itself is kept
    await log.published([])
    assert await log.position() == 2


async def test_tracking_keeps_the_highest_sequence_per_consumer(log: EventLog) -> None:
    await log.commit(Batch(tracking={"a": 10, "b": 1}))
    await log.commit(Batch(tracking={"a": 7}))  # a redelivered, older message
    assert await log.tracking() == {"a": 10, "b": 1}
    await log.commit(Batch(tracking={"a": 12, "b": 3}))
    assert await log.tracking() == {"a": 12, "b": 3}


async def test_replay_is_oldest_first_and_stops_at_upto(log: EventLog) -> None:
    await log.commit(Batch(log=[b"1", b"2"]))
    await log.commit(Batch(log=[b"3"]))
    await log.commit(Batch(log=[b"4", b"5"]))
    assert [d for _, d in await replayed(log)] == [b"1", b"2", b"3", b"4", b"5"]
    assert await replayed(log, upto=3) == [(1, b"1"), (2, b"2"), (3, b"3")]
    assert await replayed(log, upto=0) == []
    assert len(await replayed(log, upto=99)) == 5


async def test_replay_of_more_rows_than_one_fetch(log: EventLog) -> None:
    await log.commit(Batch(log=[str(i).encode() for i in range(5000)]))
    got = await replayed(log)
    assert len(got) == 5000
    assert got[-1] == (5000, b"4999")


async def test_dead_letters_are_kept(log: EventLog) -> None:
    await log.commit(Batch(dead=[("gateway-jobs", 9, "jobs.u.j._.x", b"junk", "malformed")]))
    assert await log.dead_letters() == [("gateway-jobs", 9, "jobs.u.j._.x", b"junk", "malformed")]


def test_an_empty_batch_is_falsy() -> None:
    assert not Batch()
    assert Batch(tracking={"c": 1})
    assert Batch(log=[b"x"])


async def test_failed_commit_rolls_back_everything(log: EventLog) -> None:
    await log.commit(Batch(log=[b"kept"], outbox=[row(1)], tracking={"c": 1}))
    bad = OutboxRow(subject="s", msg_id="m", trace="", data=None)  # type: ignore[arg-type]
    with pytest.raises(EventLogError, match="commit failed"):
        await log.commit(
            Batch(
                log=[b"lost1", b"lost2"],
                outbox=[row(2), bad],
                tracking={"c": 2, "d": 5},
                dead=[("c", 2, "s", b"x", "e")],
            )
        )
    assert await replayed(log) == [(1, b"kept")]
    assert await log.tracking() == {"c": 1}
    assert [r.msg_id for r in await log.pending_outbox()] == ["m1"]
    assert await log.dead_letters() == []
    # the log is still usable after the failure
    await log.commit(Batch(log=[b"next"], tracking={"c": 2}))
    assert [d for _, d in await replayed(log)] == [b"kept", b"next"]
    assert await log.tracking() == {"c": 2}


async def test_event_log_error_is_internal(log: EventLog) -> None:
    bad = OutboxRow(subject="s", msg_id="m", trace="", data=None)  # type: ignore[arg-type]
    with pytest.raises(Internal) as info:
        await log.commit(Batch(outbox=[bad]))
    assert isinstance(info.value, EventLogError)
    assert info.value.code == "INTERNAL"
    assert str(info.value.__cause__)  # the sqlite3 error is kept for the operator


async def test_reopening_sees_committed_data(db_path: Path) -> None:
    first = await EventLog.open(db_path)
    try:
        await first.commit(Batch(log=[b"a", b"b"], outbox=[row(1)], tracking={"c": 4}))
    finally:
        await first.close()
    again = await EventLog.open(db_path)
    try:
        assert await replayed(again) == [(1, b"a"), (2, b"b")]
        assert await again.tracking() == {"c": 4}
        assert [r.msg_id for r in await again.pending_outbox()] == ["m1"]
        assert await again.position() == 2
    finally:
        await again.close()


async def test_read_log_is_a_synchronous_replay(db_path: Path) -> None:
    opened = await EventLog.open(db_path)
    try:
        await opened.commit(Batch(log=[b"x", b"y", b"z"]))
    finally:
        await opened.close()
    assert list(read_log(db_path)) == [(1, b"x"), (2, b"y"), (3, b"z")]
    assert list(read_log(db_path, upto=2)) == [(1, b"x"), (2, b"y")]


async def test_opening_a_directory_is_an_event_log_error(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match="cannot open event log"):
        await EventLog.open(tmp_path)


def test_a_corrupt_file_is_reported_and_the_process_can_exit(tmp_path: Path) -> None:
    corrupt = tmp_path / "svc.sqlite"
    corrupt.write_bytes(b"this is not a database " * 200)
    script = textwrap.dedent(
        f"""
        import asyncio, pathlib
        from shared.errors import EventLogError
        from shared.eventlog import EventLog

        async def main():
            try:
                await EventLog.open(pathlib.Path({str(corrupt)!r}))
            except EventLogError as exc:
                print("reported:", exc, flush=True)

        asyncio.run(main())
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=1.5
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"the process did not exit after the error; its output: {out!r}")
    assert "reported: cannot open event log" in done.stdout
    assert done.returncode == 0


async def test_a_second_writer_is_refused_naming_the_file_and_the_holder(db_path: Path) -> None:
    first = await EventLog.open(db_path)
    try:
        with pytest.raises(EventLogError) as info:
            await EventLog.open(db_path)
    finally:
        await first.close()
    message = str(info.value)
    assert f"event log {db_path} is in use by another process (pid {os.getpid()})" in message
    assert info.value.path == str(db_path)
    assert WriterLock.path_for(db_path).exists()


async def test_closing_gives_the_writer_lock_back(db_path: Path) -> None:
    first = await EventLog.open(db_path)
    await first.close()
    again = await EventLog.open(db_path)  # no error: the lock went with the first
    await again.close()


def test_the_lock_dies_with_its_process(db_path: Path) -> None:
    """A holder killed with SIGKILL leaves no lock behind (the kernel drops it)."""
    script = textwrap.dedent(
        f"""
        import asyncio, pathlib, sys
        from shared.eventlog import EventLog

        async def main():
            await EventLog.open(pathlib.Path({str(db_path)!r}))
            print("locked", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(EventLogError, match=rf"\(pid {holder.pid}\)"):
            WriterLock.acquire(db_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    WriterLock.acquire(db_path).release()
