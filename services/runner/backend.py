"""What every runner backend provides, and reading a job's output into lines.

A backend starts a job idempotently (a second start of the same job and attempt adopts the
first), reports how it exited, kills it, cleans up, and exposes its output. Output is read as
complete lines, resumable from byte offsets recorded in the runner's log, so a restarted
runner neither repeats nor loses a line; the last line without a newline is delivered when
the job has exited.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from job_image.runner import FRAME as FRAME_TEXT

MAX_LINE = 64 * 1024
"""A longer line is cut into pieces of this size, so one line cannot exceed a message."""
MAX_FRAME = 256 * 1024 * 1024
"""Largest result frame read whole."""
FRAME = FRAME_TEXT.encode()


@dataclass(frozen=True)
class Exit:
    code: int | None
    """Exit status; None when the job vanished without one."""
    reason: str


class Backend(Protocol):
    name: str

    async def start(
        self, job_id: str, attempt: int, package: bytes, nonce: str, env: dict[str, str]
    ) -> str: ...

    def output_paths(self, job_id: str, attempt: int) -> dict[str, Path]: ...

    def exited(self, job_id: str, attempt: int, handle: str) -> Exit | None: ...

    async def kill(self, job_id: str, attempt: int, handle: str) -> None: ...

    async def cleanup(self, job_id: str, attempt: int) -> None: ...


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

    def _read(self, limit: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    def read(self, final: bool, limit: int = 1 << 20) -> list[str]:
        """New complete lines (and, if `final`, the unterminated rest), advancing the offset."""
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

    def _take(self, chunk: bytes, through: int) -> list[str]:
        self.offset += through
        lines: list[str] = []
        for raw in chunk.split(b"\n"):
            while len(raw) > MAX_LINE:
                lines.append(raw[:MAX_LINE].decode(errors="replace"))
                raw = raw[MAX_LINE:]
            lines.append(raw.decode(errors="replace"))
        if chunk.endswith(b"\n"):
            lines.pop()  # the empty string after the last newline
        return [line.removesuffix("\r") for line in lines]

    def _frame(self, final: bool) -> list[str]:
        data = self._read(MAX_FRAME)
        end = data.find(b"\n")
        if end < 0:
            if not final and len(data) < MAX_FRAME:
                return []
            end = len(data)
        self.offset += min(end + 1, len(data))
        return [data[:end].decode(errors="replace")]
