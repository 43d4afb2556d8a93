"""Submit → result latency of a trivial job on the embedded stack (process backend).

Prints p50/p99 over N sequential jobs after a warm-up, and, measured in the same run, the
floors it is made of: one JetStream publish→consume hop, and starting the in-job runner as a
bare subprocess (the process backend's unavoidable cost). Usage:

    .venv/bin/python bench/latency.py [--jobs 50] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus import AsyncClient, package_function  # noqa: E402
from services.stack import Stack  # noqa: E402


def trivial() -> int:
    return 2 + 2


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def hop_floor(url: str, n: int = 200) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench.>"])
    sub = await js.subscribe("bench.hop", ordered_consumer=True)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await js.publish("bench.hop", str(i).encode())
        await sub.next_msg(timeout=5)
        out.append(time.perf_counter() - t0)
    await js.delete_stream("BENCH")
    await nc.close()
    return out


def process_floor(tmp: Path, n: int = 10) -> list[float]:
    """Start the in-job runner on a function package as a bare subprocess, n times."""
    data = package_function(trivial)
    out = []
    for i in range(n):
        job_dir = tmp / f"floor{i}"
        job_dir.mkdir()
        (job_dir / "package.zip").write_bytes(data)
        (job_dir / ".nonce").write_text("x")
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "job_image.runner", "--job-dir", str(job_dir)],
            check=True,
            capture_output=True,
        )
        out.append(time.perf_counter() - t0)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cumulus-bench-") as tmp:
        stack = Stack(data_dir=Path(tmp) / "stack", devices="2x16GiB")
        await stack.start()
        try:
            async with AsyncClient(stack.url) as client:
                for _ in range(3):  # warm-up: imports, object store, consumers
                    await client.run(trivial, gpu=0.1, duration=600, logs=None)
                sem = asyncio.Semaphore(args.concurrency)
                latencies: list[float] = []

                async def one() -> None:
                    async with sem:
                        t0 = time.perf_counter()
                        assert await client.run(trivial, gpu=0.1, duration=600, logs=None) == 4
                        latencies.append(time.perf_counter() - t0)

                wall0 = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(args.jobs)))
                wall = time.perf_counter() - wall0
            hops = await hop_floor(stack.url)
        finally:
            stack.stop()
        floor = process_floor(Path(tmp))
    p50, p99 = pct(latencies, 0.5), pct(latencies, 0.99)
    f50 = statistics.median(floor)
    print(
        f"jobs: {args.jobs}, concurrency {args.concurrency}, "
        f"throughput {args.jobs / wall:.1f} jobs/s"
    )
    print(f"submit->result  p50 {p50 * 1000:.0f} ms  p99 {p99 * 1000:.0f} ms")
    print(
        f"floor: bare in-job runner subprocess p50 {f50 * 1000:.0f} ms; "
        f"JetStream hop p50 {statistics.median(hops) * 1000:.2f} ms"
    )
    print(f"ratio submit->result p50 / bare subprocess p50: {p50 / f50:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
