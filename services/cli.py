"""The `cumulus` command: run code on GPU shares, look at jobs and workers, start the stack.

    cumulus up [--devices 2x16GiB] [--workers N] [--port 4222]   the embedded stack, until Ctrl-C
    cumulus demo                                                 up, run an example job, stop
    cumulus gateway|scheduler|partitioner|runner [--config F]    one service (deployments)
    cumulus run [OPTIONS] script.py|dir|module:function [ARGS…]  run, stream logs, exit as the job
    cumulus submit [OPTIONS] TARGET [ARGS…]                      the same, detached: prints the id
    cumulus status JOB | logs JOB [-f] | cancel JOB
    cumulus jobs | workers | health                              tables (--json for scripts)
    cumulus events [SUBJECT]                                     live tail, like `nats sub 'jobs.>'`

Options of `run` and `submit` come before the target; everything after it goes to the target.
Exit codes (docs/cli.md): 0 done; 1 the job failed; 2 bad usage or INVALID_ARGUMENT; 3 NOT_FOUND;
4 DEADLINE_EXCEEDED; 5 CANCELLED; 6 UNAVAILABLE or RESOURCE_EXHAUSTED (try later);
7 PERMISSION_DENIED or UNAUTHENTICATED; 130 interrupted (Ctrl-C; `run` cancels its job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from sdk import AsyncCumulusClient, AsyncJob

DEFAULT_URL = os.environ.get("CUMULUS_NATS_URL", "nats://127.0.0.1:4222")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_TIMED_OUT = 4
EXIT_CANCELLED = 5
EXIT_UNAVAILABLE = 6
EXIT_DENIED = 7
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    "INTERNAL": EXIT_FAILED,
    "INVALID_ARGUMENT": EXIT_USAGE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "DEADLINE_EXCEEDED": EXIT_TIMED_OUT,
    "CANCELLED": EXIT_CANCELLED,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "PERMISSION_DENIED": EXIT_DENIED,
    "UNAUTHENTICATED": EXIT_DENIED,
}
"""The exit status for each seed code (a job's or a request's)."""

STATUS_EXIT = {
    "COMPLETED": EXIT_OK,
    "FAILED": EXIT_FAILED,
    "TIMED_OUT": EXIT_TIMED_OUT,
    "CANCELLED": EXIT_CANCELLED,
}

STYLES = {
    "submitted": "cyan",
    "queued": "yellow",
    "scheduled": "blue",
    "partition_ready": "blue",
    "partition_failed": "red",
    "started": "green",
    "completed": "bold green",
    "failed": "bold red",
    "timed_out": "bold red",
    "cancelled": "bold yellow",
    "cancel_requested": "yellow",
    "partition_released": "dim",
    "log": "dim",
}


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # Piped output keeps whole rows (no wrapping at 80 columns) and no colour codes.
    return Console(file=stream, width=None if tty else 200, highlight=False, soft_wrap=not tty)


_EXAMPLE = """
def example(x):
    \"\"\"The demo job: prints what it sees of its GPU share, returns a small computation.\"\"\"
    import os

    job, worker = os.environ.get("CUMULUS_JOB_ID"), os.environ.get("CUMULUS_WORKER_ID")
    print(f"hello from job {job} on {worker}")
    print(
        f"GPU share {os.environ.get('CUMULUS_GPU_AMOUNT')}, "
        f"devices {os.environ.get('CUDA_VISIBLE_DEVICES')}, "
        f"partition {os.environ.get('CHRONOS_PARTITION_ID')}"
    )
    return {"answer": x + x, "squares": [i * i for i in range(5)]}
"""


def _example() -> Any:
    """The demo function, defined as a user's script would define it.

    It lives in no installed module, so it travels by value and runs in a container too
    (a function of this package would be pickled by reference, and the job image does not
    hold the services).
    """
    namespace: dict[str, Any] = {"__name__": "cumulus_demo"}
    exec(compile(_EXAMPLE, "cumulus_demo.py", "exec"), namespace)
    return namespace["example"]


# -- up / demo ------------------------------------------------------------------------------


async def _up(args: argparse.Namespace, demo: bool) -> int:
    from services.stack import Stack

    scratch = demo and not args.data_dir
    data_dir = Path(
        args.data_dir
        or (tempfile.mkdtemp(prefix="cumulus-") if demo else str(Path.home() / ".cumulus"))
    )
    stack = Stack(
        data_dir=data_dir,
        devices=args.devices,
        port=args.port,
        workers=[f"worker-{i + 1}" for i in range(args.workers)],
        backend=args.backend,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"starting Cumulus in {data_dir} …", flush=True)
    try:
        await stack.start()
        print(
            f"Cumulus is up: NATS at {stack.url}, {len(stack.workers)} worker(s) with "
            f"virtual devices {args.devices}; logs in {data_dir / 'logs'}",
            flush=True,
        )
        print(f"  export CUMULUS_NATS_URL={stack.url}", flush=True)
        print("  cumulus run examples/train.py      # or, from Python:", flush=True)
        print(
            f'  python -c "from sdk import CumulusClient; '
            f"print(CumulusClient('{stack.url}').run(lambda: 2 + 2, gpu=0.5))\"",
            flush=True,
        )
        if demo:
            from sdk import AsyncCumulusClient

            async with AsyncCumulusClient(stack.url) as client:
                print("running an example function on 0.5 GPU …", flush=True)
                value = await client.run(_example(), 21, gpu=0.5, duration=600, timeout=120)
                print(f"result: {json.dumps(value)}", flush=True)
            return 0
        print("press Ctrl-C to stop", flush=True)
        await stop.wait()
        return 0
    finally:
        print("stopping Cumulus …", flush=True)
        stack.stop()
        if scratch:
            shutil.rmtree(data_dir, ignore_errors=True)


# -- run / submit ---------------------------------------------------------------------------


class UsageError(Exception):
    """Bad command-line input: printed, exit status 2."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _function_call(
    target: str, argv: list[str]
) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    """`module:function` (or `path/file.py:function`) and its arguments: JSON where they parse
    as JSON, else strings; `name=value` is a keyword argument."""
    where, _, name = target.rpartition(":")
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
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    func = module
    for part in name.split("."):
        func = getattr(func, part, None)  # type: ignore[assignment]
        if func is None:
            raise UsageError(f"{module_name} has no {name!r}")
    if not callable(func):
        raise UsageError(f"{target} is not a function")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in argv:
        key, eq, value = item.partition("=")
        if eq and key.isidentifier():
            kwargs[key] = _parse_value(value)
        else:
            args.append(_parse_value(item))
    return getattr(func, "__cumulus_function__", func), args, kwargs


def _requirements(args: argparse.Namespace, working_dir: Path | None) -> list[str]:
    from sdk import read_requirements

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
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--env wants NAME=VALUE, not {pair!r}")
        env[key] = value
    return env


@dataclass
class Target:
    """What `run` or `submit` ships: a function call, or a script in its working directory."""

    requirements: list[str]
    func: Callable[..., Any] | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    script: Path | None = None
    working_dir: Path | None = None


def _target(args: argparse.Namespace) -> Target:
    target: str = args.target
    path = Path(target)
    if ":" in target and not path.exists():
        func, fargs, fkwargs = _function_call(target, list(args.args))
        return Target(_requirements(args, None), func, fargs, fkwargs)
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


async def _submit(client: AsyncCumulusClient, args: argparse.Namespace, target: Target) -> AsyncJob:
    options: dict[str, Any] = {
        "gpu": args.gpu,
        "duration": args.duration,
        "priority": args.priority,
        "env": _env(args.env),
        "requirements": target.requirements,
    }
    if target.func is not None:
        return await client.submit_call(target.func, target.args, target.kwargs, **options)
    assert target.script is not None
    return await client.submit_script(
        target.script, list(args.args), working_dir=target.working_dir, **options
    )


class Progress:
    """What a job is waiting for, while it waits: a spinner on a terminal, lines otherwise."""

    def __init__(self, job_id: str, quiet: bool) -> None:
        self.job_id = job_id
        self.quiet = quiet
        self.console = _console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.status: Any = None
        self.last = ""

    def update(self, event: Any) -> None:
        text = _waiting(event)
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


def _waiting(event: Any) -> str | None:
    """The progress line an event stands for (None: not a step of getting the job started)."""
    from shared import events as ev

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
        return f"running on {event.worker_id}"
    return None


def _show_value(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


async def _run(args: argparse.Namespace, target: Target) -> int:
    from sdk import AsyncCumulusClient
    from shared import events as ev

    is_function = target.func is not None
    async with AsyncCumulusClient(args.url, args.user, packaging=args.packaging) as client:
        job = await _submit(client, args, target)
        if args.detach:
            print(json.dumps({"job_id": job.job_id}) if args.json else job.job_id, flush=True)
            return EXIT_OK
        if is_function and job.packaging and not args.quiet:
            print(f"[cumulus] job {job.job_id}: packaged as {job.packaging}", file=sys.stderr)
        progress = Progress(job.job_id, args.quiet)
        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            interrupted.set()
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        logs_to = sys.stderr if args.json else None
        outcome: dict[str, Any] = {"job_id": job.job_id}

        async def follow() -> ev.Terminal | None:
            async with contextlib.aclosing(job.events()) as events:
                async for event in events:
                    progress.update(event)
                    if isinstance(event, ev.JobStarted):
                        progress.done()
                    elif isinstance(event, ev.JobLog) and not args.quiet:
                        for line in event.lines:
                            stream = sys.stderr if line.stream == "stderr" else sys.stdout
                            print(line.text, file=logs_to or stream, flush=True)
                    elif isinstance(event, ev.Terminal):
                        return event
            return None

        following = asyncio.ensure_future(follow())
        stopping = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                progress.done()
                print(
                    f"\ncumulus: interrupted; cancelling job {job.job_id} …",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(Exception):
                    await job.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(following), 15)
                state = "cancel requested"
                if following.done() and following.exception() is None:
                    state = getattr(following.result(), "status", state)
                print(f"cumulus: job {job.job_id} {state.lower()}", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            end = following.result()
        finally:
            progress.done()
            for task in (following, stopping):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGINT)
        if end is None:
            raise RuntimeError(f"job {job.job_id} ended without an outcome")
        outcome["status"] = end.status
        if isinstance(end, ev.JobCompleted):
            value = await job._value(end) if is_function else None
            if args.json:
                outcome["result"] = value
                print(json.dumps(outcome, default=repr), flush=True)
            elif value is not None:
                print(_show_value(value), flush=True)
            return EXIT_OK
        code = getattr(end, "code", "INTERNAL")
        message = getattr(end, "message", end.status)
        trace = getattr(end, "traceback", "")
        if args.json:
            outcome["error"] = {"code": code, "message": message, "traceback": trace}
            print(json.dumps(outcome), flush=True)
        else:
            if trace:
                print(trace.rstrip(), file=sys.stderr)
            print(f"cumulus: job {job.job_id} {end.status}: {code}: {message}", file=sys.stderr)
        return STATUS_EXIT.get(end.status, EXIT_FAILED)


# -- looking at jobs and workers ------------------------------------------------------------


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _runtime(job: dict[str, Any]) -> str:
    start, end = job.get("started_at"), job.get("finished_at")
    if not start:
        return "-"
    return f"{(end or time.time()) - start:.1f}s"


def _table(*columns: str) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column != "NOTE", overflow="fold")
    return table


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    table = _table("JOB", "STATUS", "GPU", "WORKER", "SUBMITTED", "RUNTIME", "NOTE")
    for job in jobs:
        note = job.get("waiting_reason") or ""
        if job.get("error_code"):
            note = f"{job['error_code']}: {job.get('error_message', '')}"
        table.add_row(
            job["job_id"],
            f"[{_status_style(job['status'])}]{job['status']}[/]",
            str(job.get("gpu", "")),
            job.get("worker_id") or "-",
            _age(job.get("submitted_at")),
            _runtime(job),
            note,
        )
    _console().print(table)
    if not jobs:
        print("no jobs")


def _status_style(status: str) -> str:
    return {
        "COMPLETED": "green",
        "FAILED": "red",
        "TIMED_OUT": "red",
        "CANCELLED": "yellow",
        "RUNNING": "bold",
        "QUEUED": "yellow",
    }.get(status, "cyan")


def _print_workers(reply: dict[str, Any]) -> None:
    table = _table("WORKER", "STATUS", "BACKEND", "GPU", "DEVICE", "ALLOCATED", "FREE", "JOBS")
    for worker in reply.get("workers", []):
        devices = worker.get("devices") or [{}]
        for i, d in enumerate(devices):
            jobs = ", ".join(f"{j}={a}" for j, a in (d.get("jobs") or {}).items()) or "-"
            first = i == 0
            table.add_row(
                worker["worker_id"] if first else "",
                (worker["status"] if first else ""),
                (worker.get("backend", "") if first else ""),
                str(d.get("index", "-")),
                f"{d.get('name', '')} [{d.get('kind', '')}]" if d else "-",
                str(d.get("allocated", "-")),
                str(d.get("free", "-")),
                jobs,
            )
    _console().print(table)
    print(f"{len(reply.get('workers', []))} worker(s); {reply.get('queued', 0)} job(s) queued")


def _print_status(job: dict[str, Any]) -> None:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    fields = [
        ("job", job["job_id"]),
        ("status", f"[{_status_style(job['status'])}]{job['status']}[/]"),
        ("gpu", job.get("gpu")),
        ("duration", f"{job.get('duration_s')} s"),
        ("worker", job.get("worker_id") or "-"),
        ("devices", ", ".join(map(str, job.get("devices") or [])) or "-"),
        ("partitions", ", ".join(job.get("partition_ids") or []) or "-"),
        ("submitted", _age(job.get("submitted_at"))),
        ("runtime", _runtime(job)),
    ]
    if job.get("queue_position") is not None:
        fields.append(("queue position", job["queue_position"]))
    if job.get("waiting_reason"):
        fields.append(("waiting for", job["waiting_reason"]))
    if job.get("error_code"):
        fields.append(("error", f"{job['error_code']}: {job.get('error_message', '')}"))
    if job.get("cancel_requested") and job["status"] not in STATUS_EXIT:
        fields.append(("cancel", "requested"))
    for key, value in fields:
        grid.add_row(key, str(value))
    _console().print(grid)


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str), flush=True)


async def _look(args: argparse.Namespace) -> int:
    from sdk import AsyncCumulusClient

    async with AsyncCumulusClient(args.url, args.user) as client:
        command = args.command
        if command == "jobs":
            jobs = await client.jobs([s.upper() for s in args.status or []], args.limit)
            _dump({"jobs": jobs}) if args.json else _print_jobs(jobs)
        elif command == "workers":
            reply = await client.workers()
            _dump(reply) if args.json else _print_workers(reply)
        elif command == "health":
            reply = await client.health()
            _dump(reply) if args.json else print(
                f"gateway {reply['status']} (version {reply['version']}, up "
                f"{reply['uptime_s']:.0f} s, {reply['jobs']} jobs); scheduler {reply['scheduler']}"
            )
        elif command == "status":
            job = await client.get_job(args.job_id).status()
            _dump(job) if args.json else _print_status(job)
        elif command == "cancel":
            job = await client.get_job(args.job_id).cancel()
            if args.json:
                _dump(job)
            elif job["status"] in STATUS_EXIT:
                print(f"job {args.job_id} already ended: {job['status']}")
            else:
                print(f"cancel requested for job {args.job_id} (was {job['status']})")
        elif command == "logs":
            return await _logs(client, args)
    return EXIT_OK


async def _logs(client: AsyncCumulusClient, args: argparse.Namespace) -> int:
    handle = client.get_job(args.job_id)
    await handle.status()  # NOT_FOUND (exit 3) for a job that does not exist
    async with contextlib.aclosing(handle.logs(follow=args.follow)) as lines:
        async for line in lines:
            out = sys.stderr if line.stream == "stderr" else sys.stdout
            print(line.text, file=out, flush=True)
    return EXIT_OK


# -- events ---------------------------------------------------------------------------------


def describe(name: str, body: dict[str, Any]) -> str:
    """One readable line for an event (its log lines follow it, one per line)."""
    spec = body.get("spec") or {}
    first = str(body.get("message") or "").split("\n", 1)[0]
    ids = ", ".join(body.get("partition_ids") or [])
    facts: dict[str, Callable[[], str]] = {
        "submitted": lambda: (
            f"gpu {spec['gpu_tenths'] / 10:g}, {spec['duration_s']} s, {spec['entrypoint']}"
            + (f", requirements {spec['requirements']}" if spec.get("requirements") else "")
        ),
        "queued": lambda: f"position {body['position']}: {body['reason']}",
        "scheduled": lambda: (
            f"{body['tenths'] / 10:g} of gpu {body['devices']} (attempt {body['attempt']})"
        ),
        "partition_ready": lambda: f"partitions {ids}",
        "partition_released": lambda: f"partitions {ids}",
        "partition_failed": lambda: f"{body['code']}: {first}",
        "started": lambda: f"{body['backend']} {body['handle']}",
        "log": lambda: f"{len(body['lines'])} line(s) from #{body['seq']}",
        "completed": lambda: f"in {body.get('runtime_s', 0):.2f} s",
        "failed": lambda: f"{body['code']}: {first}",
        "timed_out": lambda: f"{body['code']}: {first}",
        "cancelled": lambda: first,
        "cancel_requested": lambda: str(body["reason"]),
        "cancel": lambda: str(body["reason"]),
        "revoked": lambda: f"attempt {body['attempt']}: {body['reason']}",
        "registered": lambda: (
            f"{body['hostname']} ({body['backend']}), {len(body['devices'])} device(s)"
        ),
        "heartbeat": lambda: f"every {body['interval_s']} s",
    }
    try:
        return facts[name]()
    except (KeyError, TypeError, ValueError):
        skip = ("type", "event_id", "ts", "trace", "job_id", "user", "worker_id")
        return ", ".join(f"{k}={v}" for k, v in body.items() if k not in skip)


async def _events(args: argparse.Namespace) -> int:
    import nats

    from sdk import AsyncCumulusClient

    console = _console()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seen = 0

    def show(subject: str, data: bytes) -> None:
        nonlocal seen
        seen += 1
        if args.json:
            value = _parse_value(data.decode(errors="replace"))
            print(json.dumps({"subject": subject, "data": value}), flush=True)
        else:
            _show_event(console, subject, data)
        if args.count and seen >= args.count:
            stop.set()

    client = AsyncCumulusClient(args.url, args.user)
    await client.connect()
    try:
        sub: Any
        if args.replay:
            from nats.js.api import ConsumerConfig, DeliverPolicy

            sub = await client.nc.jetstream().subscribe(
                args.subject,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
        else:
            sub = await client.nc.subscribe(args.subject)
        waiter = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(sub.next_msg(timeout=None))
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    with contextlib.suppress(nats.errors.TimeoutError):
                        msg = getter.result()
                        show(msg.subject, msg.data)
                else:
                    getter.cancel()
        finally:
            waiter.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        await client.close()
    return EXIT_OK


def _show_event(console: Console, subject: str, data: bytes) -> None:
    from rich.markup import escape

    stamp = time.strftime("%H:%M:%S")
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    name = subject.rsplit(".", 1)[-1]
    if not isinstance(body, dict) or "type" not in body:
        text = data.decode(errors="replace")
        console.print(f"[dim]{stamp}[/] {escape(subject)} {escape(text)}")
        return
    ts = body.get("ts")
    if isinstance(ts, int | float):
        stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    style = STYLES.get(name, "")
    console.print(
        f"[dim]{stamp}[/] {escape(subject)} [{style or 'default'}]{escape(name)}[/] "
        f"{escape(describe(name, body))}"
    )
    for line in body.get("lines", []) if name == "log" else []:
        stream, text = (line + ["", ""])[:2] if isinstance(line, list) else ("stdout", str(line))
        mark = "[red]│[/]" if stream == "stderr" else "[dim]│[/]"
        console.print(f"  {mark} {escape(text)}")


# -- the parser -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cumulus",
        description="Share GPUs: run Python on a GPU share.",
        epilog="Exit codes: 0 done; 1 job failed; 2 usage/INVALID_ARGUMENT; 3 NOT_FOUND; "
        "4 DEADLINE_EXCEEDED; 5 CANCELLED; 6 UNAVAILABLE/RESOURCE_EXHAUSTED; "
        "7 PERMISSION_DENIED; 130 interrupted. See docs/cli.md.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="NATS URL (default $CUMULUS_NATS_URL)")
    parser.add_argument(
        "--user", default=os.environ.get("CUMULUS_USER"), help="user (default $CUMULUS_USER)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("up", "demo"):
        p = sub.add_parser(
            name,
            help="start the embedded stack" + (", run an example, stop" if name == "demo" else ""),
        )
        p.add_argument("--data-dir")
        p.add_argument("--devices", default="2x16GiB", help="virtual devices per worker")
        p.add_argument(
            "--backend",
            default="auto",
            choices=("auto", "process", "docker", "swarm"),
            help="where jobs run: auto = the Docker engine when it holds the job image, "
            "else a process per job",
        )
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--port", type=int, default=0 if name == "demo" else 4222)
    for name in ("run", "submit"):
        p = sub.add_parser(
            name,
            help="run a script, directory or module:function"
            + (" and follow it" if name == "run" else ", detached: print its id"),
            description="Options come before the target; what follows the target is its "
            "arguments (for module:function, JSON values or name=value keywords).",
        )
        p.add_argument("--gpu", default="0.5", help="0.1-0.9 or a whole 1-8 (default 0.5)")
        p.add_argument("--duration", type=int, default=3600, help="seconds, 60-86400")
        p.add_argument(
            "-r",
            "--requirements",
            action="append",
            metavar="FILE",
            help="requirements.txt to install in the job (default: the one beside the script)",
        )
        p.add_argument("--pip", action="append", metavar="SPEC", help="one more requirement")
        p.add_argument("--env", action="append", metavar="NAME=VALUE", help="job environment")
        p.add_argument("--priority", type=int, default=0)
        p.add_argument("--working-dir", help="directory shipped with a script (default: its own)")
        p.add_argument(
            "--packaging",
            choices=("auto", "pickle", "source"),
            default="auto",
            help="how a function travels (default: cloudpickle if the workers' Python matches)",
        )
        p.add_argument("--json", action="store_true", help="print the outcome as JSON")
        if name == "run":
            p.add_argument("-q", "--quiet", action="store_true", help="no logs, no progress")
        p.add_argument("target", help="script.py, a directory with main.py, or module:function")
        p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the target")
        p.set_defaults(detach=name == "submit", quiet=name == "submit")
    p = sub.add_parser("status", help="a job's status")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("logs", help="a job's output; -f follows it until the job ends")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true")
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("jobs", help="your jobs, newest first")
    p.add_argument("--status", action="append", help="only jobs in this status (repeatable)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    for name, text in (("workers", "workers and their GPU shares"), ("health", "API health")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
    p = sub.add_parser("events", help="live tail of events, like `nats sub 'jobs.>'`")
    p.add_argument("subject", nargs="?", default="jobs.>")
    p.add_argument("--replay", action="store_true", help="from the stream's first event")
    p.add_argument("--count", type=int, default=0, help="stop after this many")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    for name in ("gateway", "scheduler", "partitioner", "runner"):
        p = sub.add_parser(name, help=f"run the {name} service")
        p.add_argument("--config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from sdk import PackagingError
    from shared.errors import CumulusError

    try:
        if args.command in ("up", "demo"):
            return asyncio.run(_up(args, demo=args.command == "demo"))
        if args.command in ("gateway", "scheduler", "partitioner", "runner"):
            from shared.main import run_service

            module = importlib.import_module(f"services.{args.command}.app")
            cls = getattr(module, args.command.capitalize())
            return run_service(cls, ["--config", args.config] if args.config else [])
        if args.command in ("run", "submit"):
            return asyncio.run(_run(args, _target(args)))
        if args.command == "events":
            return asyncio.run(_events(args))
        return asyncio.run(_look(args))
    except CumulusError as exc:
        print(f"cumulus: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_FAILED)
    except (UsageError, PackagingError) as exc:
        print(f"cumulus: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
