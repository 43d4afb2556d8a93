"""A simulated fleet: many lightweight worker agents against the real scheduler and nats-server.

What runs for real: one nats-server (JetStream, an open bus on a free port, its monitoring port
for /varz and /jsz), and the scheduler service as its own process (`python -m
services.scheduler`, SQLite event log, outbox, micro endpoints), exactly as deployed. What is
simulated: the workers. `--agents` OS processes each run a share of `--workers` simulated
agents, every one a real NATS connection that does what a worker's partitioner and runner do on
the bus, with virtual devices and no jobs actually run:

- asks the scheduler for its two durable consumers (`partitioner-<W>`: scheduled, revoked and
  terminal events; `runner-<W>`: partition_ready, cancel, revoked), as `bus.request_durable`
  does, and pulls them with the services' own `bus.Puller`;
- registers (`WorkerRegistered`, `--devices` virtual devices) and heartbeats every
  `--heartbeat-s` (`bus.publish`, waiting for JetStream's ack), from a random phase;
- answers each placement: partition_ready (partitioner), started, then completed after
  `--hold-s` (runner), then partition_released (partitioner, on the terminal event), so the
  scheduler frees the capacity and places from its queue.

No gateway: the bench publishes `JobSubmitted` events into JOBS itself, as the gateway does
after admission (the scheduler re-checks admission on every submission anyway). The measured
phases, in order: connect + register of every worker, an idle window with heartbeats only, a
burst of `--jobs` jobs of mixed amounts (shares 0.1-0.9 and whole 1-8 GPUs, drawn with
`--seed`), and one worker made silent (its agent stops heartbeating but keeps its connection:
a hung agent) until the scheduler declares it lost. `--profile FILE` runs the scheduler under
cProfile and prints its top functions. Usage:

    .venv/bin/python bench/fleet_scale.py [--workers 1000] [--devices 8] [--jobs 5000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pstats
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tree this file is in

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402

from shared import auth, bus, subjects  # noqa: E402
from shared import events as ev  # noqa: E402
from shared.errors import CumulusError  # noqa: E402

MiB = 1024 * 1024
CTL = "bench.fleet.ctl"
"""Core NATS subject prefix the orchestrator drives the agent processes on (`.<agent>`)."""
AMOUNTS = [*range(1, 10), *range(10, 90, 10)]
"""Job sizes in tenths: shares 0.1-0.9 and whole 1-8 GPUs."""
RESULT = msgspec.Raw(b'{"encoding":"json","data":null}')
CODE_REF = "0" * 64
ROOT = Path(__file__).resolve().parents[1]


def log(text: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the simulated agents (run in `--agent` processes) ---------------------------------------


@dataclass
class Counters:
    beats: int = 0
    beat_failures: int = 0
    placements: int = 0
    completed: int = 0
    revoked: int = 0
    errors: int = 0
    last_error: str = ""


@dataclass
class SimWorker:
    """One simulated worker agent: its own NATS connection, consumers, heartbeat and answers."""

    worker_id: str
    devices: int
    heartbeat_s: float
    hold_s: float
    counters: Counters
    nc: Client | None = None
    js: JetStreamContext | None = None
    last_beat: float = 0.0
    connect_s: float = 0.0
    silenced: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    partitions: dict[str, list[str]] = field(default_factory=dict)
    """Job id -> partition ids of its current attempt here (released on its terminal event)."""
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def consumers(self) -> list[tuple[str, list[str]]]:
        """The durables a real worker has (services/partitioner/app.py, services/runner/app.py)."""
        w = self.worker_id
        return [
            (
                f"partitioner-{w}",
                [
                    *subjects.job_events("scheduled", "revoked", worker_id=w),
                    *subjects.terminal_events(w),
                ],
            ),
            (
                f"runner-{w}",
                subjects.job_events("partition_ready", "cancel", "revoked", worker_id=w),
            ),
        ]

    async def start(self, url: str, slots: asyncio.Semaphore) -> None:
        """Connect, have the scheduler create the consumers, register; then run."""
        async with slots:
            started = time.monotonic()
            self.nc = await bus.connect(url, f"sim-{self.worker_id}", timeout=30.0)
            self.js = self.nc.jetstream()
            pullers = []
            for durable, filters in self.consumers():
                request = bus.ConsumerRequest(
                    stream=subjects.JOBS_STREAM, durable=durable, filters=filters
                )
                await bus.request_durable(self.nc, self.worker_id, request, timeout=120.0)
                puller = bus.Puller(self.nc, subjects.JOBS_STREAM, durable)
                await puller.start()
                pullers.append(puller)
            await bus.publish(self.js, self.registration())
            self.last_beat = time.time()
            self.connect_s = time.monotonic() - started
        self.tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._consume(pullers[0], self._partitioner)),
            asyncio.create_task(self._consume(pullers[1], self._runner)),
        ]

    def registration(self) -> ev.WorkerRegistered:
        return ev.WorkerRegistered(
            worker_id=self.worker_id,
            hostname=f"sim-{self.worker_id}",
            backend="process",
            labels={"sim": "fleet_scale"},
            devices=[
                ev.DeviceInfo(index=i, name="virtual-80GiB", memory_bytes=80 << 30)
                for i in range(self.devices)
            ],
        )

    async def _heartbeats(self) -> None:
        """Beat every heartbeat_s from a random phase (agents start at different times)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.silenced.wait(), random.uniform(0, self.heartbeat_s))
        while not self.silenced.is_set():
            beat = ev.WorkerHeartbeat(worker_id=self.worker_id, interval_s=self.heartbeat_s)
            self.last_beat = beat.ts
            try:
                assert self.js is not None
                await bus.publish(self.js, beat)
                self.counters.beats += 1
            except CumulusError:
                self.counters.beat_failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.silenced.wait(), self.heartbeat_s)

    async def _consume(self, puller: bus.Puller, handle: Any) -> None:
        while True:
            msgs: list[Msg] = await puller.next_batch()
            for msg in msgs:
                try:
                    await handle(ev.decode(msg.data))
                except CumulusError as exc:
                    self.counters.errors += 1
                    self.counters.last_error = exc.message[:200]
            await bus.ack_all(msgs[-1])

    async def _publish(self, event: ev.Event) -> None:
        assert self.js is not None
        await bus.publish(self.js, event)

    async def _partitioner(self, event: ev.AnyEvent) -> None:
        """What a partitioner reports: the partition made, and released at the job's end."""
        if isinstance(event, ev.WorkerSelected):
            self.counters.placements += 1
            ids = [f"{event.job_id}.{event.attempt}-{d}" for d in event.devices]
            self.partitions[event.job_id] = ids
            await self._publish(
                ev.PartitionReady(
                    job_id=event.job_id,
                    user=event.user,
                    worker_id=self.worker_id,
                    spec=event.spec,
                    attempt=event.attempt,
                    partition_ids=ids,
                    devices=list(event.devices),
                    env={},
                    expires_at=time.time() + event.spec.duration_s,
                    trace=event.trace,
                )
            )
        elif isinstance(event, ev.PlacementRevoked | ev.Terminal):
            ids = self.partitions.pop(event.job_id, [])
            if ids:
                attempt = event.attempt
                await self._publish(
                    ev.PartitionReleased(
                        job_id=event.job_id,
                        user=event.user,
                        worker_id=self.worker_id,
                        attempt=attempt,
                        partition_ids=ids,
                    )
                )

    async def _runner(self, event: ev.AnyEvent) -> None:
        """What a runner reports: started at once, completed after hold_s."""
        if isinstance(event, ev.PartitionReady):
            await self._publish(
                ev.JobStarted(
                    job_id=event.job_id,
                    user=event.user,
                    worker_id=self.worker_id,
                    backend="process",
                    handle="sim",
                    attempt=event.attempt,
                )
            )
            self.running[event.job_id] = asyncio.create_task(self._complete(event))
        elif isinstance(event, ev.PlacementRevoked | ev.CancelOrdered):
            self.counters.revoked += 1
            task = self.running.pop(event.job_id, None)
            if task is not None:
                task.cancel()

    async def _complete(self, ready: ev.PartitionReady) -> None:
        await asyncio.sleep(self.hold_s)
        self.running.pop(ready.job_id, None)
        try:
            await self._publish(
                ev.JobCompleted(
                    job_id=ready.job_id,
                    user=ready.user,
                    worker_id=self.worker_id,
                    attempt=ready.attempt,
                    result=RESULT,
                    runtime_s=self.hold_s,
                )
            )
            self.counters.completed += 1
        except CumulusError as exc:
            self.counters.errors += 1
            self.counters.last_error = exc.message[:200]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in list(self.running.values()):
            task.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)


async def run_agent(opts: argparse.Namespace) -> None:
    """One agent process: `--count` simulated workers from `--first`, driven over CTL."""
    counters = Counters()
    workers = {
        wid: SimWorker(wid, opts.devices, opts.heartbeat_s, opts.hold_s, counters)
        for wid in (f"sim{i:05d}" for i in range(opts.first, opts.first + opts.count))
    }
    slots = asyncio.Semaphore(opts.concurrency)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(w.start(opts.url, slots) for w in workers.values()), return_exceptions=True
    )
    took = time.monotonic() - started
    errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    each = sorted(w.connect_s for w in workers.values() if w.tasks) or [float("nan")]
    ctl = await nats.connect(opts.url, name=f"sim-ctl-{opts.index}")
    done = asyncio.Event()

    async def command(msg: Msg) -> None:
        body = json.loads(msg.data)
        reply: dict[str, Any] = {"cpu_s": cpu_seconds(os.getpid()), **asdict(counters)}
        if body["op"] == "silence":
            worker = workers[body["worker"]]
            worker.silenced.set()
            reply["last_beat"] = worker.last_beat
        elif body["op"] == "stop":
            done.set()
        await msg.respond(json.dumps(reply).encode())

    await ctl.subscribe(f"{CTL}.{opts.index}", cb=command)
    await ctl.flush()
    ready = {
        "ready": len(workers) - len(errors),
        "failed": len(errors),
        "error": errors[0] if errors else "",
        "took_s": took,
        "p50_s": each[len(each) // 2],
    }
    print(json.dumps(ready), flush=True)
    await done.wait()
    await asyncio.gather(*(w.close() for w in workers.values()))
    await ctl.close()


# -- measuring ---------------------------------------------------------------------------------


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def monitor(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as reply:
        data: dict[str, Any] = json.loads(reply.read())
        return data


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Usage:
    """CPU share and memory of a set of processes over a window."""

    pids: dict[str, list[int]]
    t0: float = 0.0
    cpu0: dict[str, float] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in self.pids.items()}
        self.peak = {}
        self.sample()

    def sample(self) -> None:
        for name, pids in self.pids.items():
            self.peak[name] = max(self.peak.get(name, 0), sum(rss(p) for p in pids))

    def end(self) -> dict[str, float]:
        self.sample()
        span = time.monotonic() - self.t0
        out: dict[str, float] = {}
        for name, pids in self.pids.items():
            used = sum(cpu_seconds(p) for p in pids) - self.cpu0[name]
            out[f"{name}_cpu_pct"] = round(100 * used / span, 1)
            out[f"{name}_rss_mib"] = round(self.peak[name] / MiB, 1)
        return out


# -- the orchestrator ------------------------------------------------------------------------


@dataclass
class Fleet:
    opts: argparse.Namespace
    root: Path
    port: int = 0
    monitor_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agents: list[asyncio.subprocess.Process] = field(default_factory=list)
    nc: Client | None = None
    submitted: dict[str, float] = field(default_factory=dict)
    selected: dict[str, float] = field(default_factory=dict)
    queued: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)
    lost: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Worker -> (when its `lost` arrived here, the event's own ts)."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _popen(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    async def start_bus(self) -> None:
        self.port, self.monitor_port = free_port(), free_port()
        conf = self.root / "nats.conf"
        config = json.loads(
            auth.server_config(
                host="127.0.0.1",
                port=self.port,
                store_dir=self.root / "nats",
                authorization=None,
                monitor_port=self.monitor_port,
            )
        )
        if self.opts.consumer_limit:
            # nats-server 2.15 allows 1,000 consumers per stream unless told otherwise, and a
            # worker needs two on JOBS: without this the fleet stops at 499 workers.
            limits = {"default_max_consumers": self.opts.consumer_limit}
            config["jetstream"]["limits"] = limits
        conf.write_text(json.dumps(config, indent=2))
        binary = Path(sys.executable).parent / "nats-server"
        self._popen(
            "nats",
            [str(binary if binary.exists() else "nats-server"), "-c", str(conf)],
            dict(os.environ),
        )
        self.nc = await self._connect_when_up()

    async def _connect_when_up(self) -> Client:
        deadline = time.monotonic() + 30
        while True:
            try:
                return await nats.connect(self.url, name="fleet-bench", connect_timeout=2)
            except Exception as exc:
                if time.monotonic() > deadline or self.procs["nats"].poll() is not None:
                    raise RuntimeError(
                        f"nats-server did not start; see {self.root}/nats.log"
                    ) from exc
                await asyncio.sleep(0.1)

    def start_scheduler(self, extra: dict[str, str] | None = None) -> None:
        """The scheduler as deployed (`python -m services.scheduler`); `extra` adds settings."""
        env = dict(os.environ)
        env.update(
            {
                "CUMULUS_NATS_URL": self.url,
                "CUMULUS_DATA_DIR": str(self.root / "data"),
                "CUMULUS_SCHEDULER_HEARTBEAT_MISSES": str(self.opts.misses),
                "CUMULUS_LOGGING_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        env.pop("CUMULUS_NATS_CREDENTIALS", None)
        argv = [sys.executable]
        if self.opts.profile:
            argv += ["-m", "cProfile", "-o", str(Path(self.opts.profile).absolute())]
        argv += ["-m", "services.scheduler"]
        self._popen("scheduler", argv, env)

    async def wait_scheduler(self) -> None:
        """Until the scheduler's consumers exist (it made the streams and started)."""
        assert self.nc is not None
        js = self.nc.jetstream()
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                await js.consumer_info(subjects.WORKERS_STREAM, "scheduler-workers")
                await js.consumer_info(subjects.JOBS_STREAM, "scheduler-jobs")
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start; see {self.root}/scheduler.log")
            await asyncio.sleep(0.2)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.root}")

    async def observe(self) -> None:
        """Core subscriptions: the scheduler's decisions and the completions, as they happen."""
        assert self.nc is not None

        async def decision(msg: Msg) -> None:
            now = time.time()
            _, _, job_id, worker, name = msg.subject.split(".")
            if name == "scheduled":
                self.selected.setdefault(job_id, now)
            elif name == "queued":
                self.queued.add(job_id)
            elif name == "completed":
                self.completed.add(job_id)
            elif name == "failed" and worker == subjects.NO_WORKER:
                self.failed[job_id] = msgspec.json.decode(msg.data)["message"]

        async def lost(msg: Msg) -> None:
            self.lost[msg.subject.split(".")[1]] = (
                time.time(),
                msgspec.json.decode(msg.data)["ts"],
            )

        for name in ("scheduled", "queued", "completed", "failed"):
            await self.nc.subscribe(f"jobs.*.*.*.{name}", cb=decision)
        await self.nc.subscribe("workers.*.lost", cb=lost)
        await self.nc.flush()

    async def start_agents(self) -> list[dict[str, Any]]:
        """Start the agent processes; their ready lines once every worker registered."""
        n, k = self.opts.workers, self.opts.agents
        share = [n // k + (1 if i < n % k else 0) for i in range(k)]
        first = 0
        for index, count in enumerate(share):
            argv = [
                sys.executable,
                str(ROOT / "bench/fleet_scale.py"),
                "--agent",
                "--url",
                self.url,
            ]
            argv += ["--index", str(index), "--first", str(first), "--count", str(count)]
            argv += ["--devices", str(self.opts.devices), "--hold-s", str(self.opts.hold_s)]
            argv += ["--heartbeat-s", str(self.opts.heartbeat_s)]
            argv += ["--concurrency", str(self.opts.concurrency)]
            first += count
            errlog = open(self.root / f"agent-{index}.log", "ab")  # noqa: SIM115, ASYNC230
            self.agents.append(
                await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errlog,
                    start_new_session=True,
                )
            )
            errlog.close()
        return list(await asyncio.gather(*(self._ready(a) for a in self.agents)))

    async def _ready(self, agent: asyncio.subprocess.Process) -> dict[str, Any]:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), self.opts.timeout)
        if not line:
            raise RuntimeError(f"an agent process exited before it was ready; see {self.root}")
        ready: dict[str, Any] = json.loads(line)
        return ready

    async def ctl(self, index: int, op: str, **body: Any) -> dict[str, Any]:
        assert self.nc is not None
        msg = await self.nc.request(f"{CTL}.{index}", json.dumps({"op": op, **body}).encode(), 10)
        reply: dict[str, Any] = json.loads(msg.data)
        return reply

    async def stats(self) -> dict[str, Any]:
        """The agents' counters, summed."""
        out: dict[str, Any] = {}
        for index in range(len(self.agents)):
            for key, value in (await self.ctl(index, "stats")).items():
                if isinstance(value, str):
                    out[key] = value or out.get(key, "")
                else:
                    out[key] = out.get(key, 0) + value
        return out

    async def consumed(self, stream: str, durable: str) -> bool:
        """The scheduler has applied (committed and acked) everything its consumer got."""
        assert self.nc is not None
        info = await self.nc.jetstream().consumer_info(stream, durable)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    def pids(self) -> dict[str, list[int]]:
        return {
            "scheduler": [self.procs["scheduler"].pid],
            "nats": [self.procs["nats"].pid],
            "agents": [a.pid for a in self.agents],
        }

    async def stop(self) -> None:
        for index, agent in enumerate(self.agents):
            if agent.returncode is None:
                with contextlib.suppress(Exception):
                    await self.ctl(index, "stop")
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.wait(), 15)
            if agent.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    agent.kill()
                await agent.wait()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        for name in ("scheduler", "nats"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


# -- the phases ------------------------------------------------------------------------------


async def phase_register(fleet: Fleet) -> dict[str, Any]:
    started = time.monotonic()
    ready = await fleet.start_agents()
    agents_s = time.monotonic() - started
    deadline = time.monotonic() + fleet.opts.timeout
    while not await fleet.consumed(subjects.WORKERS_STREAM, "scheduler-workers"):
        if time.monotonic() > deadline:
            raise RuntimeError("the scheduler did not take in every registration in time")
        await asyncio.sleep(0.1)
    total = time.monotonic() - started
    jsz = await asyncio.to_thread(monitor, fleet.monitor_port, "jsz")
    varz = await asyncio.to_thread(monitor, fleet.monitor_port, "varz")
    errors = [r["error"] for r in ready if r["error"]]
    return {
        "registered": sum(r["ready"] for r in ready),
        "failed": sum(r["failed"] for r in ready),
        "first_error": errors[0] if errors else "",
        "connect_register_s": round(total, 2),
        "agents_ready_s": round(agents_s, 2),
        "per_worker_p50_ms": round(1000 * statistics.median(r["p50_s"] for r in ready), 1),
        "consumers": jsz.get("consumers", 0),
        "connections": varz.get("connections", 0),
    }


async def phase_idle(fleet: Fleet) -> dict[str, Any]:
    """Heartbeats only: the bus's traffic and what every process uses."""
    await asyncio.sleep(fleet.opts.heartbeat_s)  # every worker past its first random phase
    usage = Usage(fleet.pids())
    before = await fleet.stats()
    varz0 = await asyncio.to_thread(monitor, fleet.monitor_port, "varz")
    usage.begin()
    t0 = time.monotonic()
    while time.monotonic() - t0 < fleet.opts.idle_s:
        await asyncio.sleep(0.5)
        usage.sample()
    span = time.monotonic() - t0
    varz1 = await asyncio.to_thread(monitor, fleet.monitor_port, "varz")
    after = await fleet.stats()
    figures = usage.end()
    beat = ev.WorkerHeartbeat(worker_id="sim00000", interval_s=fleet.opts.heartbeat_s)
    beats = (after["beats"] - before["beats"]) / span

    def rate(key: str) -> float:
        return round(float(varz1[key] - varz0[key]) / span, 1)

    return {
        "seconds": round(span, 1),
        "heartbeats_per_s": round(beats, 1),
        "heartbeat_bytes": len(ev.encode(beat)),
        "heartbeat_failures": after["beat_failures"] - before["beat_failures"],
        "bus_in_msgs_per_s": rate("in_msgs"),
        "bus_in_bytes_per_s": rate("in_bytes"),
        "bus_out_msgs_per_s": rate("out_msgs"),
        "bus_out_bytes_per_s": rate("out_bytes"),
        "nats_rss_mib_varz": round(varz1.get("mem", 0) / MiB, 1),
        **figures,
    }


def burst_jobs(opts: argparse.Namespace) -> list[ev.JobSubmitted]:
    rng = random.Random(opts.seed)
    return [
        ev.JobSubmitted(
            job_id=ev.new_job_id(),
            user=f"user{i % 10}",
            spec=ev.JobSpec(code_ref=CODE_REF, gpu_tenths=rng.choice(AMOUNTS), duration_s=600),
        )
        for i in range(opts.jobs)
    ]


async def submit(fleet: Fleet, jobs: list[ev.JobSubmitted]) -> None:
    """Publish every submission pipelined (as many gateways would), timing each."""
    assert fleet.nc is not None
    js = fleet.nc.jetstream()
    acks = []
    for job in jobs:
        fleet.submitted[job.job_id] = time.time()
        acks.append(
            await js.publish_async(
                bus.subject_of(job),
                ev.encode(job),
                headers=bus.headers(job.event_id, ""),
                wait_stall=30,
            )
        )
    await asyncio.wait_for(asyncio.gather(*acks), 60)


async def phase_burst(fleet: Fleet) -> dict[str, Any]:
    jobs = burst_jobs(fleet.opts)
    usage = Usage(fleet.pids())
    usage.begin()
    t0 = time.time()
    await submit(fleet, jobs)
    submitted_s = time.time() - t0
    ids = [j.job_id for j in jobs]
    deadline = time.monotonic() + fleet.opts.timeout
    while any(j not in fleet.selected and j not in fleet.failed for j in ids):
        if time.monotonic() > deadline:
            break
        fleet.check_alive()
        usage.sample()
        await asyncio.sleep(0.25)
    placing = usage.end()
    while len(fleet.completed) < len(fleet.selected) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    all_done_s = time.time() - t0
    waits = [fleet.selected[j] - fleet.submitted[j] for j in ids if j in fleet.selected]
    direct = [
        fleet.selected[j] - fleet.submitted[j]
        for j in ids
        if j in fleet.selected and j not in fleet.queued
    ]
    last = max((fleet.selected[j] for j in ids if j in fleet.selected), default=t0)
    placed = sum(1 for j in ids if j in fleet.selected)
    counts = await fleet.stats()
    return {
        "jobs": len(jobs),
        "tenths": sum(j.spec.gpu_tenths for j in jobs),
        "submit_s": round(submitted_s, 2),
        "placed": placed,
        "failed": len([j for j in ids if j in fleet.failed]),
        "failures": sorted(set(fleet.failed.values()))[:3],
        "queued_first": len([j for j in ids if j in fleet.queued]),
        "placement_s": round(last - t0, 2),
        "placements_per_s": round(placed / max(1e-9, last - t0), 1),
        "latency_p50_ms": round(1000 * pct(waits, 0.50), 1),
        "latency_p99_ms": round(1000 * pct(waits, 0.99), 1),
        "unqueued_p50_ms": round(1000 * pct(direct, 0.50), 1),
        "unqueued_p99_ms": round(1000 * pct(direct, 0.99), 1),
        "completed": len([j for j in ids if j in fleet.completed]),
        "all_completed_s": round(all_done_s, 2),
        "agent_placements": counts["placements"],
        "agent_errors": counts["errors"],
        "agent_last_error": counts["last_error"],
        **placing,
    }


async def phase_lost(fleet: Fleet) -> dict[str, Any]:
    """One worker's agent stops heartbeating: how long until the scheduler says lost?"""
    index = len(fleet.agents) - 1
    worker = f"sim{fleet.opts.workers - 1:05d}"
    reply = await fleet.ctl(index, "silence", worker=worker)
    last_beat = float(reply["last_beat"])
    bound = fleet.opts.heartbeat_s * fleet.opts.misses
    deadline = time.monotonic() + bound + 30
    while worker not in fleet.lost and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if worker not in fleet.lost:
        return {"worker": worker, "detected": False, "bound_s": bound}
    seen, stamped = fleet.lost[worker]
    return {
        "worker": worker,
        "detected": True,
        "bound_s": bound,
        "detect_s": round(seen - last_beat, 2),
        "decided_s": round(stamped - last_beat, 2),
        "others_lost": sorted(w for w in fleet.lost if w != worker)[:5],
    }


def profile_top(path: str, count: int = 25) -> list[str]:
    """The scheduler's most expensive functions (cumulative), one line each."""
    stats = pstats.Stats(path)
    rows = []
    for func, (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((cumtime, tottime, calls, func))
    rows.sort(reverse=True)
    return [
        f"{cum:8.2f}s cum {tot:8.2f}s own {calls:>9} calls  {func[0].split('/work/main/')[-1]}:"
        f"{func[1]}({func[2]})"
        for cum, tot, calls, func in rows[:count]
    ]


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    root = Path(opts.out) if opts.out else Path(tempfile.mkdtemp(prefix="cumulus-fleet-"))
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(opts, root)
    main = asyncio.current_task()
    assert main is not None
    # A SIGTERM (a test's timeout) still stops every process this run started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    report: dict[str, Any] = {
        "workers": opts.workers,
        "devices": opts.devices,
        "agents": opts.agents,
        "heartbeat_s": opts.heartbeat_s,
        "misses": opts.misses,
        "cores": os.cpu_count(),
        "out": str(root),
    }
    try:
        await fleet.start_bus()
        fleet.start_scheduler()
        await fleet.wait_scheduler()
        await fleet.observe()
        log(f"bus and scheduler up; starting {opts.workers} workers in {opts.agents} processes")
        report["register"] = await phase_register(fleet)
        log(f"registered: {report['register']}")
        if report["register"]["failed"]:
            return report
        report["idle"] = await phase_idle(fleet)
        log(f"idle: {report['idle']}")
        if opts.jobs:
            report["burst"] = await phase_burst(fleet)
            log(f"burst: {report['burst']}")
        report["lost"] = await phase_lost(fleet)
        log(f"lost: {report['lost']}")
        report["nats_rss_mib"] = round(rss(fleet.procs["nats"].pid) / MiB, 1)
        report["scheduler_rss_mib"] = round(rss(fleet.procs["scheduler"].pid) / MiB, 1)
    finally:
        await fleet.stop()
    if not opts.keep and not opts.out:
        shutil.rmtree(root, ignore_errors=True)
    return report


def print_report(report: dict[str, Any]) -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:24} {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            for line in value:
                print(f"  {line}")
        else:
            print(f"{key:26} {value}")


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--devices", type=int, default=8, help="virtual devices per worker")
    p.add_argument("--agents", type=int, default=0, help="agent processes (0: one per 250)")
    p.add_argument("--jobs", type=int, default=5000, help="jobs in the burst (0: none)")
    p.add_argument("--hold-s", type=float, default=1.0, help="how long each job holds its share")
    p.add_argument("--heartbeat-s", type=float, default=5.0, help="worker.heartbeat_s")
    p.add_argument("--misses", type=int, default=3, help="scheduler.heartbeat_misses")
    p.add_argument("--idle-s", type=float, default=20.0, help="the heartbeats-only window")
    p.add_argument("--concurrency", type=int, default=25, help="connects at once per agent")
    p.add_argument("--timeout", type=float, default=600.0, help="bound of each phase")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--consumer-limit",
        type=int,
        default=-1,
        help="nats-server's jetstream.limits.default_max_consumers (-1: none; 0: leave the\n"
        "server's own default, 1,000 per stream since 2.15)",
    )
    p.add_argument("--profile", default="", help="run the scheduler under cProfile into FILE")
    p.add_argument("--out", default="", help="keep logs and data here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    # An agent process (started by the orchestrator):
    p.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.agents <= 0:
        opts.agents = max(1, math.ceil(opts.workers / 250))
    opts.agents = min(opts.agents, opts.workers)
    return opts


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    if opts.agent:
        _run(run_agent(opts))
        return 0
    report = _run(run(opts))
    if opts.profile and os.path.exists(opts.profile):
        report["profile_top"] = profile_top(opts.profile)
    if opts.json:
        print(json.dumps(report))
    else:
        print_report(report)
    ok = report.get("burst", {}).get("placed", 0) == opts.jobs and report.get("lost", {}).get(
        "detected", False
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
