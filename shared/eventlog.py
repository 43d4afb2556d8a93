"""The SQLite event log each service keeps: its memory, its outbox and its tracking rows.

One file per service, WAL mode. A service appends, in ONE transaction per batch: the events it
applied (consumed and emitted, in order), the events it must publish (the outbox), messages it
set aside, and the highest stream sequence it consumed (tracking). A crash at any point leaves
either all of that or none of it. On start the service restores its latest `snapshot` (if any),
replays the `log` rows after it to rebuild its state, and re-publishes whatever is still in
`outbox`. A snapshot at position P lets the rows before P go (`save_snapshot`): the log stays
as long as the snapshot interval, not as long as the service's life.

One writer per file: `EventLog.open` takes an exclusive lock on a lock file beside it
(`<file>.lock`, holding the owner's pid) for as long as the log is open, so a second copy of the
same service on the same data directory fails at start instead of interleaving its writes.

sqlite3 errors are turned into `EventLogError` here, at one choke point.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite

from shared.errors import EventLogError

SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    position INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tracking (
    consumer TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    subject TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    trace TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot (
    position INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY,
    consumer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    subject TEXT NOT NULL,
    data BLOB NOT NULL,
    error TEXT NOT NULL,
    ts REAL NOT NULL
);
"""


JOURNAL_LIMIT = 64 * 1024 * 1024


@dataclass
class OutboxRow:
    subject: str
    msg_id: str
    trace: str
    data: bytes
    id: int = 0


@dataclass
class Batch:
    """Everything one transaction writes."""

    log: list[bytes] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    dead: list[tuple[str, int, str, bytes, str]] = field(default_factory=list)
    tracking: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.log or self.outbox or self.dead or self.tracking)


class WriterLock:
    """An exclusive `flock` on `<db file>.lock`: one writer per event log, across processes.

    The lock file holds the owner's pid, for the message a second writer gets. The kernel drops
    the lock when its process dies, however it dies, so a crash never leaves it behind.
    """

    def __init__(self, db_path: Path, fd: int) -> None:
        self.db_path = db_path
        self._fd: int | None = fd

    @staticmethod
    def path_for(db_path: Path) -> Path:
        return db_path.with_name(db_path.name + ".lock")

    @classmethod
    def acquire(cls, db_path: Path) -> WriterLock:
        """Take the lock or raise EventLogError naming the file and the holder's pid."""
        lock_path = cls.path_for(db_path)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise EventLogError(
                f"cannot lock event log {db_path}: {exc}", path=str(db_path)
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise EventLogError(
                f"event log {db_path} is in use by another process ({holder}): stop that "
                "process first, or give this one its own data directory",
                path=str(db_path),
            ) from None
        except OSError as exc:
            os.close(fd)
            raise EventLogError(
                f"cannot lock event log {db_path}: {exc}", path=str(db_path)
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(db_path, fd)

    def release(self) -> None:
        """Give the lock up (closing the file does); the lock file stays, harmlessly."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(os.pread(fd, 32, 0).decode().strip())}"
    return "pid unknown"


class EventLog:
    """A service's SQLite file. Open with `await EventLog.open(path)`; only one at a time."""

    def __init__(
        self, db: aiosqlite.Connection, path: Path, lock: WriterLock | None = None
    ) -> None:
        self._db = db
        self.path = path
        self._lock = lock

    @classmethod
    async def open(cls, path: Path) -> EventLog:
        """Open (creating) the log at `path`, holding its writer lock until `close`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = WriterLock.acquire(path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            lock.release()
            raise EventLogError(f"cannot open event log {path}: {exc}", path=str(path)) from exc
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            # The WAL file shrinks back to this after a checkpoint instead of keeping its peak.
            await db.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT}")
            await db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            await db.close()  # its thread would otherwise keep the process alive
            lock.release()
            raise EventLogError(f"cannot open event log {path}: {exc}", path=str(path)) from exc
        return cls(db, path, lock)

    async def close(self) -> None:
        try:
            await self._db.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise EventLogError(
                f"event log {self.path}: {what} failed: {exc}", path=str(self.path)
            ) from exc

    async def commit(self, batch: Batch) -> list[OutboxRow]:
        """Write `batch` in one transaction; returns its outbox rows with their ids."""
        async with self._errors("commit"):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                if batch.log:
                    await self._db.executemany(
                        "INSERT INTO log(data) VALUES (?)", [(d,) for d in batch.log]
                    )
                first_id = 0
                if batch.outbox:
                    cursor = await self._db.execute("SELECT coalesce(max(id), 0) FROM outbox")
                    row = await cursor.fetchone()
                    first_id = (row[0] if row else 0) + 1
                    rows = [
                        (first_id + i, r.subject, r.msg_id, r.trace, r.data)
                        for i, r in enumerate(batch.outbox)
                    ]
                    await self._db.executemany(
                        "INSERT INTO outbox(id, subject, msg_id, trace, data) VALUES (?,?,?,?,?)",
                        rows,
                    )
                if batch.dead:
                    now = time.time()
                    await self._db.executemany(
                        "INSERT INTO dead(consumer, seq, subject, data, error, ts) "
                        "VALUES (?,?,?,?,?,?)",
                        [(*d, now) for d in batch.dead],
                    )
                if batch.tracking:
                    await self._db.executemany(
                        "INSERT INTO tracking(consumer, seq) VALUES (?, ?) "
                        "ON CONFLICT(consumer) DO UPDATE SET seq = max(seq, excluded.seq)",
                        list(batch.tracking.items()),
                    )
                await self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a full disk) may have ended the transaction already: the
                # rollback's own complaint must not hide the real error.
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                raise
        for i, r in enumerate(batch.outbox):
            r.id = first_id + i
        return batch.outbox

    async def set_aside_outbox(self, rows: Sequence[OutboxRow], error: str) -> None:
        """Move outbox rows the bus will never take (too large, a bad subject) to `dead`."""
        if not rows:
            return
        async with self._errors("outbox set aside"):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                await self._db.executemany(
                    "INSERT INTO dead(consumer, seq, subject, data, error, ts) "
                    "VALUES ('outbox', ?, ?, ?, ?, ?)",
                    [(r.id, r.subject, r.data, error, now) for r in rows],
                )
                await self._db.executemany(
                    "DELETE FROM outbox WHERE id = ?", [(r.id,) for r in rows]
                )
                await self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                raise

    async def save_snapshot(self, position: int, data: bytes, keep_dead: int) -> None:
        """Keep `data` as the state at `position`; drop older snapshots, the log rows before
        `position` (the row at it stays, so positions keep counting up) and all but the newest
        `keep_dead` dead letters. One transaction: a crash keeps the old snapshot and rows."""
        async with self._errors("snapshot"):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.execute(
                    "INSERT OR REPLACE INTO snapshot(position, data, ts) VALUES (?, ?, ?)",
                    (position, data, time.time()),
                )
                await self._db.execute("DELETE FROM snapshot WHERE position < ?", (position,))
                await self._db.execute("DELETE FROM log WHERE position < ?", (position,))
                await self._db.execute(
                    "DELETE FROM dead WHERE id <= (SELECT coalesce(max(id), 0) FROM dead) - ?",
                    (keep_dead,),
                )
                await self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                raise

    async def latest_snapshot(self) -> tuple[int, bytes] | None:
        """(position, data) of the newest snapshot, if the service ever took one."""
        async with self._errors("snapshot read"):
            cursor = await self._db.execute(
                "SELECT position, data FROM snapshot ORDER BY position DESC LIMIT 1"
            )
            row = await cursor.fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    async def published(self, ids: Sequence[int]) -> None:
        """Forget outbox rows that JetStream has acknowledged."""
        if not ids:
            return
        async with self._errors("outbox delete"):
            await self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    async def pending_outbox(self) -> list[OutboxRow]:
        async with self._errors("outbox read"):
            cursor = await self._db.execute(
                "SELECT id, subject, msg_id, trace, data FROM outbox ORDER BY id"
            )
            rows = await cursor.fetchall()
        return [OutboxRow(id=r[0], subject=r[1], msg_id=r[2], trace=r[3], data=r[4]) for r in rows]

    async def tracking(self) -> dict[str, int]:
        async with self._errors("tracking read"):
            cursor = await self._db.execute("SELECT consumer, seq FROM tracking")
            return {r[0]: r[1] for r in await cursor.fetchall()}

    async def replay(
        self, upto: int | None = None, after: int = 0
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(position, data) of every logged event after `after`, oldest first (up to `upto`)."""
        async with self._errors("replay"):
            cursor = await self._db.execute(
                "SELECT position, data FROM log WHERE position > ? AND position <= ? "
                "ORDER BY position",
                (after, upto if upto is not None else 2**62),
            )
            while rows := await cursor.fetchmany(4096):
                for row in rows:
                    yield row[0], row[1]

    async def position(self) -> int:
        async with self._errors("position read"):
            cursor = await self._db.execute("SELECT coalesce(max(position), 0) FROM log")
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def dead_letters(self) -> list[tuple[str, int, str, bytes, str]]:
        async with self._errors("dead read"):
            cursor = await self._db.execute(
                "SELECT consumer, seq, subject, data, error FROM dead ORDER BY id"
            )
            return [(r[0], r[1], r[2], r[3], r[4]) for r in await cursor.fetchall()]


def read_log(path: Path, upto: int | None = None) -> Iterable[tuple[int, bytes]]:
    """Synchronous replay of a service's log file, for tools and tests."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        yield from db.execute(
            "SELECT position, data FROM log WHERE position <= ? ORDER BY position",
            (upto if upto is not None else 2**62,),
        )
