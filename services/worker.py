"""The worker agent: one worker's partitioner and runner in ONE process (`cumulus worker`).

A worker host runs this one process (infra/setup-worker.sh installs it as the systemd unit
`cumulus-worker.service`) instead of two services: one thing to install, supervise and restart,
and a host cannot end up with a partitioner that registers the worker while no runner starts
its jobs. Both services keep their own event logs, durable consumers and connections to the bus
(the same credentials); they share the event loop, the logging and the metrics endpoint.

Lifecycle: both start (replay, connect, consume); SIGTERM or SIGINT stops both cleanly, exit 0.
If either cannot start (credentials refused, the bus unreachable, its database held by another
copy) or fails while it runs, the other is stopped too and the process exits 1 with one line
naming the service and the reason: the supervisor restarts the whole agent, whose replay is the
safe way back. A bad configuration exits 2 before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from shared import health, lifecycle
from shared.config import Config
from shared.errors import ConfigError, CumulusError
from shared.main import configured, run_loop
from shared.service import EventService

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
"""Exit statuses: stopped by a signal; a service failed (or could not start); bad config."""
WATCH_S = 0.5
"""How often the agent looks whether one of its services stopped by itself."""
START_TIMEOUT_S = 120.0
"""Longest a start may take (replay, connect, the streams, the consumers) before the agent
gives up: a start that never ends would keep a broken agent looking alive."""


def build(config: Config) -> list[EventService[Any]]:
    """The agent's services for this worker: the partitioner, then the runner."""
    from services.partitioner.app import Partitioner
    from services.runner.app import Runner

    return [Partitioner(config), Runner(config)]


REFUSED = ("authorization violation", "authentication", "certificate")
"""What nats-server says when it will not take an identity (its `-ERR` text, lower case)."""


async def refused(config: Config) -> str:
    """Why the bus refuses this worker's credentials, or "" (accepted, or not reachable now).

    The services connect with reconnects forever, so that a bus restart never kills them; at
    the first connection that would retry a refused identity forever too. One connection
    without retries tells a refusal (exit 1 at once: nothing but the operator fixes it) from
    a bus that is down (the services keep trying).
    """
    import nats

    from shared import auth

    path = config.nats.credentials
    try:
        creds = auth.load_credentials(path) if path else None
    except ConfigError as exc:
        return exc.message
    timeout = config.nats.connect_timeout
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=config.nats.url.split(","),
                name="cumulus-worker-probe",
                allow_reconnect=False,
                # nats-py tries a server until it failed more than this (0 would be forever)
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=timeout,
                error_cb=_quiet,
                **auth.connect_options(creds),
            ),
            timeout * 2 + 1,
        )
    except Exception as exc:  # nats-py raises plain Errors; only the words tell them apart
        text = str(exc).lower()
        if any(word in text for word in REFUSED):
            return f"the bus at {config.nats.url} refused the credentials {path or '(none)'}: {exc}"
        return ""
    await nc.close()
    return ""


async def _quiet(exc: Exception) -> None:
    """The probe's errors are reported by `refused`, not logged one by one."""


async def _unless(stop: asyncio.Event, check: Coroutine[Any, Any, str]) -> str:
    """`check`'s answer, or "" once `stop` is set first (a signal while it runs)."""
    task = asyncio.ensure_future(check)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return ""
    return task.result()


def _why(exc: BaseException) -> str:
    if isinstance(exc, CumulusError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, SystemExit):
        return str(exc.code)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _start(services: list[EventService[Any]], stop: asyncio.Event) -> str:
    """Start every service; "" when all run, else why one could not (the rest are stopped
    by the caller). A signal during the start ends it early, as a clean stop."""
    starts = [asyncio.create_task(s.start(), name=f"start-{s.name}") for s in services]
    stopped = asyncio.create_task(stop.wait(), name="stop")
    pending: set[asyncio.Task[Any]] = set(starts)
    loop = asyncio.get_running_loop()
    waits = services[0].config.nats.startup_timeout if services else 0.0
    # The bus may take nats.startup_timeout to come (0: as long as it takes), the rest as much.
    deadline = loop.time() + (START_TIMEOUT_S + waits if waits else float("inf"))
    try:
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                return f"did not start within {START_TIMEOUT_S:.0f} s"
            done, pending = await asyncio.wait(
                pending | {stopped}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stopped)
            if stopped in done:
                return ""
            for task, service in zip(starts, services, strict=True):
                failed = task.exception() if task in done else None
                if failed is not None:
                    return f"{service.name} could not start: {_why(failed)}"
        return ""
    finally:
        stopped.cancel()
        for task in starts:
            if not task.done():
                task.cancel()
        await asyncio.gather(*starts, stopped, return_exceptions=True)


async def _watch(services: list[EventService[Any]], stop: asyncio.Event) -> str:
    """Until a signal (""), or until a service fails (why)."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_S)
        if stop.is_set():
            return ""
        for service in services:
            if service.failure is not None:
                return f"{service.name} stopped after an unexpected error: {_why(service.failure)}"


async def run_agent(
    config: Config,
    stop: asyncio.Event | None = None,
    services: list[EventService[Any]] | None = None,
) -> int:
    """Run the worker's services until `stop` is set (SIGTERM/SIGINT set it) or one fails;
    the exit status (module docstring)."""
    stop = stop or asyncio.Event()
    lifecycle.on_signals("worker", stop.set)
    try:
        services = services if services is not None else build(config)
    except ConfigError as exc:
        print(f"cumulus worker: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    why = await _unless(stop, refused(config))
    if why:
        print(f"cumulus worker {config.worker_id}: {why}", file=sys.stderr)
        return EXIT_FAILED
    health.group("worker", services)  # systemd's READY=1 waits for both (shared/health.py)
    why = await _start(services, stop)
    if not why and not stop.is_set():
        await health.serve_group("worker", services)  # cumulus.health.worker.<worker id>
        log.info("worker agent running", extra={"fields": {"worker_id": config.worker_id}})
        why = await _watch(services, stop)
    for service in reversed(services):  # the runner first: no job starts after its partition
        with contextlib.suppress(Exception):
            await service.stop()
    if why:
        print(f"cumulus worker {config.worker_id}: {why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`cumulus worker [--config FILE]`: load the configuration, run the agent."""
    config = configured("worker", argv, __doc__.split("\n")[0])
    if config is None:
        return EXIT_USAGE
    return run_loop(run_agent(config))


if __name__ == "__main__":
    sys.exit(main())
