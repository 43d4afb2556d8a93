"""`cumulus dashboard`: the live web dashboard, until Ctrl-C; and the one `cumulus up` starts.

The services are imported only inside the command, as for `cumulus up`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING

from cumulus.cli.exits import EXIT_OK, UsageError
from cumulus.cli.up import is_loopback
from shared.errors import CumulusError

if TYPE_CHECKING:
    from services.dashboard.app import Dashboard


def _port(args: argparse.Namespace) -> int:
    if args.port is not None:
        return int(args.port)
    from shared import config

    return config.load().dashboard.port or config.DashboardConfig().port


async def dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard for the profile's user; print its URL (with the token)."""
    from services.dashboard.app import Dashboard

    if not is_loopback(args.bind):
        print(
            f"cumulus: WARNING: the dashboard on {args.bind} is plain HTTP; the token in its "
            "URL is all that keeps others out (prefer 127.0.0.1 and an SSH tunnel)",
            flush=True,
        )
    board = Dashboard(profile=args.profile, nats_url=args.url, user=args.user, bind=args.bind)
    board.port = _port(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await board.start()
    except OSError as exc:
        raise UsageError(f"cannot serve the dashboard on {args.bind}:{board.port}: {exc}") from None
    try:
        print(f"Cumulus dashboard: {board.url}", flush=True)
        await stop.wait()
    finally:
        await board.stop()
    return EXIT_OK


async def start_beside(profile: str, port: int) -> Dashboard | None:
    """The dashboard `cumulus up` runs (None when `dashboard.port` is 0): on `port`, or a free
    port when that one is taken; its URL is printed."""
    if not port:
        return None
    from services.dashboard.app import Dashboard

    board = Dashboard(profile=profile, port=port, fallback=True)
    try:
        await board.start()
    except (CumulusError, OSError) as exc:  # the stack serves on without it
        print(f"cumulus: WARNING: no dashboard: {exc}", file=sys.stderr, flush=True)
        return None
    print(f"  dashboard: {board.url}", flush=True)
    return board
