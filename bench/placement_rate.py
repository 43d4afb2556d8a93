"""Placement rate of the real scheduler process over NATS (issue 13's scheduler targets).

What runs for real: one nats-server (JetStream, an open bus, no auth) and the scheduler as its
own process (`python -m services.scheduler`: SQLite log, outbox, lease, micro endpoints), as
bench/fleet_scale.py starts them. Nothing else: the workers are only their registrations
(`WorkerRegistered`, `--devices` virtual devices each, published into WORKERS as a worker's
partitioner does; no heartbeats, so the scheduler is started with a very large
`heartbeat_misses` and never declares them lost), and nobody answers a placement. The bench
publishes `JobSubmitted` into JOBS itself, pipelined, as the gateway does after admission.

Phases, in order:

1. register `--workers` workers; the scheduler idle: RSS and CPU;
2. burst: `--jobs` submissions of shares (0.1-0.9, drawn with `--seed`; they all fit), as fast
   as one client publishes them: the rate at which `scheduled` events reach the bus, each
   job's submit -> `scheduled` (end to end) and submit -> decision (the event's own `ts`), the
   scheduler's CPU per placement;
3. paced: `--paced` submissions one at a time, each waiting for its `scheduled`: the decision
   round trip through bus, scheduler and SQLite with no backlog;
4. queue: 10,000 + `--overflow` jobs of 8 whole GPUs, which mostly cannot be placed (the
   overflow roughly covers the workers still wholly free): the queueing rate, the
   scheduler's RSS with 10,000 queued, then phase 3 again with that queue (share jobs
   backfill around the queue's head).

The scheduler's own decision timer (`cumulus_assignment_duration_seconds`, decide() only) is
read from its /metrics. `--py-spy FILE` records the scheduler with py-spy during phases 2-4
(raw collapsed stacks in FILE) and prints its top functions. Usage:

    .venv/bin/python bench/placement_rate.py [--workers 1000] [--jobs 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tree this file is in

import msgspec  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from bench.fleet_scale import (  # noqa: E402
    CODE_REF,
    Fleet,
    Usage,
    cpu_seconds,
    free_port,
    pct,
    profile_top,
    rss,
)
from shared import bus, subjects  # noqa: E402
from shared import events as ev  # noqa: E402

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r":\d+\)$")
QUEUE_LIMIT = 20_000
"""scheduler.queue_limit here: room for the queue phase's 10,000 and more (the default is
10,000, and a full queue refuses every submission it cannot place at once)."""
QUEUED = 10_000
"""How many jobs the queue phase means to leave waiting."""


def log(text: str) -> None:
    print(f"[rate {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class _Ts(msgspec.Struct):
    ts: float


_ts = msgspec.json.Decoder(_Ts)


class Bench:
    """The bus, the scheduler, and what the bench saw of its decisions."""

    def __init__(self, opts: argparse.Namespace, root: Path) -> None:
        self.opts = opts
        self.fleet = Fleet(opts, root)
        self.metrics_port = free_port()
        self.submitted: dict[str, float] = {}
        self.seen: dict[str, tuple[float, str, bytes]] = {}
        """Job id -> (when its decision arrived here, its name, the event)."""
        self.waiting: dict[str, asyncio.Future[None]] = {}

    @property
    def pid(self) -> int:
        return self.fleet.procs["scheduler"].pid

    async def start(self) -> None:
        await self.fleet.start_bus()
        self.fleet.start_scheduler(
            {
                "CUMULUS_METRICS_PORT": str(self.metrics_port),
                "CUMULUS_SCHEDULER_QUEUE_LIMIT": str(QUEUE_LIMIT),
            }
        )
        await self.fleet.wait_scheduler()
        assert self.fleet.nc is not None

        async def on_decision(msg: Msg) -> None:
            # jobs.<user>.<job>.<worker>.<name>: the subject says enough; decode later. A
            # job's first decision counts (a queued job's later placement does not).
            _, _, job_id, _, name = msg.subject.split(".")
            if job_id not in self.seen:
                self.seen[job_id] = (time.time(), name, msg.data)
                waiter = self.waiting.pop(job_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

        for name in ("scheduled", "queued", "failed"):
            await self.fleet.nc.subscribe(
                f"jobs.*.*.*.{name}", cb=on_decision, pending_msgs_limit=1_000_000
            )
        await self.fleet.nc.flush()

    async def publish(self, events: Sequence[ev.Event]) -> None:
        """Publish pipelined, noting each submission's time, and wait for every ack."""
        assert self.fleet.nc is not None
        js = self.fleet.nc.jetstream()
        acks = []
        for event in events:
            if isinstance(event, ev.JobSubmitted):
                self.submitted[event.job_id] = time.time()
            acks.append(
                await js.publish_async(
                    bus.subject_of(event),
                    ev.encode(event),
                    headers=bus.headers(event.event_id, ""),
                    wait_stall=60,
                )
            )
        await asyncio.wait_for(asyncio.gather(*acks), 120)

    async def settled(self, ids: list[str], timeout: float, usage: Usage | None = None) -> None:
        """Until every one of `ids` has its decision (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while any(j not in self.seen for j in ids) and time.monotonic() < deadline:
            self.fleet.check_alive()
            if usage is not None:
                usage.sample()
            await asyncio.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """The scheduler's decide() timer, from its /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("cumulus_assignment_duration_seconds"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    async def stop(self) -> None:
        await self.fleet.stop()


def decide_timer(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """decide() calls that placed a job between two reads: how many, mean, share <= 5 ms."""
    prefix = "cumulus_assignment_duration_seconds"

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = delta(f"{prefix}_count")
    within = delta(f'{prefix}_bucket{{le="0.005"}}')
    return {
        "decisions": int(count),
        "mean_ms": round(1000 * delta(f"{prefix}_sum") / count, 3) if count else None,
        "within_5ms_pct": round(100 * within / count, 3) if count else None,
    }


def registrations(opts: argparse.Namespace) -> list[ev.Event]:
    return [
        ev.WorkerRegistered(
            worker_id=f"sim{i:05d}",
            hostname=f"sim{i:05d}",
            backend="process",
            labels={"sim": "placement_rate"},
            devices=[
                ev.DeviceInfo(index=d, name="virtual-80GiB", memory_bytes=80 << 30)
                for d in range(opts.devices)
            ],
        )
        for i in range(opts.workers)
    ]


def jobs(count: int, tenths: list[int], rng: random.Random, tag: str) -> list[ev.JobSubmitted]:
    return [
        ev.JobSubmitted(
            job_id=f"j{tag}{i:07d}{rng.getrandbits(32):08x}",
            user=f"user{i % 10}",
            spec=ev.JobSpec(code_ref=CODE_REF, gpu_tenths=rng.choice(tenths), duration_s=600),
        )
        for i in range(count)
    ]


async def phase_register(bench: Bench) -> dict[str, Any]:
    started = time.monotonic()
    await bench.publish(registrations(bench.opts))
    while not await bench.fleet.consumed(subjects.WORKERS_STREAM, "scheduler-workers"):
        bench.fleet.check_alive()
        await asyncio.sleep(0.1)
    registered_s = time.monotonic() - started
    await asyncio.sleep(2.0)  # settle (the registrations' commit, a snapshot, the GC)
    cpu0, t0 = cpu_seconds(bench.pid), time.monotonic()
    await asyncio.sleep(bench.opts.idle_s)
    return {
        "workers": bench.opts.workers,
        "gpus": bench.opts.workers * bench.opts.devices,
        "registered_s": round(registered_s, 2),
        "idle_cpu_pct": round(100 * (cpu_seconds(bench.pid) - cpu0) / (time.monotonic() - t0), 1),
        "idle_rss_mib": round(rss(bench.pid) / MiB, 1),
    }


def outcome(bench: Bench, ids: list[str], t0: float, cpu_s: float) -> dict[str, Any]:
    """What happened to `ids` (submitted from `t0`), and what it cost the scheduler."""
    names = Counter(bench.seen[j][1] for j in ids if j in bench.seen)
    placed = [j for j in ids if j in bench.seen and bench.seen[j][1] == "scheduled"]
    end_to_end = [bench.seen[j][0] - bench.submitted[j] for j in placed]
    decided = [_ts.decode(bench.seen[j][2]).ts - bench.submitted[j] for j in placed]
    arrivals = sorted(bench.seen[j][0] for j in ids if j in bench.seen)
    last = arrivals[-1] if arrivals else t0
    first = arrivals[0] if arrivals else t0
    return {
        "jobs": len(ids),
        **{name: names[name] for name in ("scheduled", "queued", "failed")},
        "undecided": len(ids) - sum(names.values()),
        "first_submit_to_last_decision_s": round(last - t0, 3),
        "decisions_per_s": round(len(arrivals) / max(1e-9, last - t0), 1),
        "decisions_per_s_first_to_last": round(len(arrivals) / max(1e-9, last - first), 1),
        "submit_to_scheduled_p50_ms": round(1000 * pct(end_to_end, 0.50), 2),
        "submit_to_scheduled_p99_ms": round(1000 * pct(end_to_end, 0.99), 2),
        "submit_to_decided_p50_ms": round(1000 * pct(decided, 0.50), 2),
        "submit_to_decided_p99_ms": round(1000 * pct(decided, 0.99), 2),
        "scheduler_cpu_ms_per_decision": round(1000 * cpu_s / max(1, len(arrivals)), 3),
    }


async def phase_burst(
    bench: Bench, batch: list[ev.JobSubmitted], settle_s: float = 300.0
) -> dict[str, Any]:
    ids = [j.job_id for j in batch]
    pids = {"scheduler": [bench.pid], "nats": [bench.fleet.procs["nats"].pid]}
    usage = Usage({**pids, "bench": [os.getpid()]})
    before = bench.metrics()
    cpu0 = cpu_seconds(bench.pid)
    usage.begin()
    t0 = time.time()
    await bench.publish(batch)
    submit_s = time.time() - t0
    await bench.settled(ids, settle_s, usage)
    figures = usage.end()
    out = outcome(bench, ids, t0, cpu_seconds(bench.pid) - cpu0)
    return {
        **out,
        "submit_s": round(submit_s, 3),
        "submits_per_s": round(len(ids) / max(1e-9, submit_s), 1),
        **figures,
        "decide_timer": decide_timer(before, bench.metrics()),
    }


async def phase_paced(bench: Bench, batch: list[ev.JobSubmitted]) -> dict[str, Any]:
    """One submission at a time, each waiting for its decision."""
    before = bench.metrics()
    cpu0 = cpu_seconds(bench.pid)
    t0 = time.time()
    loop = asyncio.get_running_loop()
    for job in batch:
        waiter = loop.create_future()
        bench.waiting[job.job_id] = waiter
        await bench.publish([job])
        await asyncio.wait_for(waiter, 30)
    out = outcome(bench, [j.job_id for j in batch], t0, cpu_seconds(bench.pid) - cpu0)
    keep = ("jobs", "scheduled", "queued", "failed", "undecided")
    figures = {k: v for k, v in out.items() if k in keep or "_p" in k}
    return {**figures, "decide_timer": decide_timer(before, bench.metrics())}


async def queue_length(bench: Bench) -> int:
    assert bench.fleet.nc is not None
    reply = await bench.fleet.nc.request(
        "cumulus.scheduler.workers", msgspec.json.encode({"limit": 1}), timeout=10
    )
    return int(json.loads(reply.data)["queued"])


def spy_start(pid: int, path: str) -> subprocess.Popen[bytes]:
    binary = Path(sys.executable).parent / "py-spy"
    # --gil: only samples holding the GIL, so waiting (the loop's select, the SQLite
    # thread's queue) does not count; C time outside the GIL (SQLite, socket writes) is
    # left out too: /proc CPU time says how much that is.
    argv = [str(binary), "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--gil"]
    argv += ["--output", path]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def spy_stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spy_top(path: str, count: int = 30) -> list[str]:
    """The scheduler's functions by samples, inclusive and own, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        # "function (path:line)": one row per function, its path relative to the tree.
        frames = [LINE.sub(")", f).replace(str(ROOT) + "/", "") for f in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return []
    lines = [f"{total} samples"]
    lines += [f"own {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(count)]
    lines += [f"incl {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(count)]
    return lines


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    root = Path(opts.out) if opts.out else Path(tempfile.mkdtemp(prefix="cumulus-rate-"))
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(opts, root)
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    rng = random.Random(opts.seed)
    report: dict[str, Any] = {"cores": os.cpu_count(), "out": str(root)}
    spy: subprocess.Popen[bytes] | None = None
    try:
        await bench.start()
        report["register"] = await phase_register(bench)
        log(f"register: {report['register']}")
        if opts.py_spy:
            spy = spy_start(bench.pid, opts.py_spy)
            await asyncio.sleep(1.0)
        report["burst"] = await phase_burst(bench, jobs(opts.jobs, list(range(1, 10)), rng, "b"))
        log(f"burst: {report['burst']}")
        report["paced"] = await phase_paced(bench, jobs(opts.paced, list(range(1, 10)), rng, "p"))
        log(f"paced: {report['paced']}")
        if opts.overflow >= 0:
            batch = jobs(QUEUED + opts.overflow, [80], rng, "q")
            report["queue"] = await phase_burst(bench, batch)
            await asyncio.sleep(2.0)
            report["queue"]["queue_length"] = await queue_length(bench)
            report["queue"]["rss_mib_queue_full"] = round(rss(bench.pid) / MiB, 1)
            log(f"queue: {report['queue']}")
            batch = jobs(opts.paced, list(range(1, 10)), rng, "f")
            report["paced_queue_full"] = await phase_paced(bench, batch)
            log(f"paced, queue full: {report['paced_queue_full']}")
        report["scheduler_rss_mib_end"] = round(rss(bench.pid) / MiB, 1)
        report["nats_rss_mib_end"] = round(rss(bench.fleet.procs["nats"].pid) / MiB, 1)
    finally:
        if spy is not None:
            spy_stop(spy)
        await bench.stop()
    if not opts.keep and not opts.out:
        shutil.rmtree(root, ignore_errors=True)
    return report


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--devices", type=int, default=8, help="virtual devices per worker")
    p.add_argument("--jobs", type=int, default=10_000, help="share jobs in the burst")
    p.add_argument("--paced", type=int, default=300, help="jobs submitted one at a time")
    p.add_argument(
        "--overflow",
        type=int,
        default=500,
        help="8-GPU jobs beyond 10,000 in the queue phase (-1: no queue phase)",
    )
    p.add_argument("--idle-s", type=float, default=5.0, help="the idle window after register")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--py-spy", default="", help="record the scheduler with py-spy into FILE")
    p.add_argument("--profile", default="", help="run the scheduler under cProfile into FILE")
    p.add_argument("--out", default="", help="keep logs and data here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    opts = p.parse_args(argv)
    # What bench/fleet_scale.py's Fleet reads: no heartbeats here, so a worker is never lost.
    opts.misses = 1_000_000
    opts.consumer_limit = -1
    return opts


def print_report(report: dict[str, Any]) -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:34} {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            for line in value:
                print(f"  {line}")
        else:
            print(f"{key:36} {value}")


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    try:
        import uvloop

        report = uvloop.run(run(opts))
    except ImportError:
        report = asyncio.run(run(opts))
    if opts.py_spy and Path(opts.py_spy).exists():
        report["py_spy_top"] = spy_top(opts.py_spy)
    if opts.profile and Path(opts.profile).exists():
        report["profile_top"] = profile_top(opts.profile, 40)
    if opts.json:
        print(json.dumps(report))
    else:
        print_report(report)
    burst = report.get("burst", {})
    return 0 if burst.get("scheduled") == opts.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
