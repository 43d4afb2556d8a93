"""The runner's peak memory while a job returns a large result (issue 11, finding 7).

Starts an embedded stack (process backend), runs a warm-up job, resets the runner's peak RSS
(VmHWM, through /proc/<pid>/clear_refs), then runs one job returning `--mib` MiB of random
bytes and prints how it ended, when, the runner's RSS before and at its peak, and how long the
client took to fetch the value. Usage:

    .venv/bin/python bench/result_memory.py [--mib 300] [--max-result 1g]

`--max-result` sets `worker.max_result_bytes` (default: the configuration's, 256 MiB, which a
300 MiB result exceeds: the job then ends RESOURCE_EXHAUSTED, saying so). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus import AsyncClient  # noqa: E402
from services.stack import Stack  # noqa: E402

MiB = 1024 * 1024


def random_bytes(n: int) -> bytes:
    import os

    return os.urandom(n)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS (proc(5): clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def measure(mib: int, max_result: str) -> str:
    env = {"CUMULUS_LIMITS_MIN_DURATION": "1"}
    if max_result:
        env["CUMULUS_WORKER_MAX_RESULT_BYTES"] = max_result
    with tempfile.TemporaryDirectory(prefix="cumulus-result-memory-") as data:
        stack = Stack(data_dir=Path(data), backend="process", devices="2x16GiB", env=env)
        await stack.start()
        try:
            pid = stack.procs["runner-worker-1"].pid
            async with AsyncClient(profile=stack.profile()) as client:
                warm = await client.submit(random_bytes, 10, gpu=0.1, duration=300)
                await warm.result(timeout=120)
                reset_peak(pid)
                before = status_kib(pid, "VmRSS")
                started = time.monotonic()
                job = await client.submit(random_bytes, mib * MiB, gpu=0.1, duration=1800)
                status = await job.wait(timeout=1800)
                ended = time.monotonic() - started
                peak = status_kib(pid, "VmHWM")
                info = await job.status()
                fetched = ""
                if status == "COMPLETED":
                    begun = time.monotonic()
                    value = await job.result(timeout=1800)
                    took = time.monotonic() - begun
                    fetched = f"; fetched {len(value) / MiB:.0f} MiB in {took:.1f} s"
        finally:
            stack.stop()
    outcome = f"{status} {info.error_code or ''} {info.error_message or ''}".strip()
    return (
        f"{mib} MiB result: {outcome}; ended {ended:.1f} s after submit; runner RSS "
        f"{before / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB "
        f"(+{(peak - before) / MiB:.0f} MiB){fetched}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=300)
    parser.add_argument("--max-result", default="", help="worker.max_result_bytes, e.g. 1g")
    args = parser.parse_args()
    print(asyncio.run(measure(args.mib, args.max_result)))


if __name__ == "__main__":
    main()
