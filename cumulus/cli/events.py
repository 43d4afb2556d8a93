"""`cumulus events`: a readable live tail of the bus, like `nats sub 'jobs.>'`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

from cumulus import AsyncClient
from cumulus.cli.exits import EXIT_OK
from cumulus.cli.render import console, show_event
from cumulus.cli.run import parse_value


async def _show_all(client: AsyncClient, args: argparse.Namespace) -> None:
    """Print each message on the subject until `--count` of them were shown."""
    out = console()
    seen = 0
    async with contextlib.aclosing(client.tail(args.subject, replay=args.replay)) as messages:
        async for subject, data in messages:
            if args.json:
                value = parse_value(data.decode(errors="replace"))
                print(json.dumps({"subject": subject, "data": value}), flush=True)
            else:
                show_event(out, subject, data)
            seen += 1
            if args.count and seen >= args.count:
                return


async def tail(args: argparse.Namespace) -> int:
    """Until Ctrl-C, SIGTERM or `--count` events."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncClient(args.url, args.user, profile=args.profile) as client:
        showing = asyncio.ensure_future(_show_all(client, args))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({showing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if showing.done():
                showing.result()  # raise what it raised
        finally:
            for task in (showing, stopping):
                task.cancel()
            await asyncio.gather(showing, stopping, return_exceptions=True)
    return EXIT_OK
