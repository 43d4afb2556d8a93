"""The embedded stack under a supervisor's signals: how long a stop takes, how much the services
log while their bus is away (docs/operations.md, "Signals" and "The bus away").

1. A stack (services.stack.Stack, --workers workers) starts; `stop()` is timed with its bus
   up -> seconds.
2. Another starts; its nats-server is killed (on purpose: the watchdog leaves it down); the
   services' logs are measured over --away seconds -> bytes, and bytes per minute; then
   `stop()` is timed with the bus away -> seconds.

`cumulus up` runs exactly this stop after SIGTERM. Usage:

    .venv/bin/python bench/supervised.py [--workers 1] [--away 30]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from services.stack import Stack


def _logs_size(data: Path) -> int:
    return sum(p.stat().st_size for p in (data / "logs").glob("*.log") if p.name != "nats.log")


async def _stack(root: Path, name: str, workers: int) -> Stack:
    stack = Stack(data_dir=root / name, workers=[f"worker-{i + 1}" for i in range(workers)])
    await stack.start()
    await asyncio.sleep(2)  # the first heartbeats, the lease
    return stack


async def main(workers: int, away: float) -> None:
    with tempfile.TemporaryDirectory(prefix="cumulus-bench-") as tmp:
        root = Path(tmp)
        stack = await _stack(root, "up", workers)
        began = time.monotonic()
        stack.stop()
        print(f"stop, bus up:              {time.monotonic() - began:5.2f} s")

        stack = await _stack(root, "away", workers)
        try:
            size = _logs_size(stack.data_dir)  # the lines of the loss count too
            stack.kill9("nats")
            await asyncio.sleep(away)
            grown = _logs_size(stack.data_dir) - size
            processes = len(stack.procs) - 1
            print(f"logged, bus away {away:.0f} s:    {grown:5d} bytes from {processes} processes")
        finally:
            began = time.monotonic()
            stack.stop()
            print(f"stop, bus away:            {time.monotonic() - began:5.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--away", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.workers, args.away))
