"""A chaos run: jobs flow through an embedded stack while faults are injected at random.

The stack runs for real (services/stack.py: nats-server, the four services, two workers) with
its data dir on a small tmpfs mounted for the run. Jobs (a few printed lines, fractional
shares, some sleep a little) are submitted at an even pace, at most `--in-flight` unfinished at
a time, while one fault at a time is injected, drawn by `--seed`:

- kill -9 of every process kind: nats-server, the gateway, the scheduler, a partitioner, a
  runner (each restarted as tests/test_crash.py does), and of a job's zygote, launcher, bwrap
  sandbox or job process (process backend) or its container (docker backend);
- SIGSTOP of a worker's partitioner, its runner or both, then SIGCONT (always, in a finally);
- the data disk filled with a file, then freed;
- malformed and oversized messages published on the bus by the operator's identity: garbage
  bytes, valid JSON of the wrong types, `submitted` with a negative gpu_tenths, a user with a
  space, an event just under the server's max_payload and one over it, and a submit request
  of about 1 MiB through the API.

At the end it waits (bounded) for every job to end and prints: submitted, completed, failed by
code, lost (no terminal event), run twice (two `completed`, or two runs of one job that
overlapped: the runs' own printed clocks, or two `started` attempts with no revocation or end
of the first before the second), and what outlived the run: partitions (`chronos_cli list`),
processes (descendants of the stack's processes, and anything holding or naming its data dir),
containers (docker backend) and job directories. Exit status 1 when lost, run twice or any
leak is not 0. Usage:

    .venv/bin/python bench/chaos.py [--jobs 500] [--minutes 10] [--seed 1]
        [--backend process|docker] [--short] [--json] [--out DIR]

`--short` is the CI size (tests/robustness/test_chaos_short.py): 60 jobs over about two minutes,
every fault kind at least once. Needs root (the tmpfs); without it the disk fault is skipped.
Progress goes to stderr; the table (or with `--json` one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
from nats.aio.client import Client as NatsClient  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: E402

from cumulus import AsyncClient, CumulusError, RetryPolicy, package_function  # noqa: E402
from services.stack import Stack  # noqa: E402
from shared import api, auth, subjects  # noqa: E402
from shared import config as config_mod  # noqa: E402
from shared import events as ev  # noqa: E402

TERMINAL = frozenset(ev.TERMINAL_NAMES)
READY_TIMEOUT_S = 90.0
"""A stack not ready again this long after a fault is reported stuck."""
HEARTBEAT_S = "2"
"""Workers heartbeat every 2 s (lost after 3 misses), so a SIGSTOP of a few seconds loses one."""
RETRYABLE_SUBMIT = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED"})
"""A submit that failed with these is tried again with the same job id (submit is idempotent)."""


def log(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def chaos_job() -> int:
    """What every job runs: a few printed lines with this run's token and clock, a little sleep
    (ticking, so a run's printed clock says how long it lived), and its index back."""
    import os
    import time

    token = os.urandom(6).hex()
    sleep = float(os.environ.get("CHAOS_SLEEP", "0"))
    print(f"chaos {token} begin {time.time():.3f}", flush=True)
    for i in range(int(os.environ.get("CHAOS_LINES", "3"))):
        print(f"chaos {token} line{i} {time.time():.3f}", flush=True)
    end = time.time() + sleep
    while time.time() < end:
        time.sleep(min(0.25, max(0.0, end - time.time())))
        print(f"chaos {token} tick {time.time():.3f}", flush=True)
    print(f"chaos {token} end {time.time():.3f}", flush=True)
    return int(os.environ.get("CHAOS_INDEX", "0"))


# -- processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    start: int
    """Start time in clock ticks since boot: with the pid, one process (pids are reused)."""
    cmdline: str


def read_proc(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return ProcInfo(pid, int(fields[1]), int(fields[19]), cmdline)


def processes() -> dict[int, ProcInfo]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                found[info.pid] = info
    return found


def descendants(procs: dict[int, ProcInfo], roots: Iterable[int]) -> list[ProcInfo]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for info in procs.values():
        children[info.ppid].append(info.pid)
    out, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(procs[child])
            todo.append(child)
    return out


def still_alive(info: ProcInfo) -> bool:
    now = read_proc(info.pid)
    return now is not None and now.start == info.start and not _zombie(info.pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def naming(root: Path, own: int) -> list[ProcInfo]:
    """Processes (not `own`) that hold a file under `root`, work in it or name it."""
    prefix = f"{root}/"
    found = []
    for info in processes().values():
        if info.pid == own or _zombie(info.pid):
            continue
        if prefix in info.cmdline + " " or _touches(info.pid, prefix):
            found.append(info)
    return found


def _touches(pid: int, prefix: str) -> bool:
    try:
        paths = [os.readlink(f"/proc/{pid}/cwd")]
        paths += [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return any(p.startswith(prefix) for p in paths) or f"={prefix}" in environ


# -- the job history, read from the bus ------------------------------------------------------


@dataclass
class Run:
    """One run of a job's code, from the lines it printed (its token and its clock)."""

    begin: float
    last: float
    ended: bool = False


@dataclass
class JobHistory:
    events: list[tuple[int, str, int, float, str, str]] = field(default_factory=list)
    """(stream sequence, event name, attempt, timestamp, error code, worker) in stream
    order."""
    runs: dict[str, Run] = field(default_factory=dict)
    results: list[Any] = field(default_factory=list)
    message: str = ""
    """The first failure's message."""

    def names(self) -> collections.Counter[str]:
        return collections.Counter(name for _, name, *_ in self.events)

    def terminal(self) -> tuple[str, str] | None:
        """(event name, code) of the first terminal event, if any."""
        for _, name, _, _, code, _ in self.events:
            if name in TERMINAL:
                return name, code
        return None


class History:
    """Every job event (and log line) on the bus, followed live from the first: a pull
    consumer per stream, made again from the last sequence read whenever it fails (the
    server may be killed at any time)."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.jobs: dict[str, JobHistory] = collections.defaultdict(JobHistory)
        self.read: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, streams: Iterable[tuple[str, str]]) -> None:
        for stream, subject in streams:
            self.read.setdefault(stream, 0)
            self._tasks.append(asyncio.create_task(self._follow(stream, subject)))

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def terminal(self, job_id: str) -> bool:
        return job_id in self.jobs and self.jobs[job_id].terminal() is not None

    async def caught_up(self) -> bool:
        js = self.nc.jetstream()
        for stream, read in self.read.items():
            try:
                info = await js.stream_info(stream)
            except Exception:
                return False
            if (info.state.last_seq or 0) > read:
                return False
        return True

    async def catch_up(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await self.caught_up():
                return True
            await asyncio.sleep(0.5)
        return False

    async def _follow(self, stream: str, subject: str) -> None:
        js = self.nc.jetstream()
        while not self._stop.is_set():
            sub = None
            try:
                config = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.read[stream] + 1,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=30.0,
                )
                sub = await js.pull_subscribe(subject, stream=stream, config=config)
                await self._drain(sub, stream)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _drain(self, sub: Any, stream: str) -> None:
        idle = 0
        while not self._stop.is_set():
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except nats.errors.TimeoutError:
                idle += 1
                if idle >= 5 and not await self.caught_up():
                    return  # the consumer is gone (a restarted server): make it again
                continue
            idle = 0
            for msg in msgs:
                self.read[stream] = msg.metadata.sequence.stream
                self._take(msg.subject, msg.data, self.read[stream])

    def _take(self, subject: str, data: bytes, seq: int) -> None:
        """One message of JOBS (`jobs.<user>.<job>.<worker>.<event>`) or of a stream of job
        output (`logs.<user>.<job>.<worker>`). Only well-formed events count, as the services
        would decode them (what the run injected on the bus is not a job's history)."""
        try:
            event = ev.decode(data)
        except Exception:
            return
        parts = subject.split(".")
        job_id = getattr(event, "job_id", None)
        if len(parts) < 4 or job_id != parts[2]:
            return
        job = self.jobs[job_id]
        if isinstance(event, ev.JobLog):
            self._lines(job, [line.text for line in event.lines])
            return
        attempt = getattr(event, "attempt", 0)
        code = str(getattr(event, "code", ""))
        job.events.append((seq, event.name, attempt, event.ts, code, event.worker_id))
        if isinstance(event, ev.JobCompleted):
            with contextlib.suppress(msgspec.DecodeError):
                job.results.append(msgspec.json.decode(event.result))
        elif isinstance(event, ev.Terminal) and not job.message:
            job.message = str(getattr(event, "message", ""))[:300]

    @staticmethod
    def _lines(job: JobHistory, lines: list[str]) -> None:
        for text in lines:
            words = text.split()
            if len(words) != 4 or words[0] != "chaos":
                continue
            token, kind = words[1], words[2]
            try:
                clock = float(words[3])
            except ValueError:
                continue
            run = job.runs.setdefault(token, Run(clock, clock))
            run.begin, run.last = min(run.begin, clock), max(run.last, clock)
            run.ended = run.ended or kind == "end"


def timeline(job: JobHistory) -> list[str]:
    """A job's events and runs, for a person reading a report: what happened when."""
    out = [
        f"{ts:.3f} #{seq} {name} attempt {attempt} {worker or '-'} {code}".rstrip()
        for seq, name, attempt, ts, code, worker in job.events
    ]
    for token, run in job.runs.items():
        ended = "ended" if run.ended else "no end"
        out.append(f"{run.begin:.3f} run {token} printed until {run.last:.3f} ({ended})")
    return sorted(out)


def run_twice(job: JobHistory) -> str:
    """Why this job ran twice at once, or ''."""
    names = job.names()
    if names["completed"] >= 2:
        return f"{names['completed']} completed events"
    runs = sorted(job.runs.values(), key=lambda r: r.begin)
    for first, second in zip(runs, runs[1:], strict=False):
        if second.begin < first.last:
            return f"runs overlapped: {first.begin:.3f}-{first.last:.3f} and {second.begin:.3f}"
    return _started_overlap(job)


def _started_overlap(job: JobHistory) -> str:
    """Two attempts started, an earlier one neither revoked nor ended: the scheduler placed
    the job again while a run of it was (as far as anyone was told) still going.

    An attempt revoked before its worker knew (its `started` after its `revoked`) is only
    reported (`late_starts`): its worker kills it once it reads the revocation, and nothing
    on the bus says when that was; the runs' own printed clocks say whether it overlapped."""
    started = sorted({a for _, name, a, *_ in job.events if name == "started"})
    closed = {a for _, name, a, *_ in job.events if name == "revoked" or (name in TERMINAL and a)}
    for attempt in started[:-1]:
        if attempt not in closed:
            return f"attempts {started} started; attempt {attempt} was never revoked nor ended"
    return ""


def together(attempts: dict[tuple[str, int, str], list[float]], job_id: str) -> str:
    """Two runs of the job (attempts, or two launchers of one attempt) seen running at the
    same time, or ''."""
    spans = sorted(
        (span[0], span[1], attempt, ident)
        for (job, attempt, ident), span in attempts.items()
        if job == job_id
    )
    if not spans:
        return ""
    longest = spans[0]
    for span in spans[1:]:
        if span[0] <= longest[1]:
            return (
                f"attempt {longest[2]} ({longest[3]}) seen running {longest[0]:.3f}-"
                f"{longest[1]:.3f} and attempt {span[2]} ({span[3]}) from {span[0]:.3f}"
            )
        longest = max(longest, span, key=lambda x: x[1])
    return ""


def late_starts(job: JobHistory) -> list[int]:
    """Attempts whose `started` came after their `revoked` on the bus (a revoked attempt that
    was launched anyway: its worker had not read the revocation yet)."""
    revoked: set[int] = set()
    late = []
    for _, name, attempt, *_ in job.events:
        if name == "revoked":
            revoked.add(attempt)
        elif name == "started" and attempt in revoked:
            late.append(attempt)
    return late


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Planned:
    index: int
    job_id: str
    gpu: float
    sleep: float
    lines: int
    accepted: bool = False
    errors: list[str] = field(default_factory=list)


@dataclass
class Options:
    jobs: int = 500
    minutes: float = 10.0
    seed: int = 1
    backend: str = "process"
    workers: int = 2
    in_flight: int = 24
    out: Path | None = None
    tmpfs_mib: int = 512
    short: bool = False
    as_json: bool = False


@dataclass
class Fault:
    kind: str
    at: float
    detail: str
    recovery_s: float | None = None


SERVICE_KINDS = ("nats", "gateway", "scheduler", "partitioner", "runner")
BUS_KINDS = (
    "bus:garbage",
    "bus:wrong-types",
    "bus:negative-gpu",
    "bus:user-space",
    "bus:oversized",
    "api:oversized-submit",
)


def fault_kinds(backend: str) -> list[str]:
    kinds = [f"kill9:{k}" for k in SERVICE_KINDS]
    if backend == "process":
        kinds += ["kill9:zygote", "kill9:launcher", "kill9:bwrap", "kill9:job"]
    else:
        kinds += ["kill9:container"]
    kinds += ["stop:partitioner", "stop:runner", "stop:worker", "disk:full"]
    return kinds + list(BUS_KINDS)


class Chaos:
    def __init__(self, opts: Options, root: Path) -> None:
        self.opts = opts
        self.root = root
        self.rng = random.Random(opts.seed)
        self.data = root / "data"
        self.tmpfs = False
        self.stack: Stack | None = None
        self.nc: NatsClient | None = None
        self.client: AsyncClient | None = None
        self.history: History | None = None
        self.code_ref = ""
        self.planned: list[Planned] = []
        self.extra: list[Planned] = []
        """Jobs the faults submitted (an oversized submit the gateway took)."""
        self.faults: list[Fault] = []
        self.unavailable: dict[str, str] = {}
        self.notes: list[str] = []
        self.exits: collections.Counter[str] = collections.Counter()
        """"<process> exited with <code>" -> how often, for exits this run did not cause."""
        self.stuck: list[str] = []
        self.injected: dict[str, str] = {}
        """Job ids of events injected on the bus -> what the event was."""
        self.submit_codes: collections.Counter[str] = collections.Counter()
        self.seen: dict[tuple[int, int], ProcInfo] = {}
        self.attempts: dict[tuple[str, int, str], list[float]] = {}
        """(job, attempt, launcher or container) -> [first, last] seen running (wall clock)."""
        """Every descendant of the stack's processes seen while it ran."""
        self.closing = False
        self.faults_done = asyncio.Event()
        self._down: set[str] = set()
        """Processes this run has stopped on purpose (the monitor leaves them be)."""
        self._dead: set[str] = set()
        """Processes the monitor found dead at its last look."""
        self._restarted: dict[str, tuple[float, int]] = {}
        """Process -> when the monitor last restarted it, and how many times in a row."""
        tag = f"{os.getpid() % 100000}"
        self.workers = [f"cw{i + 1}-{tag}" for i in range(opts.workers)]

    # -- setup ---------------------------------------------------------------------------

    def mount(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.unavailable["disk:full"] = "not root: no tmpfs to fill"
            return
        size = f"size={self.opts.tmpfs_mib}m,mode=0755"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", size, "cumulus-chaos", str(self.data)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            self.unavailable["disk:full"] = f"mount failed: {done.stderr.strip()}"
            return
        self.tmpfs = True

    def unmount(self) -> None:
        if not self.tmpfs:
            return
        done = subprocess.run(["umount", str(self.data)], capture_output=True, text=True)
        if done.returncode != 0:
            log(f"umount failed ({done.stderr.strip()}); detaching it lazily")
            subprocess.run(["umount", "-l", str(self.data)], capture_output=True)
        self.tmpfs = False

    def stack_env(self) -> dict[str, str]:
        env = {"CUMULUS_WORKER_HEARTBEAT_S": HEARTBEAT_S}
        # Stream limits that fit the tmpfs (nats-server refuses a stream larger than its store).
        for key, value in {
            "retention.jobs_max_bytes": "64MiB",
            "retention.logs_max_bytes": "32MiB",
            "retention.results_max_bytes": "32MiB",
        }.items():
            env.update(known_settings({key: value}))
        return env

    async def _start_stack(self, bus_apart: bool) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stack_dir = self.data / "stack"
        shutil.rmtree(stack_dir, ignore_errors=True)
        stack_dir.mkdir(parents=True)
        # Service logs stay off the disk that is filled: they tell what happened.
        (stack_dir / "logs").symlink_to(logs)
        if bus_apart:
            bus = self.root / "bus-store"
            shutil.rmtree(bus, ignore_errors=True)
            bus.mkdir()
            (stack_dir / "nats").symlink_to(bus)
        self.stack = Stack(
            data_dir=stack_dir,
            workers=self.workers,
            devices="2x16GiB",
            backend=self.opts.backend,
            env=self.stack_env(),
        )
        try:
            await self.stack.start(timeout=120)
        except BaseException:
            self.stack.stop()
            raise

    async def start(self) -> None:
        try:
            await self._start_stack(bus_apart=not self.tmpfs)
        except RuntimeError as exc:
            if not self.tmpfs:
                raise
            # A stack that cannot start with its bus on the small disk (nats-server reserves
            # each stream's max_bytes up front) runs with the bus's store on the real disk:
            # the disk fault then fills the services' disk only.
            self.notes.append(f"bus store moved off the tmpfs: the stack did not start ({exc})")
            log(self.notes[-1])
            await self._start_stack(bus_apart=True)
        assert self.stack is not None
        creds = auth.load_credentials(self.stack.credentials("admin", "admin"))
        self.nc = await nats.connect(
            self.stack.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=quiet,
            **auth.connect_options(creds),
        )
        self.history = History(self.nc)
        self.history.start(await self._streams())
        self.client = AsyncClient(
            profile=self.stack.profile(), retry=RetryPolicy(max_attempts=1), packaging="pickle"
        )
        await self.client.connect()
        self.code_ref = await self.client.upload(package_function(chaos_job))

    async def _streams(self) -> list[tuple[str, str]]:
        """The job stream, and a stream of job output if the stack keeps one apart."""
        assert self.nc is not None
        found = [(subjects.JOBS_STREAM, "jobs.>")]
        with contextlib.suppress(Exception):
            for info in await self.nc.jetstream().streams_info():
                name = str(info.config.name)
                if name != subjects.JOBS_STREAM and "LOG" in name.upper():
                    found.append((name, ">"))
        return found

    # -- jobs ----------------------------------------------------------------------------

    def plan(self) -> None:
        for i in range(self.opts.jobs):
            roll = self.rng.random()
            # Many jobs sleep a little, so a fault finds some running.
            sleep = 0.0 if roll < 0.4 else self.rng.uniform(0.5, 3) if roll < 0.8 else 6.0
            self.planned.append(
                Planned(
                    index=i,
                    job_id=f"jchaos{self.opts.seed}x{i}x{os.urandom(3).hex()}",
                    gpu=self.rng.choice([0.1, 0.1, 0.2, 0.3, 0.5]),
                    sleep=round(sleep, 2),
                    lines=self.rng.randint(2, 5),
                )
            )

    def in_flight(self) -> int:
        assert self.history is not None
        return sum(1 for p in self.planned if p.accepted and not self.history.terminal(p.job_id))

    async def submit_all(self, until: float) -> None:
        """Submit the planned jobs at an even pace over the run, never more than
        `in_flight` unfinished; the last few only once the faults are over (the stack must
        still run new jobs then). A submit the stack cannot take now is tried again (same
        id) until `until` (monotonic)."""
        tail = max(3, len(self.planned) // 20)
        main = self.planned[: len(self.planned) - tail]
        gap = self.opts.minutes * 60 * 0.9 / max(1, len(main))
        slots = asyncio.Semaphore(8)
        tasks = []
        t0 = time.monotonic()
        for job in self.planned:
            if job.index < len(main):
                await asyncio.sleep(max(0.0, t0 + job.index * gap - time.monotonic()))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.faults_done.wait(), until - time.monotonic())
            await self._room(until)
            await slots.acquire()
            task = asyncio.create_task(self._submit(job, until))
            task.add_done_callback(lambda _: slots.release())
            tasks.append(task)
        await asyncio.gather(*tasks)

    async def _room(self, until: float) -> None:
        """Until fewer than `in_flight` accepted jobs are unfinished (or `until`)."""
        while self.in_flight() >= self.opts.in_flight and time.monotonic() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    def _body(self, job: Planned) -> dict[str, Any]:
        env = {
            "CHAOS_INDEX": str(job.index),
            "CHAOS_SLEEP": str(job.sleep),
            "CHAOS_LINES": str(job.lines),
        }
        return {
            "code_ref": self.code_ref,
            "gpu": job.gpu,
            "duration": 300,
            "job_id": job.job_id,
            "env": env,
        }

    async def _submit(self, job: Planned, until: float) -> None:
        assert self.client is not None
        while time.monotonic() < until:
            try:
                await self.client.request("submit", self._body(job))
                job.accepted = True
                return
            except CumulusError as exc:
                self.submit_codes[exc.code] += 1
                job.errors.append(f"{exc.code}: {exc.message[:120]}")
                if exc.code not in RETRYABLE_SUBMIT:
                    return
            except Exception as exc:  # the connection itself, while nats-server restarts
                self.submit_codes[type(exc).__name__] += 1
            await asyncio.sleep(0.5 + self.rng.random())

    # -- watching the processes -------------------------------------------------------------

    async def monitor(self, stop: asyncio.Event) -> None:
        """Restart a process of the stack that exited on its own (and record it); note every
        descendant of the stack's processes (the leak check at the end) and which attempts
        of each job are running (at most one may be)."""
        assert self.stack is not None
        while not stop.is_set() and not self.closing:
            self._restart_exited()
            await asyncio.to_thread(self._note_descendants)
            await asyncio.to_thread(self._note_attempts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def _restart_exited(self) -> None:
        assert self.stack is not None
        for name, proc in self.stack.procs.items():
            if self.closing or name in self._down or proc.alive() or proc.popen is None:
                self._dead.discard(name)
                continue
            if name not in self._dead:
                # Seen dead twice in a row first: the stack's own watchdog restarts
                # nats-server (stop, then start at once) and must not be raced.
                self._dead.add(name)
                continue
            last, count = self._restarted.get(name, (0.0, 0))
            if time.monotonic() - last < min(30.0, 2.0**count):
                continue  # a process that keeps exiting is restarted less and less often
            self.exits[f"{name} exited with {proc.popen.returncode}"] += 1
            log(f"{name} exited on its own with {proc.popen.returncode}; restarting it")
            recent = time.monotonic() - last < 60
            self._restarted[name] = (time.monotonic(), count + 1 if recent else 1)
            proc.start()

    def _note_descendants(self) -> None:
        assert self.stack is not None
        roots = [p.pid for p in self.stack.procs.values() if p.popen is not None]
        for info in descendants(processes(), roots):
            self.seen.setdefault((info.pid, info.start), info)

    def _note_attempts(self) -> None:
        """(job, attempt) -> first and last time seen running: its launcher alive with no
        exit written (process backend), or its container running (docker backend). The same
        launcher or container seen twice ran in between, so two attempts whose spans
        intersect ran at the same time."""
        now = time.time()
        for key in self._running_attempts():
            span = self.attempts.setdefault(key, [now, now])
            span[1] = now

    def _running_attempts(self) -> list[tuple[str, int, str]]:
        """(job, attempt, launcher pid or container id) of what runs now."""
        found = []
        if self.opts.backend == "docker":
            for worker in self.workers:
                done = subprocess.run(
                    ["docker", "ps", "--filter", f"label=cumulus.worker={worker}", "--format"]
                    + ['{{.Label "cumulus.job"}} {{.Label "cumulus.attempt"}} {{.ID}}'],
                    capture_output=True,
                    text=True,
                )
                for line in done.stdout.splitlines():
                    job_id, attempt, ident = (line.split() + ["", "", ""])[:3]
                    if attempt.isdigit():
                        found.append((job_id, int(attempt), ident))
            return found
        for job_dir in (self.data / "stack").glob("runner-*/jobs/*.*"):
            job_id, _, attempt = job_dir.name.rpartition(".")
            if not attempt.isdigit() or (job_dir / "exit.json").exists():
                continue
            with contextlib.suppress(OSError, ValueError):
                pid = int((job_dir / "launcher.pid").read_text())
                info = read_proc(pid)
                if info is not None and not _zombie(pid):
                    found.append((job_id, int(attempt), f"{pid}:{info.start}"))
        return found

    async def ready(self, within: float = READY_TIMEOUT_S) -> float | None:
        """Seconds until the gateway answers and the scheduler sees every worker ready."""
        assert self.nc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < within:
            with contextlib.suppress(Exception):
                await api.request(self.nc, "health", {}, dict, timeout=1.0)
                reply = await api.request(self.nc, "cumulus.scheduler.workers", {}, dict, 1.0)
                seen = {w["worker_id"] for w in reply["workers"] if w["status"] == "ready"}
                if set(self.workers) <= seen:
                    return time.monotonic() - t0
            await asyncio.sleep(0.25)
        return None

    # -- faults ----------------------------------------------------------------------------

    def kinds(self) -> list[str]:
        return [k for k in fault_kinds(self.opts.backend) if k not in self.unavailable]

    async def inject_all(self, until: float, must_cover: float) -> None:
        """One fault at a time until `until`: first each kind once (in a seeded order), then
        drawn at random; kinds not yet injected are still tried until `must_cover`."""
        todo = self.kinds()
        self.rng.shuffle(todo)
        # The short run's faults follow each other closely (each takes a few seconds itself).
        pause = 2.0 if self.opts.short else min(12.0, (until - time.monotonic()) / len(todo))
        await asyncio.sleep(min(pause * 2, 8.0))
        while True:
            now = time.monotonic()
            if (now >= until and not todo) or now >= must_cover:
                break
            kind = todo.pop(0) if todo else self.rng.choice(self.kinds())
            injected = await self.inject(kind)
            if not injected and kind not in self.injected_kinds() and now < must_cover - 30:
                todo.append(kind)  # nothing to hit right now (no job running): later
            gap = pause if self.opts.short else self.rng.uniform(0.3, 1.0) * pause
            await asyncio.sleep(max(0.5, gap))
        self.faults_done.set()
        missing = [k for k in todo if k not in self.injected_kinds()]
        if missing:
            log(f"never injected (nothing to hit in time): {', '.join(missing)}")

    def injected_kinds(self) -> collections.Counter[str]:
        return collections.Counter(f.kind for f in self.faults)

    async def inject(self, kind: str) -> bool:
        """Inject one fault; False if there was nothing to inject it on."""
        family, _, what = kind.partition(":")
        act: dict[str, Callable[[str], Awaitable[str | None]]] = {
            "kill9": self.kill9,
            "stop": self.pause,
            "disk": self.fill_disk,
            "bus": self.bus,
            "api": self.api_oversized,
        }
        t0 = time.time()
        try:
            detail = await act[family](what)
        except Exception as exc:
            detail = f"the injection itself failed: {type(exc).__name__}: {exc}"
        if detail is None:
            return False
        fault = Fault(kind, t0, detail)
        self.faults.append(fault)
        log(f"fault {kind}: {detail}")
        ready = await self.ready()
        fault.recovery_s = None if ready is None else round(ready, 1)
        if fault.recovery_s is None:
            self.stuck.append(f"not ready {READY_TIMEOUT_S:.0f} s after {kind} ({detail})")
            log(f"STUCK: not ready {READY_TIMEOUT_S:.0f} s after {kind}")
        return True

    def _service(self, what: str) -> str:
        if what in ("partitioner", "runner"):
            return f"{what}-{self.rng.choice(self.workers)}"
        return what

    async def kill9(self, what: str) -> str | None:
        if what in SERVICE_KINDS:
            return await self._kill_service(self._service(what))
        if what == "container":
            return await self._kill_container()
        return await self._kill_job_process(what)

    async def _kill_service(self, name: str) -> str:
        assert self.stack is not None
        proc = self.stack.procs[name]
        self._down.add(name)
        try:
            proc.kill9()
            down = self.rng.uniform(0.2, 2.0)
            await asyncio.sleep(down)
            proc.start()
        finally:
            self._down.discard(name)
        return f"{name} killed, restarted after {down:.1f} s"

    def _running_job_dirs(self) -> list[Path]:
        ours = {p.job_id for p in self.planned}
        found = []
        for jobs in (self.data / "stack").glob("runner-*/jobs"):
            for job_dir in jobs.iterdir():
                running = (job_dir / "child.pid").exists() and not (job_dir / "exit.json").exists()
                if running and job_dir.name.rpartition(".")[0] in ours:
                    found.append(job_dir)
        return found

    async def _kill_job_process(self, what: str) -> str | None:
        """kill -9 a zygote, or a running job's launcher, bwrap or innermost process."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            target = await asyncio.to_thread(self._job_target, what)
            if target is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target.pid, signal.SIGKILL)
                return f"pid {target.pid} ({target.cmdline[:80]})"
            await asyncio.sleep(0.5)
        return None

    def _job_target(self, what: str) -> ProcInfo | None:
        assert self.stack is not None
        procs = processes()
        if what == "zygote":
            runner = self.stack.procs[f"runner-{self.rng.choice(self.workers)}"]
            if not runner.alive():
                return None
            found = [p for p in descendants(procs, [runner.pid]) if "zygote" in p.cmdline]
            return found[0] if found else None
        dirs = self._running_job_dirs()
        if not dirs:
            return None
        job_dir = self.rng.choice(dirs)
        try:
            launcher = int((job_dir / "launcher.pid").read_text())
            child = int((job_dir / "child.pid").read_text())
        except (OSError, ValueError):
            return None
        if what == "launcher":
            return procs.get(launcher)
        if what == "bwrap":
            info = procs.get(child)
            return info if info is not None and "bwrap" in info.cmdline else None
        inner = [p for p in descendants(procs, [child]) if "job_image" in p.cmdline]
        return inner[-1] if inner else procs.get(child)

    async def _kill_container(self) -> str | None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ids = []
            for worker in self.workers:
                done = await asyncio.to_thread(
                    subprocess.run,
                    ["docker", "ps", "-q", "--filter", f"label=cumulus.worker={worker}"],
                    capture_output=True,
                    text=True,
                )
                ids += done.stdout.split()
            if ids:
                victim = self.rng.choice(ids)
                await asyncio.to_thread(
                    subprocess.run, ["docker", "kill", "-s", "KILL", victim], capture_output=True
                )
                return f"container {victim}"
            await asyncio.sleep(0.5)
        return None

    async def pause(self, what: str) -> str:
        assert self.stack is not None
        worker = self.rng.choice(self.workers)
        names = {
            "partitioner": [f"partitioner-{worker}"],
            "runner": [f"runner-{worker}"],
            "worker": [f"partitioner-{worker}", f"runner-{worker}"],
        }[what]
        seconds = round(self.rng.uniform(3.0, 15.0 if not self.opts.short else 9.0), 1)
        pids = [self.stack.procs[n].pid for n in names if self.stack.procs[n].alive()]
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(seconds)
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        return f"{' and '.join(names)} stopped for {seconds} s"

    async def fill_disk(self, _: str) -> str:
        seconds = round(self.rng.uniform(4.0, 20.0 if not self.opts.short else 7.0), 1)
        filler = self.data / "chaos-fill"
        try:
            filled = await asyncio.to_thread(fill, filler)
            await asyncio.sleep(seconds)
        finally:
            filler.unlink(missing_ok=True)
        return f"{filled >> 20} MiB written until the disk was full, freed after {seconds} s"

    async def bus(self, what: str) -> str:
        assert self.nc is not None
        messages = {
            "garbage": self._garbage,
            "wrong-types": self._wrong_types,
            "negative-gpu": self._negative_gpu,
            "user-space": self._user_space,
            "oversized": self._near_max,
        }[what]()
        outcomes: collections.Counter[str] = collections.Counter()
        js = self.nc.jetstream()
        for subject, data in messages:
            try:
                await js.publish(subject, data, timeout=5)
                outcomes["stored"] += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1
        if what == "oversized":
            outcomes[await self._over_max()] += 1
        return f"{len(messages) + (what == 'oversized')} messages: {dict(outcomes)}"

    def _job_id(self, what: str) -> str:
        job_id = f"jx{os.urandom(5).hex()}"
        self.injected[job_id] = what
        return job_id

    def _subjects(self, job_id: str, user: str = "default") -> list[str]:
        worker = self.rng.choice(self.workers)
        return [
            subjects.job(user, job_id, "", "submitted"),
            subjects.job(user, job_id, worker, "scheduled"),
            subjects.job(user, job_id, worker, "partition_ready"),
            subjects.job(user, job_id, worker, "completed"),
            subjects.job(user, job_id, worker, "revoked"),
        ]

    def _garbage(self) -> list[tuple[str, bytes]]:
        out = []
        for subject in self._subjects(self._job_id("garbage")):
            out.append((subject, self.rng.randbytes(self.rng.randint(1, 600))))
        out.append((subjects.worker(self.workers[0], "heartbeat"), b"\xff\xfe not json"))
        return out

    def _wrong_types(self) -> list[tuple[str, bytes]]:
        job_id = self._job_id("wrong types")
        bodies: list[Any] = [
            {"type": "cumulus.job.v1.submitted", "job_id": 7, "spec": "x", "user": ["a"]},
            {"type": "cumulus.job.v1.scheduled", "job_id": job_id, "devices": "0", "tenths": []},
            {"type": "cumulus.job.v1.partition_ready", "job_id": job_id, "env": [1, 2]},
            {"type": "cumulus.job.v1.completed", "job_id": job_id, "result": 1, "ts": "now"},
            {"type": "cumulus.job.v1.revoked", "job_id": job_id, "attempt": "one"},
        ]
        out = [
            (s, json.dumps(b).encode()) for s, b in zip(self._subjects(job_id), bodies, strict=True)
        ]
        out.append((subjects.job("default", job_id, "", "submitted"), b"[]"))
        out.append((subjects.job("default", job_id, "", "submitted"), b"null"))
        out.append((subjects.job("default", job_id, "", "submitted"), b"[" * 50_000))
        beat = {"type": "cumulus.worker.v1.heartbeat", "worker_id": None, "interval_s": "x"}
        out.append((subjects.worker(self.workers[0], "heartbeat"), json.dumps(beat).encode()))
        return out

    def _submitted(self, job_id: str, user: str, **spec: Any) -> bytes:
        event = ev.JobSubmitted(
            job_id=job_id,
            user=user,
            spec=ev.JobSpec(code_ref=self.code_ref, duration_s=300, **spec),
        )
        return ev.encode(event)

    def _negative_gpu(self) -> list[tuple[str, bytes]]:
        out = []
        for tenths in (-5, 0, 10**9):
            job_id = self._job_id(f"gpu_tenths {tenths}")
            data = self._submitted(job_id, "default", gpu_tenths=tenths)
            out.append((subjects.job("default", job_id, "", "submitted"), data))
        return out

    def _user_space(self) -> list[tuple[str, bytes]]:
        out = []
        for user in ("bad user", "", "a.b"):
            job_id = self._job_id(f"user {user!r}")
            data = self._submitted(job_id, user, gpu_tenths=1)
            out.append((subjects.job("default", job_id, "", "submitted"), data))
        return out

    def _near_max(self) -> list[tuple[str, bytes]]:
        """A `submitted` just under the server's max_payload: what the scheduler derives
        from it (WorkerSelected carries the spec again) cannot fit."""
        assert self.nc is not None
        job_id = self._job_id("submitted near max_payload")
        room = self.nc.max_payload - 2_000
        data = self._submitted(job_id, "default", gpu_tenths=1, env={"PAD": "x" * room})
        return [(subjects.job("default", job_id, "", "submitted"), data)]

    async def _over_max(self) -> str:
        """A message over the server's max_payload on a job subject, from a connection of its
        own whose client-side check is lifted: the server must refuse it."""
        assert self.stack is not None
        creds = auth.load_credentials(self.stack.credentials("admin", "admin"))
        nc = await nats.connect(
            self.stack.url, allow_reconnect=False, error_cb=quiet, **auth.connect_options(creds)
        )
        size = nc.max_payload + 64 * 1024
        job_id = self._job_id("over max_payload")
        try:
            nc._max_payload = size + 1  # the server decides, not the client
            await nc.publish(subjects.job("default", job_id, "", "submitted"), b"x" * size)
            await nc.flush(timeout=3)
            await asyncio.sleep(0.5)
            if nc.is_closed or nc.last_error is not None:
                return f"over max_payload: refused by the server ({nc.last_error})"
            return "over max_payload: taken by the server"
        except Exception as exc:
            return f"over max_payload: {type(exc).__name__}"
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def api_oversized(self, _: str) -> str:
        """A submit of about 1 MiB (an env value under the request limit) as a user."""
        assert self.client is not None
        assert self.nc is not None
        job_id = f"jchaosbig{os.urandom(4).hex()}"
        pad = self.nc.max_payload - 600
        body = {"code_ref": self.code_ref, "gpu": 0.1, "duration": 300, "job_id": job_id}
        body["env"] = {"PAD": "x" * pad}
        try:
            await self.client.request("submit", body)
        except CumulusError as exc:
            return f"submit of {pad} B env refused: {exc.code}"
        except Exception as exc:
            return f"submit of {pad} B env: {type(exc).__name__}"
        self.extra.append(Planned(0, job_id, 0.1, 0, 0, accepted=True))
        return f"submit of {pad} B env accepted as {job_id} (it must still end)"

    # -- the end ---------------------------------------------------------------------------

    async def settle(self, within: float) -> list[str]:
        """Wait for every accepted job to end; the ids of those that did not."""
        assert self.history is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            missing = [p.job_id for p in self.planned + self.extra if p.accepted]
            missing = [j for j in missing if not self.history.terminal(j)]
            if not missing:
                break
            await asyncio.sleep(1.0)
        await self.history.catch_up(30)
        return [p.job_id for p in self.accepted() if not self.history.terminal(p.job_id)]

    def accepted(self) -> list[Planned]:
        """Jobs the stack took: the submit was answered, or its `submitted` is on the bus."""
        assert self.history is not None
        return [
            p
            for p in self.planned + self.extra
            if p.accepted or "submitted" in self.history.jobs.get(p.job_id, JobHistory()).names()
        ]

    async def partitions_left(self, within: float) -> list[str]:
        deadline = time.monotonic() + within
        while True:
            left = []
            for worker in self.workers:
                left += [f"{worker}: {p}" for p in await asyncio.to_thread(self._chronos, worker)]
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(1.0)

    def _chronos(self, worker: str) -> list[str]:
        state = self.data / "stack" / f"chronos-{worker}"
        done = subprocess.run(
            [sys.executable, "-m", "cumulus_core", "--json", "--state-dir", str(state), "list"],
            capture_output=True,
            text=True,
        )
        try:
            found = json.loads(done.stdout)["partitions"]
        except (ValueError, KeyError):
            return [f"chronos_cli list failed: {done.stderr.strip()[-200:]}"]
        return [f"{p.get('id', p)} {p.get('label', '')}" for p in found]

    async def job_dirs_left(self, within: float, spares: bool = False) -> list[str]:
        """Attempts' directories left (with `spares`, once the stack stopped, the warm
        sandboxes' `.spare-<pid>` too)."""
        deadline = time.monotonic() + within
        while True:
            left = [
                str(d.relative_to(self.data))
                for d in (self.data / "stack").glob("runner-*/jobs/*")
                if d.is_dir() and (spares or not d.name.startswith("."))
            ]
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(1.0)

    async def processes_left(self, within: float) -> list[str]:
        deadline = time.monotonic() + within
        while True:
            alive = {i.pid: i for i in self.seen.values() if still_alive(i)}
            for info in await asyncio.to_thread(naming, self.data, os.getpid()):
                alive.setdefault(info.pid, info)
            if not alive or time.monotonic() > deadline:
                return [f"{i.pid} {i.cmdline[:160]}" for i in alive.values()]
            await asyncio.sleep(1.0)

    def containers_left(self) -> list[str]:
        if self.opts.backend == "process":
            return []
        left = []
        for worker in self.workers:
            done = subprocess.run(
                ["docker", "ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Status}}"]
                + ["--filter", f"label=cumulus.worker={worker}"],
                capture_output=True,
                text=True,
            )
            left += done.stdout.splitlines()
        return left

    async def dead_letters(self) -> dict[str, int]:
        assert self.nc is not None
        with contextlib.suppress(Exception):
            info = await self.nc.jetstream().stream_info(subjects.DEAD_STREAM, subjects_filter=">")
            return dict(info.state.subjects or {})
        return {}

    def close_stack(self) -> None:
        self.closing = True  # the monitor restarts nothing from now on
        if self.stack is None:
            return
        for proc in self.stack.procs.values():  # nothing stays stopped, whatever happened
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        self.stack.stop()


def fill(path: Path) -> int:
    """Write `path` until the file system is full; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        stat = os.statvfs(path.parent)
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize)
        written = os.fstat(f.fileno()).st_size
        f.seek(written)
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            with contextlib.suppress(OSError):
                while True:
                    written += f.write(block) or 0
    return written


def known_settings(settings: dict[str, str]) -> dict[str, str]:
    """The environment variables for those `settings` this tree's configuration knows (the
    retention keys are new: the tools run either way)."""
    env = {}
    for key, value in settings.items():
        name = config_mod.env_name(key)
        try:
            config_mod.load(environ={name: value})
        except Exception:
            continue
        env[name] = value
    return env


async def quiet(exc: Exception) -> None:
    pass


# -- the report --------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    backend: str
    minutes: float
    elapsed_s: float
    submitted: int
    completed: int
    failed: dict[str, int]
    failure_examples: dict[str, str]
    timelines: dict[str, list[str]]
    late_starts: dict[str, list[int]]
    lost: list[str]
    run_twice: dict[str, str]
    wrong_results: list[str]
    leaked: dict[str, list[str]]
    faults: dict[str, int]
    fault_log: list[str]
    """Each fault: when it began (wall clock, as event timestamps), what, how long until ready."""
    fault_kinds: list[str]
    unavailable: dict[str, str]
    recovery_s: dict[str, float]
    service_exits: dict[str, int]
    stuck: list[str]
    submit_errors: dict[str, int]
    injected: dict[str, str]
    dead_letters: dict[str, int]
    notes: list[str]
    out: str

    def ok(self) -> bool:
        return not self.lost and not self.run_twice and not any(self.leaked.values())

    def as_json(self) -> dict[str, Any]:
        out = msgspec.to_builtins(self)
        out["lost_jobs"], out["lost"] = self.lost, len(self.lost)
        out["run_twice_jobs"], out["run_twice"] = self.run_twice, len(self.run_twice)
        out["leaked_detail"] = self.leaked
        out["leaked"] = {k: len(v) for k, v in self.leaked.items()}
        out["ok"] = self.ok()
        return dict(out)

    def table(self) -> str:
        rows = [
            ("submitted", str(self.submitted)),
            ("completed", str(self.completed)),
            *[(f"failed {code}", str(n)) for code, n in sorted(self.failed.items())],
            ("lost (no terminal state)", str(len(self.lost))),
            ("run twice", str(len(self.run_twice))),
            ("wrong results", str(len(self.wrong_results))),
            ("started after revoked (killed)", str(len(self.late_starts))),
            *[(f"leaked {k}", str(len(v))) for k, v in self.leaked.items()],
            ("service exits (not ours)", str(sum(self.service_exits.values()))),
            ("stuck after a fault", str(len(self.stuck))),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [
            f"chaos run: seed {self.seed}, backend {self.backend}, "
            f"{self.elapsed_s / 60:.1f} min, data and logs in {self.out}",
            "faults: " + ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items())),
        ]
        if self.unavailable:
            lines.append(f"not injected: {self.unavailable}")
        lines += [f"note: {note}" for note in self.notes]
        if self.recovery_s:
            worst = max(self.recovery_s.items(), key=lambda kv: kv[1])
            lines.append(f"ready again after a fault: at most {worst[1]:.1f} s ({worst[0]})")
        lines += [f"  {name.ljust(width)}  {value:>6}" for name, value in rows]
        for title, items in (
            ("failed", [f"{code}: {text}" for code, text in self.failure_examples.items()]),
            ("injected", [f"{what}: {end}" for what, end in self.injected.items()]),
            ("lost", self.lost),
            ("run twice", [f"{j}: {why}" for j, why in self.run_twice.items()]),
            ("wrong results", self.wrong_results),
            ("service exits", [f"{what} x{n}" for what, n in self.service_exits.items()]),
            ("stuck", self.stuck),
            *[(f"leaked {k}", v) for k, v in self.leaked.items()],
        ):
            for item in items[:20]:
                lines.append(f"  {title}: {item}")
        if self.timelines:  # the faults, to read the timelines against
            lines += [f"  fault at {entry}" for entry in self.fault_log]
        for job_id, steps in list(self.timelines.items())[:10]:
            lines.append(f"  timeline of {job_id}:")
            lines += [f"    {step}" for step in steps]
        return "\n".join(lines)


@dataclass
class Tally:
    completed: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    """A failure's message for each code (the first seen)."""
    twice: dict[str, str] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    timelines: dict[str, list[str]] = field(default_factory=dict)
    """What happened to each job that ran twice or was lost."""
    late_starts: dict[str, list[int]] = field(default_factory=dict)
    """Jobs with an attempt started after it was revoked (its worker had not read it yet)."""


def tally(chaos: Chaos) -> Tally:
    """How the accepted jobs ended, which ran twice (why) and which returned a wrong value."""
    assert chaos.history is not None
    out = Tally()
    for job in chaos.accepted():
        history = chaos.history.jobs.get(job.job_id, JobHistory())
        end = history.terminal()
        if end is not None and end[0] == "completed":
            out.completed += 1
        elif end is not None:
            code = end[1] or end[0].upper()
            out.failed[code] += 1
            out.examples.setdefault(code, f"{job.job_id}: {history.message}")
        why = run_twice(history) or together(chaos.attempts, job.job_id)
        if why:
            out.twice[job.job_id] = why
        if why or end is None:
            out.timelines[job.job_id] = timeline(history)
        late = late_starts(history)
        if late:
            out.late_starts[job.job_id] = late
        for result in history.results:
            value = result.get("data") if isinstance(result, dict) else None
            json_result = isinstance(result, dict) and result.get("encoding") == "json"
            # (the oversized submit's job, lines 0, returns 0 whatever its index)
            if json_result and value != job.index and job.lines:
                out.wrong.append(f"{job.job_id}: {value!r} != {job.index}")
    return out


def injected_outcomes(chaos: Chaos) -> dict[str, str]:
    """What became of each event injected on the bus (by its job id): how the job ended,
    if anything made it a job at all."""
    assert chaos.history is not None
    out = {}
    for job_id, what in chaos.injected.items():
        end = chaos.history.jobs.get(job_id, JobHistory()).terminal()
        out[f"{what} ({job_id})"] = "no job (set aside)" if end is None else " ".join(end)
    return out


async def finish(chaos: Chaos, t0: float) -> Report:
    log("waiting for every job to end")
    lost = await chaos.settle(within=240)
    leaked = {
        "partitions": await chaos.partitions_left(within=60),
        "job_dirs": await chaos.job_dirs_left(within=30),
    }
    dead = await chaos.dead_letters()
    counted = tally(chaos)
    injected = injected_outcomes(chaos)
    assert chaos.history is not None
    await chaos.history.stop()
    if chaos.client is not None:
        await chaos.client.close()
    if chaos.nc is not None:
        with contextlib.suppress(Exception):
            await chaos.nc.close()
    chaos.close_stack()
    bus_restarts = getattr(chaos.stack, "bus_restarts", 0)  # the stack's bus watchdog, if any
    if bus_restarts:
        chaos.notes.append(f"nats-server restarts by the stack's bus watchdog: {bus_restarts}")
    leaked["processes"] = await chaos.processes_left(within=20)
    after = await chaos.job_dirs_left(within=10, spares=True)
    leaked["job_dirs"] += [d for d in after if d not in leaked["job_dirs"]]
    leaked["containers"] = chaos.containers_left()
    recovery: dict[str, float] = {}
    for fault in chaos.faults:
        if fault.recovery_s is not None:
            recovery[fault.kind] = max(recovery.get(fault.kind, 0.0), round(fault.recovery_s, 2))
    return Report(
        seed=chaos.opts.seed,
        backend=chaos.opts.backend,
        minutes=chaos.opts.minutes,
        elapsed_s=round(time.monotonic() - t0, 1),
        submitted=len(chaos.accepted()),
        completed=counted.completed,
        failed=dict(counted.failed),
        failure_examples=counted.examples,
        timelines=counted.timelines,
        late_starts=counted.late_starts,
        lost=lost,
        run_twice=counted.twice,
        wrong_results=counted.wrong,
        leaked=leaked,
        faults=dict(chaos.injected_kinds()),
        fault_log=[f"{f.at:.3f} {f.kind}: {f.detail}; ready {f.recovery_s}" for f in chaos.faults],
        fault_kinds=fault_kinds(chaos.opts.backend),
        unavailable=chaos.unavailable,
        recovery_s=recovery,
        service_exits=dict(chaos.exits),
        stuck=chaos.stuck,
        submit_errors=dict(chaos.submit_codes),
        injected=injected,
        dead_letters=dead,
        notes=chaos.notes,
        out=str(chaos.root),
    )


async def progress(chaos: Chaos, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 10.0)
        assert chaos.history is not None
        ended = sum(1 for p in chaos.planned if chaos.history.terminal(p.job_id))
        took = sum(1 for p in chaos.planned if p.accepted)
        log(f"submitted {took}/{len(chaos.planned)}, ended {ended}, faults {len(chaos.faults)}")


async def run(opts: Options, root: Path) -> Report:
    chaos = Chaos(opts, root)
    chaos.mount()
    t0 = time.monotonic()
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    try:
        await chaos.start()
        chaos.plan()
        background = [
            asyncio.create_task(chaos.monitor(stop)),
            asyncio.create_task(progress(chaos, stop)),
        ]
        until = time.monotonic() + opts.minutes * 60
        log(f"{opts.jobs} jobs over {opts.minutes} min, faults from {chaos.kinds()}")
        await asyncio.gather(
            chaos.submit_all(until=until + 120),
            chaos.inject_all(until=until, must_cover=until + 90),
        )
        report = await finish(chaos, t0)
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        chaos.close_stack()
        chaos.unmount()
    return report


def options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="jobs to submit (500)")
    parser.add_argument("--minutes", type=float, default=None, help="length of the run (10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["process", "docker"], default="process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=24, help="unfinished jobs at most")
    parser.add_argument("--short", action="store_true", help="the CI run: 60 jobs, ~2 min")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--out", type=Path, default=None, help="where data and logs go")
    args = parser.parse_args(argv)
    return Options(
        jobs=args.jobs if args.jobs is not None else 60 if args.short else 500,
        minutes=args.minutes if args.minutes is not None else 2.0 if args.short else 10.0,
        seed=args.seed,
        backend=args.backend,
        workers=args.workers,
        in_flight=args.in_flight,
        out=args.out,
        short=args.short,
        as_json=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    root = opts.out or Path(tempfile.mkdtemp(prefix="cumulus-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(opts, root))
    if opts.as_json:
        print(json.dumps(report.as_json()))
    else:
        print(report.table())
    if report.ok() and opts.out is None and not report.service_exits and not report.stuck:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
