"""`cumulus up` and `cumulus demo`: the embedded stack on this machine.

The services are imported only here, inside the command, so the rest of `cumulus` (and the
SDK) never loads them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from cumulus import AsyncClient

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
    print(f"  export CUMULUS_NATS_URL={url}", flush=True)
    print("  cumulus run examples/train.py      # or, from Python:", flush=True)
    call = f"cumulus.Client('{url}').run(lambda: 2 + 2, gpu=0.5)"
    print(f'  python -c "import cumulus; print({call})"', flush=True)


async def _demo(url: str) -> None:
    async with AsyncClient(url) as client:
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
    given = {"devices": args.devices, "backend": args.backend, "config_path": args.config}
    stack = Stack(
        data_dir=data_dir,
        port=args.port,
        workers=[f"worker-{i + 1}" for i in range(args.workers)],
        **{key: value for key, value in given.items() if value is not None},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"starting Cumulus in {data_dir} …", flush=True)
    try:
        await stack.start()
        _banner(stack.url, len(stack.workers), stack.devices, data_dir)
        if demo:
            await _demo(stack.url)
            return 0
        print("press Ctrl-C to stop", flush=True)
        await stop.wait()
        return 0
    finally:
        print("stopping Cumulus …", flush=True)
        stack.stop()
        if scratch:
            shutil.rmtree(data_dir, ignore_errors=True)
