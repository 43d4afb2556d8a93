"""The read-only commands and `cancel`: status, logs, jobs, workers, health (`--json` for
scripts, tables otherwise)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable

from cumulus import AsyncClient
from cumulus.cli.exits import EXIT_OK
from cumulus.cli.live import LiveOutput
from cumulus.cli.render import dump, print_jobs, print_status, print_workers
from shared import events as ev
from shared import labels


async def _jobs(client: AsyncClient, args: argparse.Namespace) -> None:
    jobs = await client.jobs(
        [s.upper() for s in args.status or []],
        args.limit,
        name=args.name,
        tags=dict(labels.parse_tag(t) for t in args.tag or []),
        since=args.since,
        user=args.owner,
        all_users=args.all_users,
    )
    dump({"jobs": jobs}) if args.json else print_jobs(jobs)


async def _workers(client: AsyncClient, args: argparse.Namespace) -> None:
    listing = await client.worker_list()
    dump(listing) if args.json else print_workers(listing)


async def _health(client: AsyncClient, args: argparse.Namespace) -> None:
    health = await client.health()
    if args.json:
        dump(health)
        return
    print(
        f"gateway {health.status} (version {health.version}, up {health.uptime_s:.0f} s, "
        f"{health.jobs} jobs); scheduler {health.scheduler}"
    )


async def _status(client: AsyncClient, args: argparse.Namespace) -> None:
    job = await client.get_job(args.job_id).status()
    dump(job) if args.json else print_status(job)


async def _cancel(client: AsyncClient, args: argparse.Namespace) -> None:
    job = await client.get_job(args.job_id).cancel()
    if args.json:
        dump(job)
    elif job.status.is_terminal:
        print(f"job {job.job_id} already ended: {job.status}")
    else:
        print(f"cancel requested for job {job.job_id} (was {job.status})")


async def _logs(client: AsyncClient, args: argparse.Namespace) -> None:
    handle = client.get_job(args.job_id)
    await handle.status()  # NOT_FOUND (exit 3) for a job that does not exist
    output = LiveOutput()  # with -f, progress bars drawn live (cumulus/cli/live.py)
    async with contextlib.aclosing(handle.events(follow=args.follow)) as events:
        async for event in events:
            if isinstance(event, ev.JobLog):
                output.show(event)
    output.close()


COMMANDS: dict[str, Callable[[AsyncClient, argparse.Namespace], Awaitable[None]]] = {
    "jobs": _jobs,
    "workers": _workers,
    "health": _health,
    "status": _status,
    "cancel": _cancel,
    "logs": _logs,
}


async def look(args: argparse.Namespace) -> int:
    """Run one of COMMANDS; errors come back as typed CumulusErrors (main maps them)."""
    async with AsyncClient(args.url, args.user, profile=args.profile) as client:
        await COMMANDS[args.command](client, args)
    return EXIT_OK
