"""Splitting a job's output into lines: the one splitter every backend uses.

The process backend's files (`FileTail`) and the container backends' log streams
(`LogStream`) both cut output into complete lines at newlines, cut longer lines at MAX_LINE
(so one line cannot exceed a message), and decode them leniently.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024
"""A longer line is cut into pieces of this size, so one line cannot exceed a message."""


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
