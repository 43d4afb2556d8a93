"""Scheduler benchmarks that need no bus: decision latency at scale, and packing quality.

1. Decision latency: 1,000 workers x 8 devices, the pool full and 10,000 jobs queued; time
   each decision (a submission, a completion that frees capacity and drains the queue) through
   the real apply/decide chain. Target p99 < 5 ms.
2. Packing: the standard mix (300 jobs of 0.2 s, amounts drawn with seed 42 from 0.1 … 0.9,
   1 and 2, on 8 devices) in an event-driven simulation with zero overhead, for each placement
   policy and backfill mode: utilisation = sum(amount x 0.2 s) / (8 x makespan). This isolates
   the algorithm; bench/utilisation.py measures the running services.

    .venv/bin/python bench/placement.py
"""

from __future__ import annotations

import heapq
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import events as ev  # noqa: E402
from tests.scheduler.harness import Driver  # noqa: E402

MIX = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(workers: int = 1000, devices: int = 8, queued: int = 10_000) -> None:
    rng = random.Random(42)
    d = Driver()
    for w in range(workers):
        d.add_worker(f"w{w:04d}", devices)
    # Fill the pool with whole-GPU jobs, then queue a mixed backlog.
    running = [d.submit(10)[0] for _ in range(workers * devices)]
    for _ in range(queued):
        d.submit(rng.choice(MIX), priority=rng.choice([0, 0, 0, 1]))
    assert len(d.state.queue) == queued, len(d.state.queue)
    submit_ms, complete_ms = [], []
    for i in range(500):
        t0 = time.perf_counter()
        d.submit(rng.choice(MIX))
        submit_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        d.complete(running[i])
        complete_ms.append((time.perf_counter() - t0) * 1000)
    print(f"decision latency, {workers} workers x {devices} devices, {queued} queued:")
    for name, values in (
        ("submit (queue or backfill)", submit_ms),
        ("completion (free + place from queue)", complete_ms),
    ):
        print(
            f"  {name:40} p50 {pct(values, 0.5):.3f} ms  p99 {pct(values, 0.99):.3f} ms  "
            f"max {max(values):.3f} ms"
        )


def simulate(placement: str, backfill: str, jobs: int = 300, seconds: float = 0.2) -> float:
    """Utilisation of the standard mix with zero overhead: pure packing quality."""
    rng = random.Random(42)
    amounts = [rng.choice(MIX) for _ in range(jobs)]
    d = Driver(placement=placement, backfill=backfill)
    d.add_worker("w1", 4)
    d.add_worker("w2", 4)
    now = 0.0
    ends: list[tuple[float, str]] = []
    started: set[str] = set()

    def start_new(events: list[ev.Event]) -> None:
        for e in events:
            if isinstance(e, ev.WorkerSelected) and e.job_id not in started:
                started.add(e.job_id)
                heapq.heappush(ends, (now + seconds, e.job_id))

    t0 = 1_000_000.0  # simulated clock, carried in the events' timestamps
    for tenths in amounts:
        _, out = d.submit(tenths, ts=t0)
        start_new(out)
    while ends:
        now, job_id = heapq.heappop(ends)
        start_new(d.complete(job_id, ts=t0 + now))
    assert len(started) == jobs
    return sum(a / 10 * seconds for a in amounts) / (8 * now)


def main() -> None:
    latency()
    print("packing (zero-overhead simulation of the standard mix), utilisation:")
    for backfill in ("reserve", "none", "greedy"):
        row = "  ".join(f"{p}-fit {simulate(p, backfill):.3f}" for p in ("best", "first", "worst"))
        print(f"  backfill={backfill:8} {row}")


if __name__ == "__main__":
    main()
