"""A job's output printed as it comes, with its progress bars live.

A `partial` JobLog carries a job's unterminated last line as it stands (a progress bar drawn
with carriage returns): on a terminal it is drawn in place and redrawn as it changes; the
stream's next line replaces it. Elsewhere (a file, a pipe) partial lines are skipped: the
complete line follows with the final text, so a log file holds each line once.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from shared import events as ev

CLEAR = "\x1b[K"
"""Erases the rest of the terminal line (what a longer earlier state left)."""


def _tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


class LiveOutput:
    """Prints JobLog events: each line to its stream (or to `to`), partial ones in place."""

    def __init__(self, to: TextIO | None = None) -> None:
        self.to = to
        self.drawn: TextIO | None = None
        """Where a partial line stands drawn now, the cursor at its end."""

    def _out(self, stream: str) -> TextIO:
        if self.to is not None:
            return self.to
        return sys.stderr if stream == "stderr" else sys.stdout

    def show(self, event: ev.JobLog) -> None:
        for line in event.lines:
            out = self._out(line.stream)
            if not event.partial:
                self._clear()
                print(line.text, file=out, flush=True)
            elif _tty(out):
                if self.drawn is not None and self.drawn is not out:
                    self._clear()
                # One row only: a wrapped line would leave its first rows behind.
                width = max(10, shutil.get_terminal_size().columns - 1)
                out.write(f"\r{line.text[-width:]}{CLEAR}")
                out.flush()
                self.drawn = out

    def _clear(self) -> None:
        if self.drawn is not None:
            self.drawn.write(f"\r{CLEAR}")
            self.drawn.flush()
            self.drawn = None

    def close(self) -> None:
        """The output ended with a partial line drawn: it stays, and the cursor moves on."""
        if self.drawn is not None:
            self.drawn.write("\n")
            self.drawn.flush()
            self.drawn = None
