"""Allocation utilisation through the running services on the standard mix.

300 jobs, each computing 0.2 s (sleeping: the devices are virtual), amounts drawn with seed 42
from 0.1 … 0.9, 1 and 2, on 8 virtual devices (2 workers x 4): utilisation =
sum(amount x 0.2 s) / (8 x makespan), makespan from the first submission to the last result.
The same mix in a zero-overhead simulation of the scheduler (bench/placement.py) is printed
beside it, so the gap is the cost of running jobs for real (partitions, processes, events).

    .venv/bin/python bench/utilisation.py [--jobs 300] [--backend process]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.placement import MIX, simulate  # noqa: E402
from cumulus import AsyncClient  # noqa: E402
from services.stack import Stack  # noqa: E402


def compute(seconds: float) -> float:
    import time as _time

    _time.sleep(seconds)
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--backend", default="process")
    args = parser.parse_args()
    rng = random.Random(42)
    amounts = [rng.choice(MIX) / 10 for _ in range(args.jobs)]
    with tempfile.TemporaryDirectory(prefix="cumulus-util-") as tmp:
        stack = Stack(
            data_dir=Path(tmp),
            workers=["worker-1", "worker-2"],
            devices="4x16GiB",
            backend=args.backend,
        )
        await stack.start()
        try:
            async with AsyncClient(profile=stack.profile()) as client:
                await client.run(compute, 0.0, gpu=0.1, duration=600, logs=None)  # warm up
                t0 = time.perf_counter()
                jobs = await asyncio.gather(
                    *(
                        client.submit(
                            compute, args.seconds, gpu=a if a < 1 else int(a), duration=600
                        )
                        for a in amounts
                    )
                )
                submitted = time.perf_counter() - t0
                await asyncio.gather(*(j.result(timeout=600) for j in jobs))
                makespan = time.perf_counter() - t0
            cpu = {name: _cpu_seconds(proc.pid) for name, proc in stack.procs.items()}
        finally:
            stack.stop()
    work = sum(a * args.seconds for a in amounts)
    print(f"{args.jobs} jobs x {args.seconds} s on 8 virtual devices ({args.backend} backend)")
    print(
        f"  all submitted after {submitted:.2f} s; makespan {makespan:.2f} s; "
        f"ideal {work / 8:.2f} s"
    )
    print(f"  utilisation through the services: {work / (8 * makespan):.3f}")
    print(f"  zero-overhead simulation, same mix: {simulate('best', 'reserve'):.3f}")
    print("  CPU seconds by process: " + ", ".join(f"{n} {c:.1f}" for n, c in cpu.items()))
    print(f"  CPU seconds of this client: {time.process_time():.1f}")


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    asyncio.run(main())
