"""`cumulus up` and `cumulus demo`: the embedded stack on this machine.

The services are imported only here, inside the command, so the rest of `cumulus` (and the
SDK) never loads them.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cumulus import AsyncClient, _profiles
from cumulus.cli.access import StackRecord, remove_record, write_record
from cumulus.cli.exits import UsageError
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


def _banner(url: str, workers: int, devices: object, data_dir: Path) -> None:
    print(
        f"Cumulus is up: NATS at {url}, {workers} worker(s) with "
        f"virtual devices {devices}; logs in {data_dir / 'logs'}",
        flush=True,
    )
    print("  cumulus run examples/train.py      # or, from Python:", flush=True)
    call = "cumulus.Client().run(lambda: 2 + 2, gpu=0.5)"
    print(f'  python -c "import cumulus; print({call})"', flush=True)


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
    return made


def _ca_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.ca).absolute() if args.ca else None


async def _demo(profile: str) -> None:
    async with AsyncClient(profile=profile) as client:
        print("running an example function on 0.5 GPU …", flush=True)
        value = await client.run(_example(), 21, gpu=0.5, duration=600, timeout=120)
        print(f"result: {json.dumps(value)}", flush=True)


async def up(args: argparse.Namespace, demo: bool) -> int:
    """Start the stack; run the example and stop (`demo`), or wait for Ctrl-C or SIGTERM."""
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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"starting Cumulus in {data_dir} …", flush=True)
    try:
        try:
            await stack.start()
        except RuntimeError as exc:  # a process exited at start; its own line says why
            print(f"cumulus: {exc}", file=sys.stderr)
            return 1
        devices = stack.devices or (stack.config.worker.devices if stack.config else "")
        _banner(stack.url, len(stack.workers), devices, data_dir)
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
        return 0
    finally:
        print("stopping Cumulus …", flush=True)
        if "nats" in stack.procs and stack.procs["nats"].popen is not None:
            remove_record(stack.procs["nats"].pid)
        stack.stop()
        if scratch:
            shutil.rmtree(data_dir, ignore_errors=True)
