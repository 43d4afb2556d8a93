"""`cumulus up` and `cumulus demo`: the embedded stack on this machine.

The services are imported only here, inside the command, so the rest of `cumulus` (and the
SDK) never loads them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cumulus import AsyncClient, _profiles
from cumulus.cli.access import StackRecord, remove_record, write_record
from cumulus.cli.exits import EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE, UsageError
from shared import auth

if TYPE_CHECKING:
    from services.stack import Stack

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


def _example_path() -> str | None:
    """examples/train.py of this checkout, as the user can type it here (None: cumulus was
    installed without the examples)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "train.py"
    if not path.is_file():
        return None
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _banner(url: str, workers: int, devices: object, data_dir: Path) -> None:
    """What runs, and commands that work against it as printed (the profile `default` that
    `up` writes carries the URL, whatever --port); tests/cli/test_up_banner.py runs them."""
    print(
        f"Cumulus is up: NATS at {url}, {workers} worker(s) with "
        f"virtual devices {devices}; logs in {data_dir / 'logs'}",
        flush=True,
    )
    print(
        "  stopping it (Ctrl-C) stops its jobs; a job that outlives it anyway (up killed) "
        "ends when its partition expires",
        flush=True,
    )
    example = _example_path()
    if example is not None:
        print(f"  cumulus run {example}:train      # a function on half a GPU", flush=True)
        print(f"  python {example}                 # the same, from Python", flush=True)
    call = "cumulus.Client().run(lambda: 2 + 2, gpu=0.5)"
    print(f'  python -c "import cumulus; print({call})"', flush=True)


BACKEND_NOTES = {
    "process": "jobs run as processes on this machine",
    "docker": "jobs run in containers of the job image: its Python packages and what a job "
    "ships, not this virtualenv nor host paths (--backend process for those)",
    "swarm": "jobs run as Swarm services of the job image, placed on their worker's node",
}


def say_backend(stack: Stack) -> None:
    """Which backend runs the jobs, and why: `auto` never switches silently (no quote in the
    line: the banner's test reads its lines as shell words)."""
    if stack.config is None:
        return
    kind: str = stack.config.worker.backend
    why = "as configured"
    if kind == "auto":
        from services.runner.config import explain

        kind, found = explain(stack.config)
        why = f"auto: {found}"
    print(f"  backend: {kind} ({why}); {BACKEND_NOTES.get(kind, '')}", flush=True)


def serve_metrics(stack: Stack) -> None:
    """With metrics on: this process's own /metrics (its CPU and memory, nats-server's
    figures), and one line per process with its URL, for Prometheus's scrape config."""
    port = stack.reserve_metrics_port("up")
    if not port or stack.config is None:
        return
    from shared import metrics

    bind = stack.config.metrics_bind
    metrics.watch_nats(stack.monitor_port)
    try:
        metrics.start(port, bind)
    except OSError as exc:  # the stack runs on; only this process's own figures are missing
        print(f"cumulus: WARNING: no /metrics on {bind}:{port}: {exc}", file=sys.stderr)
    host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    host = f"[{host}]" if ":" in host else host
    print("  metrics (Prometheus targets):", flush=True)
    for name, each in stack.metrics_ports.items():
        print(f"    {name:<22} http://{host}:{each}/metrics", flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(args: argparse.Namespace) -> None:
    """Beyond loopback only with identities and TLS: a UsageError (exit 2) otherwise."""
    if is_loopback(args.listen):
        return
    if args.insecure:
        raise UsageError(
            f"refusing to listen on {args.listen} with --insecure: an open bus is for loopback "
            "only (drop --insecure, add --tls)"
        )
    if not args.tls:
        raise UsageError(
            f"refusing to listen on {args.listen} without TLS: beyond loopback, Cumulus needs "
            "identities and TLS; add --tls (and --tls-host NAME for the name clients use), "
            "or listen on 127.0.0.1"
        )


def write_profiles(stack: Stack) -> list[Path]:
    """`default` (the user `default`) and `admin` (the operator) under $CUMULUS_HOME, 0600,
    and the record `cumulus users` finds the stack by."""
    identities: tuple[tuple[auth.Role, str], ...] = (("user", "default"), ("admin", "admin"))
    made = [
        _profiles.save(name, auth.load_credentials(stack.credentials(role, name)))
        for role, name in identities
    ]
    record(stack)
    return made


def record(stack: Stack) -> None:
    """(Re)write the record of the running stack: its nats-server's pid changes when the
    stack restarts it."""
    nats_proc = stack.procs["nats"]
    write_record(
        StackRecord(
            data_dir=str(stack.data_dir.absolute()),
            nats_pid=nats_proc.pid,
            nats_config=str((stack.data_dir / "nats.conf").absolute()),
            url=stack.url,
            tls=stack.tls,
            ca_dir=str(stack.ca_dir.absolute()) if stack.ca_dir else "",
        )
    )


def _supervise(stack: Stack, stop: asyncio.Event, lost: list[str], recorded: bool) -> None:
    """Say what the stack's watchdog does (a nats-server restarted: the record, if `up`
    keeps one, follows its pid); when it gives up, `up` stops (`lost` says why)."""
    loop = asyncio.get_running_loop()

    def notify(line: str) -> None:
        print(f"cumulus: {line}", file=sys.stderr, flush=True)
        if recorded and stack.procs["nats"].alive():
            with contextlib.suppress(OSError):
                record(stack)

    def failed(line: str) -> None:
        lost.append(line)
        loop.call_soon_threadsafe(stop.set)

    stack.notify = notify
    stack.on_failure = failed


async def _start(stack: Stack, stop: asyncio.Event) -> int | None:
    """Start the stack; None once it runs, else the exit status: 2 when another stack holds
    the data dir or the port (nothing of it touched), 1 when a process exited at start, 0
    when a signal came first (what had started is stopped by the caller)."""
    from services.stack import StackInUse

    starting = asyncio.ensure_future(stack.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        return 0
    try:
        starting.result()
    except StackInUse as exc:  # the other stack is left as it was
        print(f"cumulus: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RuntimeError as exc:  # a process exited at start; its own line says why
        print(f"cumulus: {exc}", file=sys.stderr)
        return 1
    return None


def _take_signals(stack: Stack, stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set `stop`; a second one while the stack stops ends it at once."""

    def stopping() -> None:
        if stop.is_set():
            _hurry(stack)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)


def _stop(stack: Stack) -> None:
    """Stop the stack (its services together, within about 5 s: services/stack.py). The stop
    blocks the event loop, so a second signal meanwhile is taken in the main thread."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(sig)
            signal.signal(sig, lambda *_: _hurry(stack))
    stack.stop()


def _hurry(stack: Stack) -> None:
    """A second SIGINT/SIGTERM: SIGKILL the stack's processes and exit now (130). Their
    next start replays what this cut short; a job the process backend ran dies with its
    partition (`cumulus up` docs)."""
    print("cumulus: stopping now (second signal): processes killed", file=sys.stderr, flush=True)
    stack.kill_all()
    os._exit(EXIT_INTERRUPTED)


def _ca_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.ca).absolute() if args.ca else None


async def _demo(profile: str) -> None:
    async with AsyncClient(profile=profile) as client:
        print("running an example function on 0.5 GPU …", flush=True)
        value = await client.run(_example(), 21, gpu=0.5, duration=600, timeout=120)
        print(f"result: {json.dumps(value)}", flush=True)


async def up(args: argparse.Namespace, demo: bool) -> int:
    """Start the stack; run the example and stop (`demo`), or wait for Ctrl-C or SIGTERM.

    Exits 2 when another stack holds the data dir or the port (nothing of it touched), 6 when
    the stack's nats-server cannot be kept up."""
    from services.stack import Stack

    scratch = demo and not args.data_dir
    data_dir = Path(
        args.data_dir
        or (tempfile.mkdtemp(prefix="cumulus-") if demo else str(Path.home() / ".cumulus"))
    )
    # Only what the user gave: the rest comes from the config (--config, CUMULUS_* variables),
    # else the embedded defaults, as docs/config.md says.
    check_listen(args)
    if args.insecure:
        print(
            "cumulus: WARNING: --insecure: an open bus, anyone on this host is anyone",
            file=sys.stderr,
        )
    given = {"devices": args.devices, "backend": args.backend, "config_path": args.config}
    stack = Stack(
        data_dir=data_dir,
        port=args.port,
        workers=[f"worker-{i + 1}" for i in range(args.workers)],
        secure=not args.insecure,
        tls=args.tls,
        listen=args.listen,
        ca_dir=_ca_dir(args),
        tls_hosts=list(args.tls_host),
        **{key: value for key, value in given.items() if value is not None},
    )
    if args.metrics_port is not None:
        stack.env["CUMULUS_METRICS_PORT"] = str(args.metrics_port)
    stop = asyncio.Event()
    _take_signals(stack, stop)
    lost: list[str] = []
    _supervise(stack, stop, lost, recorded=not demo)
    print(f"starting Cumulus in {data_dir} …", flush=True)
    try:
        failed = await _start(stack, stop)
        if failed is not None:
            return failed
        devices = stack.devices or (stack.config.worker.devices if stack.config else "")
        _banner(stack.url, len(stack.workers), devices, data_dir)
        say_backend(stack)
        serve_metrics(stack)
        if demo:
            await _demo(stack.profile())
            return 0
        default, admin = write_profiles(stack)
        print(f"  profiles: {default} (you), {admin} (operator: `cumulus users add NAME`)")
        from cumulus.cli.dashboard import start_beside

        board = await start_beside(str(default), stack.config.dashboard.port if stack.config else 0)
        print("press Ctrl-C to stop", flush=True)
        try:
            await stop.wait()
        finally:
            if board is not None:
                await board.stop()
        if lost:
            print("cumulus: stopping: the stack's nats-server cannot be kept up", file=sys.stderr)
            return EXIT_UNAVAILABLE
        return 0
    finally:
        if stack.procs:
            print("stopping Cumulus (and its jobs) …", flush=True)
        if "nats" in stack.procs and stack.procs["nats"].popen is not None:
            remove_record(stack.procs["nats"].pid)
        stop.set()
        _stop(stack)
        if scratch:
            shutil.rmtree(data_dir, ignore_errors=True)
