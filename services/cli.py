"""The `cumulus` command: start the stack, run the services, look at jobs and workers.

    cumulus up [--data-dir D] [--devices 2x16GiB] [--port N]   the embedded stack, until Ctrl-C
    cumulus demo                                             up, run an example job, stop
    cumulus gateway|scheduler|partitioner|runner [--config F]  one service (deployments)
    cumulus status JOB | cancel JOB | jobs | workers [--json]
    cumulus events [SUBJECT]                                 live tail, like `nats sub 'jobs.>'`

Exit codes: 0 success; 1 the job or request failed; 2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_URL = os.environ.get("CUMULUS_NATS_URL", "nats://127.0.0.1:4222")


def _example(x: int) -> dict[str, Any]:
    """The demo job: prints what it sees of its GPU share and returns a small computation."""
    import os as _os

    print(
        f"hello from job {_os.environ.get('CUMULUS_JOB_ID')} "
        f"on {_os.environ.get('CUMULUS_WORKER_ID')}"
    )
    print(
        f"GPU share {_os.environ.get('CUMULUS_GPU_AMOUNT')}, "
        f"devices {_os.environ.get('CUDA_VISIBLE_DEVICES')}, "
        f"partition {_os.environ.get('CHRONOS_PARTITION_ID')}"
    )
    return {"answer": x + x, "squares": [i * i for i in range(5)]}


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
        print(
            f'  python -c "from sdk import CumulusClient; '
            f"print(CumulusClient('{stack.url}').run(lambda: 2 + 2, gpu=0.5))\"",
            flush=True,
        )
        if demo:
            from sdk import AsyncCumulusClient

            async with AsyncCumulusClient(stack.url) as client:
                print("running an example function on 0.5 GPU …", flush=True)
                value = await client.run(_example, 21, gpu=0.5, duration=600, timeout=120)
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


async def _call(url: str, op: str, body: Any) -> Any:
    import nats

    from shared import api

    nc = await nats.connect(url)
    try:
        return await api.request(nc, op, body, dict)
    finally:
        await nc.close()


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, default=str))
        return
    if "jobs" in value:
        print(f"{'JOB':24} {'STATUS':12} {'GPU':5} {'WORKER':12} WAITING/ERROR")
        for job in value["jobs"]:
            note = job.get("waiting_reason") or job.get("error_message") or ""
            print(
                f"{job['job_id']:24} {job['status']:12} {job['gpu']:5} "
                f"{job['worker_id'] or '-':12} {note}"
            )
    elif "workers" in value:
        for worker in value["workers"]:
            print(f"{worker['worker_id']} ({worker['status']}, {worker['backend']})")
            for d in worker["devices"]:
                jobs = ", ".join(f"{j}={a}" for j, a in d["jobs"].items()) or "-"
                print(
                    f"  gpu {d['index']} {d['name']} [{d['kind']}]: allocated {d['allocated']}, "
                    f"free {d['free']}; jobs: {jobs}"
                )
    else:
        print(json.dumps(value, indent=2, default=str))


async def _events(url: str, subject: str) -> int:
    import nats

    nc = await nats.connect(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def show(msg: Any) -> None:
        print(f"{msg.subject} {msg.data.decode(errors='replace')}", flush=True)

    await nc.subscribe(subject, cb=show)
    await stop.wait()
    await nc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cumulus", description="Share GPUs: run Python on a GPU share."
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="NATS URL (default $CUMULUS_NATS_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "demo"):
        p = sub.add_parser(
            name,
            help="start the embedded stack" + (", run an example, stop" if name == "demo" else ""),
        )
        p.add_argument("--data-dir")
        p.add_argument("--devices", default="2x16GiB", help="virtual devices per worker")
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--port", type=int, default=0 if name == "demo" else 4222)
    for name in ("gateway", "scheduler", "partitioner", "runner"):
        p = sub.add_parser(name, help=f"run the {name} service")
        p.add_argument("--config")
    for name in ("status", "cancel"):
        p = sub.add_parser(name)
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true")
    for name in ("jobs", "workers"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true")
    p = sub.add_parser("events", help="live tail of events")
    p.add_argument("subject", nargs="?", default="jobs.>")
    args = parser.parse_args(argv)

    from shared.errors import CumulusError

    try:
        if args.command in ("up", "demo"):
            return asyncio.run(_up(args, demo=args.command == "demo"))
        if args.command in ("gateway", "scheduler", "partitioner", "runner"):
            import importlib

            from shared.main import run_service

            module = importlib.import_module(f"services.{args.command}.app")
            cls = getattr(module, args.command.capitalize())
            return run_service(cls, ["--config", args.config] if args.config else [])
        if args.command == "events":
            return asyncio.run(_events(args.url, args.subject))
        body: Any = {"job_id": args.job_id} if args.command in ("status", "cancel") else {}
        _print(asyncio.run(_call(args.url, args.command, body)), args.json)
        return 0
    except CumulusError as exc:
        print(f"cumulus: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
