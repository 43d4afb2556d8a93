"""What tracing and metrics cost: trivial-job throughput with both off, and with both on.

Starts two embedded stacks side by side (process backend, one worker with 4 virtual devices):

- **off**: no OTEL_* variables, `metrics_port` 0 (the defaults);
- **on**: spans exported over OTLP/gRPC to a real receiver (tests/observability/otlp_receiver.py,
  which decodes every export) and every process's /metrics served and scraped once a second.

Then runs bursts of `--jobs` trivial jobs (a function that returns at once, gpu=0.1, at most
`--window` in flight, each result awaited through the SDK), alternating off and on for
`--rounds` rounds so that drift of a shared machine falls on both alike. Prints jobs/s both
ways, the ratio and the cost in percent (the target: on costs at most 10%), the spans the
receiver got per job and the scrapes made.

    .venv/bin/python bench/observability_cost.py [--jobs 200] [--rounds 2] [--window 50]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus import AsyncClient  # noqa: E402
from services.stack import Stack, free_port  # noqa: E402
from tests.observability.otlp_receiver import OtlpReceiver  # noqa: E402


def trivial() -> int:
    return 1


async def burst(client: AsyncClient, jobs: int, window: int, gpu: float) -> float:
    """Seconds from the first submit to the last result of `jobs` trivial jobs."""
    gate = asyncio.Semaphore(window)

    async def one() -> None:
        async with gate:
            job = await client.submit(trivial, gpu=gpu, duration=600)
            if await job.result(timeout=600) != 1:
                raise AssertionError("a trivial job returned something else")

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(jobs)))
    return time.perf_counter() - started


class Scraper(threading.Thread):
    """GETs every /metrics endpoint of a stack once a second, as Prometheus would."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True, name="scraper")
        self.ports = ports
        self.scrapes = 0
        self.failures = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1


async def run(args: argparse.Namespace) -> None:
    receiver = OtlpReceiver().start()
    common = {"CUMULUS_WORKER_SANDBOX": args.sandbox}
    off_env = {**common, "CUMULUS_METRICS_PORT": "0"}
    on_env = {**common, **receiver.env("grpc"), "CUMULUS_METRICS_PORT": str(free_port())}
    with tempfile.TemporaryDirectory(prefix="cumulus-obs-cost-") as tmp:
        stacks = {
            mode: Stack(
                data_dir=Path(tmp) / mode,
                workers=["worker-1"],
                devices="4x16GiB",
                backend="process",
                env=env,
            )
            for mode, env in (("off", off_env), ("on", on_env))
        }
        scraper: Scraper | None = None
        seconds = {"off": 0.0, "on": 0.0}
        try:
            for stack in stacks.values():
                await stack.start()
            scraper = Scraper(list(stacks["on"].metrics_ports.values()))
            scraper.start()
            clients = {m: AsyncClient(profile=s.profile()) for m, s in stacks.items()}
            for client in clients.values():
                await client.connect()
                await burst(client, min(20, args.jobs), args.window, args.gpu)  # warm up
            await asyncio.sleep(1.0)  # the warm-up's spans exported, not counted
            spans_before = len(receiver.spans)
            for r in range(args.rounds):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    took = await burst(clients[mode], args.jobs, args.window, args.gpu)
                    seconds[mode] += took
                    print(f"  round {r + 1} {mode:3s}: {args.jobs / took:7.1f} jobs/s", flush=True)
            await asyncio.sleep(1.0)  # the last spans exported
            spans = len(receiver.spans) - spans_before
            names = collections.Counter(s.name for s in receiver.spans[spans_before:])
            for client in clients.values():
                await client.close()
        finally:
            if scraper is not None:
                scraper.halt.set()
            for stack in stacks.values():
                stack.stop()
            receiver.stop()
    total = args.jobs * args.rounds
    off, on = total / seconds["off"], total / seconds["on"]
    print(f"trivial jobs (gpu={args.gpu}, window {args.window}), {total} per mode:")
    print(f"  off (no tracing, no metrics):          {off:7.1f} jobs/s")
    print(f"  on  (OTLP/gRPC spans, /metrics at 1 s): {on:7.1f} jobs/s")
    print(f"  on / off: {on / off:.3f}  (cost {100 * (1 - on / off):.1f}%, target <= 10%)")
    print(f"  spans received: {spans} ({spans / total:.1f} per job)")
    for name, count in sorted(names.items()):
        print(f"    {name:30s} {count / total:5.2f} per job")
    if scraper is not None:
        print(f"  scrapes: {scraper.scrapes} ({scraper.failures} failed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per burst")
    parser.add_argument("--rounds", type=int, default=2, help="bursts per mode, alternating")
    parser.add_argument("--window", type=int, default=50, help="jobs in flight at most")
    parser.add_argument("--gpu", type=float, default=0.1)
    parser.add_argument("--sandbox", default="bwrap", help="worker.sandbox: bwrap or none")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
