"""Submit → result latency of a trivial job on the embedded stack (process backend).

Prints p50/p99 over N sequential jobs after a warm-up and the client's CPU per job, and,
measured in the same run, the floors it is made of: one JetStream publish→consume hop, and
starting the in-job runner as a bare subprocess (the process backend's unavoidable cost).
Usage:

    .venv/bin/python bench/latency.py [--jobs 50] [--concurrency 1] [--open]
    .venv/bin/python bench/latency.py --compare-open [--rounds 2]

The stack is secure by default (every connection an nkey identity with its permissions, as
`cumulus up` runs it); `--open` measures an open bus instead (no authentication: a baseline,
never a deployment). `--compare-open` measures both in the same run, alternating open and
secure stacks `--rounds` times, and prints each and the secure/open ratios: the cost of
authentication and permission checks on trivial-job throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus import AsyncClient, package_function  # noqa: E402
from services.stack import Stack  # noqa: E402


def trivial() -> int:
    return 2 + 2


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Measured:
    """Trivial jobs on one kind of stack (secure or open), over one or more rounds."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    jobs: int = 0
    hops: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    """CPU seconds of this process (the client) over the measured jobs."""

    @property
    def throughput(self) -> float:
        return self.jobs / self.wall if self.wall else 0.0

    def add(self, other: Measured) -> None:
        self.latencies += other.latencies
        self.wall += other.wall
        self.jobs += other.jobs
        self.hops += other.hops
        self.client_cpu += other.client_cpu


async def hop_floor(stack: Stack, n: int = 200) -> list[float]:
    """One JetStream publish→consume round trip, as the operator (a stream of its own)."""
    nc = await stack.connect()
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


async def measure(data_dir: Path, *, secure: bool, jobs: int, concurrency: int) -> Measured:
    """`jobs` trivial jobs, `concurrency` at a time, on a fresh stack, as the user `default`."""
    stack = Stack(data_dir=data_dir, devices="2x16GiB", secure=secure)
    await stack.start()
    out = Measured(jobs=jobs)
    try:
        async with AsyncClient(profile=stack.profile()) as client:
            for _ in range(3):  # warm-up: imports, object store, consumers
                await client.run(trivial, gpu=0.1, duration=600, logs=None)
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    t0 = time.perf_counter()
                    assert await client.run(trivial, gpu=0.1, duration=600, logs=None) == 4
                    out.latencies.append(time.perf_counter() - t0)

            wall0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one() for _ in range(jobs)))
            out.wall = time.perf_counter() - wall0
            out.client_cpu = time.process_time() - cpu0
        out.hops = await hop_floor(stack)
    finally:
        stack.stop()
    return out


def report(name: str, m: Measured, concurrency: int) -> None:
    p50, p99 = pct(m.latencies, 0.5), pct(m.latencies, 0.99)
    print(
        f"{name}: jobs {m.jobs}, concurrency {concurrency}, "
        f"throughput {m.throughput:.1f} jobs/s, submit->result p50 {p50 * 1000:.0f} ms "
        f"p99 {p99 * 1000:.0f} ms, JetStream hop p50 {statistics.median(m.hops) * 1000:.2f} ms, "
        f"client CPU {m.client_cpu / m.jobs * 1000:.1f} ms/job"
    )


async def compare(tmp: Path, args: argparse.Namespace) -> None:
    """Open and secure stacks alternately, `rounds` times each (which goes first alternates:
    a busy machine's drift falls on both), then both and the secure/open ratios."""
    totals = {"open": Measured(), "secure": Measured()}
    for r in range(args.rounds):
        order = ("open", "secure") if r % 2 == 0 else ("secure", "open")  # neither always first
        for name in order:
            m = await measure(
                tmp / f"{name}{r}",
                secure=name == "secure",
                jobs=args.jobs,
                concurrency=args.concurrency,
            )
            totals[name].add(m)
    for name, m in totals.items():
        report(name, m, args.concurrency)
    o, s = totals["open"], totals["secure"]
    ratio = s.throughput / o.throughput
    print(
        f"secure/open: throughput {ratio:.3f} ({(1 - ratio) * 100:+.1f}% cost), "
        f"p50 {pct(s.latencies, 0.5) / pct(o.latencies, 0.5):.3f}x, "
        f"p99 {pct(s.latencies, 0.99) / pct(o.latencies, 0.99):.3f}x"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=1)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--open", action="store_true", help="an open bus (a baseline)")
    mode.add_argument(
        "--compare-open", action="store_true", help="measure open and secure stacks, and the ratio"
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --compare-open")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cumulus-bench-") as tmp:
        if args.compare_open:
            await compare(Path(tmp), args)
            return
        m = await measure(
            Path(tmp) / "stack", secure=not args.open, jobs=args.jobs, concurrency=args.concurrency
        )
        floor = process_floor(Path(tmp))
    report("open" if args.open else "secure", m, args.concurrency)
    p50, f50 = pct(m.latencies, 0.5), statistics.median(floor)
    print(f"floor: bare in-job runner subprocess p50 {f50 * 1000:.0f} ms")
    print(f"ratio submit->result p50 / bare subprocess p50: {p50 / f50:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
