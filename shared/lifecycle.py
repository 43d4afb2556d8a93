"""Signals, as a supervisor (systemd, Swarm, `cumulus up`) sends them to a service process.

- SIGTERM or SIGINT, in any state (starting, waiting for the bus, replaying, serving): the
  service stops cleanly (shared/service.py `stop`). If that has not ended the process within
  STOP_DEADLINE_S, it exits at once, status 1: what was cut short is in the event log and the
  outbox, and the next start's replay repairs it (DESIGN.md rules 2 and 3).
- A second SIGTERM or SIGINT while it stops: exit at once (status 128 + the signal's number).
- SIGHUP: reopen the log file (shared/telemetry.py `reopen_logs`, for logrotate); harmless
  when the logs go to a terminal or a pipe.

docs/operations.md, "Signals", says the same for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from shared.telemetry import reopen_logs

log = logging.getLogger(__name__)

STOP_DEADLINE_S = 4.5
"""Longest a process takes from the first SIGTERM/SIGINT to its exit (the issue asks 5 s)."""
EXIT_STOP_CUT_SHORT = 1
"""The exit status when a stop did not finish within STOP_DEADLINE_S."""


def _exit_now(status: int, why: str, name: str) -> None:
    """End the process at once: no cleanup (a clean stop is what did not finish)."""
    with contextlib.suppress(Exception):
        log.warning(why, extra={"fields": {"service": name, "exit_status": status}})
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
    os._exit(status)


class Signals:
    """The signal handlers of one process: `stop` is called on the first SIGTERM/SIGINT."""

    def __init__(self, name: str, stop: Callable[[], None]) -> None:
        self.name = name
        self.stop = stop
        self.stopping = False
        self._deadline: threading.Timer | None = None

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> Signals:
        loop = loop or asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._stop_signal, sig)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, reopen_logs)
        return self

    def _stop_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            _exit_now(128 + sig, f"{sig.name} again while stopping: exiting now", self.name)
            return
        self.stopping = True
        log.info(
            f"{sig.name}: stopping (a second signal exits at once)",
            extra={"fields": {"service": self.name}},
        )
        # A thread, not the loop: a stop stuck in a thread (SQLite, Docker) or a busy loop
        # must not keep the process past its deadline.
        self._deadline = threading.Timer(
            STOP_DEADLINE_S,
            _exit_now,
            (
                EXIT_STOP_CUT_SHORT,
                f"stop did not finish within {STOP_DEADLINE_S:g} s: exiting now; the next "
                "start's replay repairs what was cut short",
                self.name,
            ),
        )
        self._deadline.daemon = True
        self._deadline.start()
        self.stop()


def on_signals(name: str, stop: Callable[[], None]) -> Signals:
    """Install the handlers on the running loop (see the module docstring)."""
    return Signals(name, stop).install()
