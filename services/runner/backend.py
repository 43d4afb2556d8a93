"""What every runner backend provides, and reading a job's output into lines.

A backend starts a job idempotently (a second start of the same job and attempt adopts the
first), reports how it exited, kills it, cleans up, lists what it holds (for reconciling after
a crash), and exposes the job's output as an `Output`: complete lines in order, resumable from
a cursor recorded in the runner's log, so a restarted runner neither repeats nor loses a line.
The last line without a newline is delivered once the output is complete.

Output comes from files (the process backend: `FileOutput` over two `FileTail`s) or from a log
stream (Docker and Swarm: `LogStream` in `services/runner/logstream.py`); both cut lines with
`lines.LineSplitter` and keep the result frame whole up to MAX_FRAME (the in-job runner's are
far smaller: a large value travels in its result file, `result_path`, read by
`services/runner/results.py`); a longer one is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from job_image.runner import END as END_TEXT
from job_image.runner import FRAME as FRAME_TEXT
from services.runner.lines import MAX_LINE, LineSplitter, text

__all__ = ["MAX_LINE", "Backend", "Exit", "FileOutput", "FileTail", "Launch", "Output"]

MAX_FRAME = 1024 * 1024
"""Largest result frame read whole (the in-job runner's stay under ~400 KiB)."""
FRAME = FRAME_TEXT.encode()
END = END_TEXT
DROPPED = "[cumulus] a result frame over 1 MiB was dropped (job image older than its worker?)"


@dataclass(frozen=True)
class Exit:
    code: int | None
    """Exit status; None when the job vanished without one."""
    reason: str


@dataclass(frozen=True)
class Launch:
    """Everything a backend needs to start one attempt of a job."""

    job_id: str
    attempt: int
    package: Path | bytes
    """The code package: the runner's cached file (copied into the job's directory), or the
    bytes of a small one built in this process."""
    nonce: str
    env: dict[str, str]
    requirements: list[str] = field(default_factory=list)
    network: bool = False
    """The job asked for network access (isolated by default)."""
    volumes: dict[str, str] = field(default_factory=dict)
    """Offered folders to mount, {name: where} (shared/volumes.py; container backends)."""
    image: str = ""
    """The job's own image (shared/images.py); "": container.image. Container backends."""


class Output(Protocol):
    """A job's output as (stream, line) pairs, in order, resumable from `cursor()`."""

    async def read(self, final: bool) -> list[tuple[str, str]]:
        """Lines readable now, a bounded amount per call.

        `final` says the job has ended: the unterminated rest is delivered once the output is
        complete, and `done` turns true when nothing more will come.
        """
        ...

    @property
    def done(self) -> bool: ...

    @property
    def complete(self) -> bool:
        """The in-job runner closed both streams (result written): the job is finishing."""
        ...

    def cursor(self) -> dict[str, int]:
        """Where the lines returned so far end (per stream), for resuming after a restart."""
        ...

    def partial(self) -> dict[str, bytes]:
        """Per stream, the unterminated output after the lines returned so far (b"" while
        complete lines wait): a progress bar's current state, shown live."""
        ...

    async def wait(self, timeout: float) -> None:
        """Until more output may be readable, at most `timeout` seconds."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    async def start(self, launch: Launch) -> str:
        """Start the attempt (or adopt the one already started) and return its handle."""
        ...

    def output(
        self, job_id: str, attempt: int, handle: str, nonce: str, cursor: dict[str, int]
    ) -> Output: ...

    async def exited(self, job_id: str, attempt: int, handle: str) -> Exit | None:
        """How the attempt ended, or None while it runs."""
        ...

    async def kill(self, job_id: str, attempt: int, handle: str) -> None: ...

    async def cleanup(self, job_id: str, attempt: int) -> None:
        """Remove everything the attempt left: process or container, service, files."""
        ...

    async def held(self) -> list[tuple[str, int]]:
        """(job id, attempt) of everything this backend holds on this worker."""
        ...

    def result_path(self, job_id: str, attempt: int) -> Path:
        """Where, on this host, the attempt's in-job runner writes a result too large for its
        frame (job_image/runner.py RESULT_FILE, in the job's directory)."""
        ...


class FileOutput:
    """The process backend's output: stdout.log and stderr.log in the job's directory."""

    def __init__(
        self, paths: dict[str, Path], cursor: dict[str, int], ended: asyncio.Event | None = None
    ) -> None:
        self.tails = {name: FileTail(path, cursor.get(name, 0)) for name, path in paths.items()}
        self._done = False
        self._ended = ended
        """Set when the job's launcher reports its exit: wakes `wait` at once."""

    async def read(self, final: bool) -> list[tuple[str, str]]:
        lines: list[tuple[str, str]] = []
        for name, tail in self.tails.items():
            for _ in range(8):
                got = tail.read(final)
                if not got:
                    break
                lines.extend((name, text) for text in got)
        self._done = final and not lines
        return lines

    @property
    def done(self) -> bool:
        return self._done

    @property
    def complete(self) -> bool:
        return False

    def cursor(self) -> dict[str, int]:
        return {name: tail.offset for name, tail in self.tails.items()}

    def partial(self) -> dict[str, bytes]:
        return {name: tail.pending() for name, tail in self.tails.items()}

    async def wait(self, timeout: float) -> None:
        if self._ended is None or self._ended.is_set():
            await asyncio.sleep(timeout)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)

    def close(self) -> None:
        pass


class FileTail:
    """Complete lines appended to a file since `offset`.

    The in-job runner's result frame (`\x1eCUMULUS-RESULT …`) starts a record of its own even
    when the user's last output had no newline, and is never cut however long it is.
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._cut = False
        """The last read ended inside a line cut at MAX_LINE; its newline is still to come."""
        self._dropping = False
        """Inside a frame longer than MAX_FRAME: skipped up to its newline."""

    def _read(self, limit: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    def read(self, final: bool, limit: int = 1 << 20) -> list[str]:
        """New complete lines (and, if `final`, the unterminated rest), advancing the offset."""
        while self._dropping:
            data = self._read(limit)
            if not data:
                return []
            nl = data.find(b"\n")
            self.offset += len(data) if nl < 0 else nl + 1
            self._dropping = nl < 0
        data = self._read(limit)
        if self._cut and data.startswith(b"\n"):
            self.offset += 1
            data = data[1:]
        self._cut = False
        if not data:
            return []
        at = data.find(FRAME)
        if at == 0:
            return self._frame(final)
        if at > 0:
            # User bytes before the frame end there, newline or not: nothing follows the frame.
            return self._take(data[:at], through=at)
        more_waiting = len(data) == limit
        end = data.rfind(b"\n")
        if end < 0 and not final and len(data) < MAX_LINE and not more_waiting:
            return []
        if final and not more_waiting:
            end = len(data) - 1
        elif end < 0:
            end = min(len(data), MAX_LINE) - 1
            self._cut = True
        return self._take(data[: end + 1], through=end + 1)

    def pending(self) -> bytes:
        """The unterminated rest after the lines read so far (b"" while lines wait)."""
        if self._dropping:
            return b""
        data = self._read(MAX_LINE)
        if b"\n" in data:
            return b""
        return data

    def _take(self, chunk: bytes, through: int) -> list[str]:
        """Every line of `chunk` (the last one whether or not a newline ends it)."""
        self.offset += through
        split = LineSplitter()
        split.feed(chunk)
        return [text(raw) for raw, _ in split.lines(final=True)]

    def _frame(self, final: bool) -> list[str]:
        data = self._read(MAX_FRAME + 1)
        end = data.find(b"\n")
        if end < 0:
            if len(data) > MAX_FRAME:
                self._dropping = True
                return [DROPPED]
            if not final:
                return []
            end = len(data)
        self.offset += min(end + 1, len(data))
        return [data[:end].decode(errors="replace")]
