"""Warm maps on the embedded stack (process backend, 2 workers x 4 virtual devices).

1. Throughput: `client.map(trivial, range(N), gpu=0.1, warm=W)` end to end (submit, placement,
   job start, every input in and every answer back), as inputs/s, and the CPU it cost summed
   over every Cumulus process (services, nats-server, the job's processes, this client).
2. Per-input round trip: a warm map kept open, inputs sent one at a time, each waiting for its
   answer (publish to the queue -> runner -> warm process -> answer stored -> SDK), p50/p99.
3. For scale, in the same run: the same trivial function as one job per input (`--jobs`).

    .venv/bin/python bench/warm_map.py [--inputs 10000] [--warm 4] [--rtt 300] [--jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cloudpickle  # noqa: E402

from cumulus import (
    AsyncClient,  # noqa: E402
    _map,  # noqa: E402
)
from cumulus._options import JobOptions  # noqa: E402
from cumulus._packaging import package_function  # noqa: E402
from services.stack import Stack  # noqa: E402
from shared import events as ev  # noqa: E402
from shared import subjects  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def trivial(x: int) -> int:
    return x + 1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_of_tree(root: Path) -> float:
    """CPU seconds of every process now alive whose command line or cwd mentions `root`
    (services, nats-server, job processes), plus their waited-for children."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            cwd = os.readlink(proc / "cwd")
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(root).encode() not in cmd + env and not cwd.startswith(str(root)):
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICKS  # utime stime cutime cstime
    return total


async def throughput(client: AsyncClient, root: Path, inputs: int, warm: int) -> None:
    before, mine = cpu_of_tree(root), time.process_time()
    t0 = time.perf_counter()
    values = await client.map(trivial, range(inputs), gpu=0.1, duration=600, warm=warm)
    wall = time.perf_counter() - t0
    assert values == [x + 1 for x in range(inputs)]
    await asyncio.sleep(1.0)  # the job's end, its processes' exit
    cpu = cpu_of_tree(root) - before + time.process_time() - mine
    print(f"warm map of {inputs} trivial inputs, gpu=0.1, warm={warm}:")
    print(f"  {wall:.2f} s end to end: {inputs / wall:,.0f} inputs/s")
    print(
        f"  CPU, every Cumulus process and this client: {cpu:.2f} s = "
        f"{cpu / inputs * 1000:.3f} ms per input"
    )


async def round_trip(client: AsyncClient, count: int, warm: int) -> None:
    opts = JobOptions.build(gpu=0.1, duration=600)
    package = package_function(trivial, (), {}, (), "pickle")
    spec = ev.MapSpec(warm=warm, inputs=count)
    job = await client.submit_package(package, opts, map_spec=spec)
    got: asyncio.Queue[tuple[int, object] | BaseException] = asyncio.Queue()
    follow = asyncio.create_task(
        _map._Follower(client, job, count, None, got, asyncio.Event()).run()
    )
    js = client.nc.jetstream()
    subject = subjects.map_input(client.user, job.job_id)
    times: list[float] = []
    try:
        for i in range(count):
            data = _map._CHUNK.encode(ev.MapChunk(first=i, inputs=[cloudpickle.dumps(((i,), {}))]))
            t0 = time.perf_counter()
            await js.publish(subject, data, headers={"Nats-Msg-Id": f"{job.job_id}-in-{i}"})
            item = await asyncio.wait_for(got.get(), 60)
            if isinstance(item, BaseException):
                raise item
            times.append(time.perf_counter() - t0)
            assert item == (i, i + 1)
        end = {"Nats-Msg-Id": f"{job.job_id}-end", _map.END_HEADER: str(count)}
        await js.publish(subject, b"", headers=end)
        await job.result(timeout=60)
    finally:
        follow.cancel()
    warmup = times[min(10, len(times) // 10) :]
    print(f"per-input round trip, one at a time ({len(warmup)} after warm-up):")
    print(
        f"  p50 {pct(warmup, 0.5) * 1000:.2f} ms, p99 {pct(warmup, 0.99) * 1000:.2f} ms, "
        f"mean {statistics.mean(warmup) * 1000:.2f} ms"
    )


async def per_job(client: AsyncClient, jobs: int) -> None:
    t0 = time.perf_counter()
    values = await client.map(trivial, range(jobs), gpu=0.1, duration=600, concurrency=64)
    wall = time.perf_counter() - t0
    assert values == [x + 1 for x in range(jobs)]
    print(
        f"same function, one job per input ({jobs} jobs, 64 in flight): {jobs / wall:,.1f} inputs/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--rtt", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cumulus-warm-") as tmp:
        root = Path(tmp)
        stack = Stack(data_dir=root, workers=["worker-1", "worker-2"], devices="4x16GiB")
        await stack.start()
        try:
            async with AsyncClient(profile=stack.profile()) as client:
                await client.map(trivial, range(10), gpu=0.1, duration=600, warm=2)  # warm up
                await throughput(client, root, args.inputs, args.warm)
                if args.rtt:
                    await round_trip(client, args.rtt, 1)
                if args.jobs:
                    await per_job(client, args.jobs)
        finally:
            stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
