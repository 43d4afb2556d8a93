"""`cumulus run` and `cumulus submit`: ship a script, a directory or a function; follow it.

`run` shows what the job waits for (a spinner on a terminal, lines otherwise), streams its
logs, prints a function's value and exits with the job's status. Ctrl-C cancels the job, says
so and exits 130; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cumulus import AsyncClient, AsyncJob, JobOptions, RemoteFunction, _profiles, read_requirements
from cumulus.cli.exits import EXIT_OK, STATUS_EXIT, Interrupted, UsageError
from cumulus.cli.live import LiveOutput
from cumulus.cli.render import console, show_value
from shared import events as ev

CANCEL_WAIT_S = 15.0
"""How long an interrupted `run` waits to see the job's end after cancelling it."""


# -- what to run ------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A command-line argument as JSON where it parses, else as the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _import_target(target: str) -> tuple[str, Any]:
    """(module name, module) of `module:function` or `path/file.py:function`."""
    where = target.rpartition(":")[0]
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"{path} does not exist")
        sys.path.insert(0, str(path.resolve().parent))
        module_name = path.stem
    else:
        sys.path.insert(0, os.getcwd())
        module_name = where
    try:
        return module_name, importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None


def _looks_like_option(item: str) -> bool:
    """`--gpu`, `-q`: an option of `run` put after the target (`-1` and `"--x"` are values)."""
    return item.startswith("-") and len(item) > 1 and isinstance(parse_value(item), str)


def function_call(
    target: str, argv: list[str]
) -> tuple[Callable[..., Any], list[Any], dict[str, Any], JobOptions | None]:
    """`module:function` (or `path/file.py:function`), its arguments (JSON where they parse as
    JSON, else strings; `name=value` is a keyword argument) and the job options of its
    `@remote(...)`, if it has one. The arguments are checked against the function's signature
    here, before anything is submitted (a GPU share is never taken for a call that cannot
    start)."""
    name = target.rpartition(":")[2]
    module_name, func = _import_target(target)
    for part in name.split("."):
        func = getattr(func, part, None)
        if func is None:
            raise UsageError(f"{module_name} has no {name!r}")
    if not callable(func):
        raise UsageError(f"{target} is not a function")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in argv:
        if _looks_like_option(item):
            raise UsageError(
                f"{item} comes after the target {target}, so it would be an argument of "
                f"{name}: options of `cumulus run` go before the target (for the string "
                f"itself, write it as JSON: '\"{item}\"')"
            )
        key, eq, value = item.partition("=")
        if eq and key.isidentifier():
            kwargs[key] = parse_value(value)
        else:
            args.append(parse_value(item))
    declared = func.opts.job if isinstance(func, RemoteFunction) else None
    func = getattr(func, "__cumulus_function__", func)
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise UsageError(f"cannot call {name} with these arguments: {exc}") from None
    except ValueError:  # no signature to check (a builtin): the job says
        pass
    return func, args, kwargs, declared


def _requirements(args: argparse.Namespace, working_dir: Path | None) -> list[str]:
    found: list[str] = []
    for file in args.requirements or []:
        found += read_requirements(file)
    if not args.requirements and working_dir is not None:
        beside = working_dir / "requirements.txt"
        if beside.is_file():
            found = read_requirements(beside)
            if found:
                print(f"[cumulus] using requirements from {beside}", file=sys.stderr, flush=True)
    return found + list(args.pip or [])


def _env(pairs: list[str] | None) -> dict[str, str]:
    return _pairs(pairs, "--env wants NAME=VALUE")


def _tags(pairs: list[str] | None) -> dict[str, str]:
    """`--tag KEY=VALUE` options as a dict (the rules are checked by JobOptions)."""
    return _pairs(pairs, "--tag wants KEY=VALUE")


def _pairs(pairs: list[str] | None, wants: str) -> dict[str, str]:
    """`KEY=VALUE` options as a dict; UsageError `wants, not …` for one without a key or `=`."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"{wants}, not {pair!r}")
        out[key] = value
    return out


def _volumes(pairs: list[str] | None, base: JobOptions) -> dict[str, str] | None:
    """`--volume NAME:PATH` options over the function's own; None: none given."""
    if not pairs:
        return None
    wanted = dict(base.volumes)
    for pair in pairs:
        name, colon, path = pair.partition(":")
        if not colon or not name or not path:
            raise UsageError(f"--volume wants NAME:PATH, not {pair!r}")
        wanted[name] = path
    return wanted


@dataclass
class Target:
    """What `run` or `submit` ships: a function call, or a script in its working directory."""

    requirements: list[str]
    func: Callable[..., Any] | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    script: Path | None = None
    working_dir: Path | None = None
    declared: JobOptions | None = None
    """The function's own `@remote(...)` options: options given on the command line win."""


def target_of(args: argparse.Namespace) -> Target:
    target: str = args.target
    path = Path(target)
    if ":" in target and not path.exists():
        func, fargs, fkwargs, declared = function_call(target, list(args.args))
        return Target(_requirements(args, None), func, fargs, fkwargs, declared=declared)
    if path.is_dir():
        entry = next((path / n for n in ("main.py", "__main__.py") if (path / n).is_file()), None)
        if entry is None:
            raise UsageError(f"directory {path} has no main.py or __main__.py to run")
        working_dir, path = path, entry
    elif path.is_file():
        working_dir = Path(args.working_dir) if args.working_dir else path.parent
    else:
        raise UsageError(f"{target} is neither a file, a directory nor module:function")
    return Target(_requirements(args, working_dir), script=path, working_dir=working_dir)


def job_options(args: argparse.Namespace, target: Target) -> JobOptions:
    """The job's options: those given on the command line, over the function's `@remote(...)`
    ones (its requirements, environment and secrets are added to), over the defaults."""
    # the config.toml profile's defaults where the function declares none (cumulus/_profiles.py)
    base = target.declared or JobOptions(**_profiles.job_defaults(args.profile))
    env = _env(args.env)
    secrets = tuple(args.secret or ())
    tags = _tags(args.tag)
    return JobOptions.build(
        base,
        gpu=args.gpu,
        duration=args.duration,
        priority=args.priority,
        env={**base.env, **env} if env else None,
        requirements=[*base.requirements, *target.requirements] if target.requirements else None,
        network=True if args.network else None,
        secrets=[*base.secrets, *secrets] if secrets else None,
        packaging=args.packaging,
        name=args.name or None,
        tags={**base.tags, **tags} if tags else None,
        volumes=_volumes(getattr(args, "volume", None), base),
        image=getattr(args, "image", None),
        retries=args.retries,
    )


async def _submit(client: AsyncClient, args: argparse.Namespace, target: Target) -> AsyncJob:
    options = job_options(args, target)
    if target.func is not None:
        return await client.submit_call(target.func, target.args, target.kwargs, options)
    assert target.script is not None
    return await client.submit_script(
        target.script, list(args.args), options, working_dir=target.working_dir
    )


# -- following it -----------------------------------------------------------------------------


def waiting(event: ev.AnyJobEvent) -> str | None:
    """The progress line an event stands for (None: not a step of getting the job started)."""
    if isinstance(event, ev.JobSubmitted):
        return "submitted: waiting for the scheduler"
    if isinstance(event, ev.JobQueued):
        return f"queued (position {event.position}): {event.reason}"
    if isinstance(event, ev.WorkerSelected):
        return f"scheduled on {event.worker_id}: creating the GPU partition"
    if isinstance(event, ev.PartitionFailed):
        return f"partition failed on {event.worker_id} ({event.message}); placing it again"
    if isinstance(event, ev.PartitionReady):
        return f"partition ready on {event.worker_id}: starting"
    if isinstance(event, ev.JobStarted):
        backend = f" ({event.backend})" if event.backend else ""
        return f"running on {event.worker_id}{backend}"
    if isinstance(event, ev.PlacementRevoked) and event.retry_at:
        return event.reason  # "attempt 1 failed (…); retry 1 of 2 in 1 s"
    return None


class Progress:
    """What a job is waiting for, while it waits: a spinner on a terminal, lines otherwise."""

    def __init__(self, job_id: str, quiet: bool) -> None:
        self.job_id = job_id
        self.quiet = quiet
        self.console = console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.status: Any = None
        self.last = ""

    def update(self, event: ev.AnyJobEvent) -> None:
        text = waiting(event)
        if self.quiet or text is None or text == self.last:
            return
        self.last = text
        if not self.tty:
            print(f"[cumulus] job {self.job_id} {text}", file=sys.stderr, flush=True)
        elif self.status is None:
            self.status = self.console.status(f"job {self.job_id} {text}")
            self.status.start()
        else:
            self.status.update(f"job {self.job_id} {text}")

    def done(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


async def _follow(job: AsyncJob, progress: Progress, args: argparse.Namespace) -> ev.Terminal:
    """Show the job's progress and logs until its terminal event, and return that."""
    output = LiveOutput(sys.stderr if args.json else None)  # progress bars drawn live
    async with contextlib.aclosing(job.events()) as events:
        async for event in events:
            progress.update(event)
            if isinstance(event, ev.JobStarted):
                progress.done()
            elif isinstance(event, ev.JobLog) and not args.quiet:
                output.show(event)
            elif isinstance(event, ev.Terminal):
                output.close()
                return event
    output.close()
    raise RuntimeError(f"job {job.job_id} ended without an outcome")


async def _cancel_after_interrupt(job: AsyncJob, following: asyncio.Future[ev.Terminal]) -> None:
    """Ctrl-C: cancel the job, wait a little to see it end, say how it stands."""
    print(f"\ncumulus: interrupted; cancelling job {job.job_id} …", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        await job.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(following), CANCEL_WAIT_S)
    state = "cancel requested"
    if following.done() and not following.cancelled() and following.exception() is None:
        state = following.result().status
    print(f"cumulus: job {job.job_id} {state.lower()}", file=sys.stderr, flush=True)


async def follow_until_end(job: AsyncJob, args: argparse.Namespace) -> ev.Terminal:
    """The job's terminal event, following it; Ctrl-C cancels it and raises Interrupted."""
    progress = Progress(job.job_id, args.quiet)
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        interrupted.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    following = asyncio.ensure_future(_follow(job, progress, args))
    stopping = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not following.done():
            progress.done()
            await _cancel_after_interrupt(job, following)
            raise Interrupted(job.job_id)
        return following.result()
    finally:
        progress.done()
        for task in (following, stopping):
            task.cancel()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)


def _failure(end: ev.Terminal) -> tuple[str, str, str]:
    """(code, message, traceback) of a job's unsuccessful end."""
    if isinstance(end, ev.JobFailed):
        return end.code, end.message, end.traceback
    if isinstance(end, ev.JobTimedOut | ev.JobCancelled):
        return end.code, end.message, ""
    return "INTERNAL", end.status, ""


async def report(
    job: AsyncJob, end: ev.Terminal, args: argparse.Namespace, is_function: bool
) -> int:
    """Print the outcome (a function's value, or the job's error); the exit status."""
    outcome: dict[str, Any] = {"job_id": job.job_id, "status": end.status}
    if isinstance(end, ev.JobCompleted):
        value = await job.value(end) if is_function else None
        if args.json:
            outcome["result"] = value
            print(json.dumps(outcome, default=repr), flush=True)
        elif value is not None:
            print(show_value(value), flush=True)
        return EXIT_OK
    code, message, trace = _failure(end)
    if args.json:
        outcome["error"] = {"code": code, "message": message, "traceback": trace}
        print(json.dumps(outcome), flush=True)
    else:
        if trace:
            print(trace.rstrip(), file=sys.stderr)
        print(f"cumulus: job {job.job_id} {end.status}: {code}: {message}", file=sys.stderr)
    return STATUS_EXIT.get(end.status, 1)


async def run(args: argparse.Namespace, target: Target) -> int:
    """`cumulus run` and `cumulus submit` (`args.detach`)."""
    is_function = target.func is not None
    async with AsyncClient(
        args.url, args.user, profile=args.profile, packaging=args.packaging or "auto"
    ) as client:
        job = await _submit(client, args, target)
        if args.detach:
            print(json.dumps({"job_id": job.job_id}) if args.json else job.job_id, flush=True)
            return EXIT_OK
        if is_function and job.packaging and not args.quiet:
            print(f"[cumulus] job {job.job_id}: packaged as {job.packaging}", file=sys.stderr)
        end = await follow_until_end(job, args)
        return await report(job, end, args, is_function)
