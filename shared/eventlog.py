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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

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

T = TypeVar("T")


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
        self.on_write: Callable[[], object] | None = None
        """Called once per write transaction (a service counts them in a metric)."""

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

    def _count(self) -> None:
        if self.on_write is not None:
            self.on_write()

    async def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the connection in aiosqlite's own thread, in one hop: a transaction
        of many statements costs one thread handoff rather than one per statement."""
        execute = cast(Callable[..., Awaitable[T]], self._db._execute)

        def on_connection() -> T:
            return work(self._db._conn)

        return await execute(on_connection)

    async def commit(self, batch: Batch) -> list[OutboxRow]:
        """Write `batch` in one transaction; returns its outbox rows with their ids."""
        async with self._errors("commit"):
            self._count()
            first_id = await self._in_thread(lambda db: _commit(db, batch))
        for i, r in enumerate(batch.outbox):
            r.id = first_id + i
        return batch.outbox

    async def set_aside_outbox(self, rows: Sequence[OutboxRow], error: str) -> None:
        """Move outbox rows the bus will never take (too large, a bad subject) to `dead`."""
        if not rows:
            return

        def set_aside(db: sqlite3.Connection) -> None:
            now = time.time()
            db.executemany(
                "INSERT INTO dead(consumer, seq, subject, data, error, ts) "
                "VALUES ('outbox', ?, ?, ?, ?, ?)",
                [(r.id, r.subject, r.data, error, now) for r in rows],
            )
            db.executemany("DELETE FROM outbox WHERE id = ?", [(r.id,) for r in rows])

        async with self._errors("outbox set aside"):
            self._count()
            await self._in_thread(lambda db: _transaction(db, set_aside))

    async def save_snapshot(self, position: int, data: bytes, keep_dead: int) -> None:
        """Keep `data` as the state at `position`; drop older snapshots, the log rows before
        `position` (the row at it stays, so positions keep counting up) and all but the newest
        `keep_dead` dead letters. One transaction: a crash keeps the old snapshot and rows."""

        def save(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO snapshot(position, data, ts) VALUES (?, ?, ?)",
                (position, data, time.time()),
            )
            db.execute("DELETE FROM snapshot WHERE position < ?", (position,))
            db.execute("DELETE FROM log WHERE position < ?", (position,))
            db.execute(
                "DELETE FROM dead WHERE id <= (SELECT coalesce(max(id), 0) FROM dead) - ?",
                (keep_dead,),
            )

        async with self._errors("snapshot"):
            self._count()
            await self._in_thread(lambda db: _transaction(db, save))

    async def latest_snapshot(self) -> tuple[int, bytes] | None:
        """(position, data) of the newest snapshot, if the service ever took one."""
        async with self._errors("snapshot read"):
            cursor = await self._db.execute(
                "SELECT position, data FROM snapshot ORDER BY position DESC LIMIT 1"
            )
            row = await cursor.fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    async def published(self, ids: Sequence[int]) -> None:
        """Forget outbox rows that JetStream has acknowledged (one transaction)."""
        if not ids:
            return

        def forget(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

        async with self._errors("outbox delete"):
            self._count()
            await self._in_thread(lambda db: _transaction(db, forget))

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


def _transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], None]) -> None:
    """`work` in one write transaction (in the connection's thread)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        work(db)
        db.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (a full disk) may have ended the transaction already: the
        # rollback's own complaint must not hide the real error.
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _commit(db: sqlite3.Connection, batch: Batch) -> int:
    """Write `batch` (in the connection's thread); the id of its first outbox row."""
    first_id = 0

    def write(db: sqlite3.Connection) -> None:
        nonlocal first_id
        if batch.log:
            db.executemany("INSERT INTO log(data) VALUES (?)", [(d,) for d in batch.log])
        if batch.outbox:
            row = db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
            first_id = (row[0] if row else 0) + 1
            db.executemany(
                "INSERT INTO outbox(id, subject, msg_id, trace, data) VALUES (?,?,?,?,?)",
                [
                    (first_id + i, r.subject, r.msg_id, r.trace, r.data)
                    for i, r in enumerate(batch.outbox)
                ],
            )
        if batch.dead:
            now = time.time()
            db.executemany(
                "INSERT INTO dead(consumer, seq, subject, data, error, ts) VALUES (?,?,?,?,?,?)",
                [(*d, now) for d in batch.dead],
            )
        if batch.tracking:
            db.executemany(
                "INSERT INTO tracking(consumer, seq) VALUES (?, ?) "
                "ON CONFLICT(consumer) DO UPDATE SET seq = max(seq, excluded.seq)",
                list(batch.tracking.items()),
            )

    _transaction(db, write)
    return first_id


def read_log(path: Path, upto: int | None = None) -> Iterable[tuple[int, bytes]]:
    """Synchronous replay of a service's log file, for tools and tests."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        yield from db.execute(
            "SELECT position, data FROM log WHERE position <= ? ORDER BY position",
            (upto if upto is not None else 2**62,),
        )
