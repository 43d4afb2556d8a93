"""Splitting a job's output into lines: the one splitter every backend uses.

The process backend's files (`FileTail`) and the container backends' log streams
(`LogStream`) both cut output into complete lines at newlines, cut longer lines at MAX_LINE
(so one line cannot exceed a message), and decode them leniently. The unterminated rest (a
progress bar rewritten with carriage returns) is shown live as a partial line: `shown`.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_LINE = 64 * 1024
"""A longer line is cut into pieces of this size, so one line cannot exceed a message."""
MAX_PARTIAL = 1024
"""A partial line shows at most this many characters (its end: where a progress bar is)."""
PARTIAL_S = 0.2
"""A job's unterminated last line is looked at this often, and published when it changed."""


class LineSplitter:
    """Bytes of one stream → complete lines, cut at MAX_LINE, with byte offsets.

    `offset` is where the lines returned so far end. A line cut at MAX_LINE whose newline
    comes in a later feed does not turn that newline into an empty line.
    """

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.buf = bytearray()
        self._cut = False
        """The last line returned was cut at MAX_LINE: a newline right after it is its own."""

    def feed(self, data: bytes) -> None:
        self.buf += data

    def pending(self) -> bytes:
        """The unterminated rest after the lines returned so far (b"" while lines wait)."""
        if b"\n" in self.buf:
            return b""
        return bytes(self.buf)

    def lines(self, final: bool) -> list[tuple[bytes, int]]:
        """(line, offset after it) for every complete line; with `final`, the rest too."""
        out: list[tuple[bytes, int]] = []
        buf = self.buf
        start = 0
        if self._cut and buf[:1] == b"\n":
            start = 1
        if buf:
            self._cut = False
        while True:
            nl = buf.find(b"\n", start, start + MAX_LINE + 1)
            if nl >= 0:
                out.append((bytes(buf[start:nl]), self.offset + nl + 1))
                start = nl + 1
            elif len(buf) - start >= MAX_LINE:
                out.append((bytes(buf[start : start + MAX_LINE]), self.offset + start + MAX_LINE))
                start += MAX_LINE
                self._cut = start == len(buf)
            else:
                break
        if final and start < len(buf):
            out.append((bytes(buf[start:]), self.offset + len(buf)))
            start = len(buf)
        del buf[:start]
        self.offset += start
        return out


def text(raw: bytes) -> str:
    """A line as text: undecodable bytes replaced, a trailing carriage return dropped."""
    return raw.decode(errors="replace").removesuffix("\r")


def shown(pending: bytes) -> str:
    """What a terminal shows of an unterminated line: the text after its last carriage return
    (the last non-empty one), never the in-job runner's markers (they start with \\x1e)."""
    cut = pending.find(b"\x1e")
    if cut >= 0:
        pending = pending[:cut]
    for part in reversed(pending.split(b"\r")):
        if part.strip():
            # "ignore": a character whose bytes are still on their way is not shown broken
            return part.decode(errors="ignore")[-MAX_PARTIAL:]
    return ""


class Live:
    """A job's unterminated last lines, published as they change (a progress bar drawn with
    carriage returns, a prompt without a newline).

    Looked at every PARTIAL_S: a stream's rest is published when what it shows changed and
    it holds a carriage return (a bar being redrawn) or stayed the same since the last look
    (quiet for PARTIAL_S, not a line still being written).
    """

    def __init__(self) -> None:
        self.shown: dict[str, str] = {}
        """What was published last per stream, until a complete line of the stream came."""
        self.seen: dict[str, bytes] = {}
        self.next_at = 0.0

    def ended(self, streams: Iterable[str]) -> None:
        """Complete lines of these streams came: their partial line is replaced."""
        for name in streams:
            self.shown.pop(name, None)
            self.seen.pop(name, None)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def look(self, pending: dict[str, bytes], now: float) -> list[tuple[str, str]]:
        """The (stream, text) partial lines to publish now, given each stream's rest."""
        self.next_at = now + PARTIAL_S
        out: list[tuple[str, str]] = []
        for name, data in pending.items():
            before = self.seen.get(name)
            self.seen[name] = data
            now_shown = shown(data)
            if not now_shown or now_shown == self.shown.get(name):
                continue
            if b"\r" in data or data == before:
                self.shown[name] = now_shown
                out.append((name, now_shown))
        return out
