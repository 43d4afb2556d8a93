"""Where the CPU of a job goes: a burst of trivial jobs through the embedded stack, measured.

Starts the embedded stack (process backend, 2 workers x 4 virtual devices, as
bench/utilisation.py does), warms it up, then runs a burst of `--jobs` trivial jobs (a function
that returns at once, gpu=0.1), at most `--window` in flight (each result is awaited through
the public SDK). Prints, for the burst only:

- jobs/s end to end (first submit to last result);
- CPU seconds of every process (user + system from /proc/<pid>/stat, before and after):
  each service, nats-server, this client, and the job processes (the reaped children of the
  runners and their zygotes, `cutime + cstime`); and ms of CPU per job, summed;
- messages per job from nats-server's monitoring endpoint: `/varz` in_msgs/out_msgs (published
  into / delivered by the server), JetStream API calls (`/jsz`), messages stored per stream,
  and per connection (`/connz`, by client name);
- SQLite transactions per job per service (`cumulus_eventlog_transactions_total`, counted by
  shared/eventlog.py, read from each service's metrics endpoint) and events applied per job
  (`cumulus_events_applied_total`).

`--py-spy DIR` records each service process with py-spy during the burst (`pip install
py-spy`; sampling, non-blocking) into DIR/<process>.txt (collapsed stacks) and prints the top
frames per process, by own samples and by samples beneath them.

    .venv/bin/python bench/profile.py [--jobs 1000] [--window 200] [--py-spy /tmp/prof]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus import AsyncClient, AsyncJob  # noqa: E402
from services.stack import Stack, free_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def trivial() -> int:
    return 1


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children's) user + system CPU seconds of a live process."""
    try:
        f = _stat(pid)
    except OSError:
        return 0.0, 0.0
    return (int(f[11]) + int(f[12])) / TICK, (int(f[13]) + int(f[14])) / TICK


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class Accounting:
    """A cgroup v1 `cpuacct` group this process (and so every process it starts: the stack,
    the jobs, their sandboxes) runs in, where the machine lets us make one: the CPU of all of
    them, exactly, whatever else the machine runs. Else None."""

    def __init__(self) -> None:
        self.path: Path | None = CPUACCT / f"cumulus-profile-{os.getpid()}"
        try:
            self.path.mkdir()
            (self.path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            self.path = None

    def seconds(self) -> float | None:
        if self.path is None:
            return None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def leave(self, pid: int) -> None:
        """Account `pid` (a helper, not part of the run) outside the group."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                (CPUACCT / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
                self.path.rmdir()


ACCOUNTING: Accounting | None = None


def machine_cpu_seconds() -> float:
    """CPU seconds every process of the machine used so far (busy time of all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def children(pid: int) -> list[int]:
    """Live descendants of `pid` (the zygote of a runner, a job still running)."""
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                kids[int(_stat(int(entry.name))[1])].append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        data: dict[str, Any] = json.loads(reply.read())
    return data


def metrics(port: int) -> dict[str, float]:
    """Prometheus samples of one process (`name{labels}` -> value), counters only."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("cumulus_") and " " in line:
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
    return out


class Sample:
    """Everything measured at one moment."""

    def __init__(self, stack: Stack, metric_ports: dict[str, int]) -> None:
        self.cpu: dict[str, float] = {}
        zygotes = launchers = 0.0
        for name, proc in stack.procs.items():
            own, reaped = cpu_seconds(proc.pid)
            self.cpu[name] = own
            if name.startswith("runner"):
                launchers += reaped
                for child in children(proc.pid):
                    c_own, c_reaped = cpu_seconds(child)
                    if b"services.runner.zygote" in _cmdline(child):
                        zygotes += c_own
                        launchers += c_reaped
                    else:
                        launchers += c_own + c_reaped
        self.cpu["zygotes"] = zygotes
        self.cpu["launchers (counted)"] = launchers
        self.cpu["client"] = time.process_time()
        self.machine = machine_cpu_seconds()
        self.group = ACCOUNTING.seconds() if ACCOUNTING is not None else None
        monitor = f"http://127.0.0.1:{stack.monitor_port}"
        self.varz = get_json(f"{monitor}/varz")
        self.jsz = get_json(f"{monitor}/jsz?streams=true")
        self.connz = get_json(f"{monitor}/connz?limit=1024")
        self.metrics = {name: metrics(port) for name, port in metric_ports.items()}

    def streams(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for account in self.jsz.get("account_details", []) or []:
            for stream in account.get("stream_detail", []) or []:
                out[stream["name"]] = stream["state"]["messages"]
        return out

    def connections(self) -> dict[str, tuple[float, float]]:
        """client name -> (messages it published, messages delivered to it)."""
        out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for conn in self.connz.get("connections", []) or []:
            name = conn.get("name") or f"cid {conn.get('cid')}"
            out[name][0] += conn.get("in_msgs", 0)
            out[name][1] += conn.get("out_msgs", 0)
        return {k: (v[0], v[1]) for k, v in out.items()}

    def counter(self, proc: str, prefix: str) -> float:
        return sum(v for k, v in self.metrics.get(proc, {}).items() if k.startswith(prefix))


class Spy:
    """py-spy recording every service process until `stop`."""

    def __init__(self, out: Path, stack: Stack) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        if exe is None:
            raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
        out.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, Path] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        for name, proc in stack.procs.items():
            if name == "nats":
                continue
            path = out / f"{name}.txt"
            self.files[name] = path
            # Native frames show what the event loop (uvloop, C) and SQLite do; samples whose
            # innermost frame is a wait (epoll, a futex, a queue) are idle and left out below.
            argv = [exe, "record", "--pid", str(proc.pid), "--rate", "200", "--native"]
            argv += ["--format", "raw", "--output", str(path), "--duration", "3600"]
            with open(out / f"{name}.log", "wb") as err:  # the child keeps its copy
                spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
            self.procs.append(spy)
            if ACCOUNTING is not None:  # the profiler's own CPU is not the run's
                ACCOUNTING.leave(spy.pid)

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @staticmethod
    def report_files(folder: Path, top: int) -> None:
        for path in sorted(folder.glob("*.txt")):
            name = path.stem
            own: collections.Counter[str] = collections.Counter()
            under: collections.Counter[str] = collections.Counter()
            total = 0
            idle = 0
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                frames = stack.split(";")
                if _idle(frames):
                    idle += n
                    continue
                total += n
                own[_short(frames[-1])] += n
                for frame in {_short(f) for f in frames}:
                    under[frame] += n
            print(f"  {name}: {total} busy samples, {idle} idle left out ({path})")
            print("    own:")
            for frame, n in own.most_common(top):
                print(f"      {100 * n / max(total, 1):5.1f}%  {frame}")
            print("    beneath (inclusive):")
            for frame, n in under.most_common(2 * top):
                print(f"      {100 * n / max(total, 1):5.1f}%  {frame}")


WAITS = (
    "epoll_wait",
    "epoll_pwait",
    "uv__io_poll",
    "futex",
    "pthread_cond",
    "sem_wait",
    "sem_clockwait",
    "sem_timedwait",
    "PyThread_acquire_lock_timed",
    "time_sleep",
    "select",
    "poll",
    "accept",
    "nanosleep",
)
"""Frames a thread waits in (uvloop's poll, a lock or queue, a sleep, a select)."""


def _idle(frames: list[str]) -> bool:
    """A sample taken while the thread waited: its innermost frame, past unnamed libc ones,
    is a wait."""
    for frame in reversed(frames):
        if frame.startswith("0x") and "(libc" in frame:
            continue
        return any(word in frame.split(" (")[0] for word in WAITS)
    return False


def _short(frame: str) -> str:
    """`fn (path/to/file.py:12)` -> `fn (file.py)`: lines apart merged."""
    fn, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = file.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{fn} ({tail})" if where else fn


async def burst(
    client: AsyncClient, jobs: int, window: int, gpu: float
) -> tuple[float, list[AsyncJob]]:
    """Run `jobs` trivial jobs, at most `window` in flight; seconds from first submit to last
    result, and the jobs."""
    gate = asyncio.Semaphore(window)
    done: list[AsyncJob] = []

    async def one() -> None:
        async with gate:
            job = await client.submit(trivial, gpu=gpu, duration=600)
            if await job.result(timeout=600) != 1:
                raise AssertionError("a trivial job returned something else")
            done.append(job)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(jobs)))
    return time.perf_counter() - started, done


async def stages(jobs: list[AsyncJob]) -> dict[str, list[float]]:
    """Seconds between a job's events (their timestamps, set by whoever decided each), by
    step: where a job's time goes between submission and its end."""
    out: dict[str, list[float]] = collections.defaultdict(list)
    for job in jobs:
        seen: dict[str, float] = {}
        async for event in job.events(follow=False):
            seen.setdefault(event.name, event.ts)
        previous = ""
        for name in STEPS:
            if name in seen:
                if previous:
                    out[f"{previous} -> {name}"].append(seen[name] - seen[previous])
                previous = name
        if "submitted" in seen and "partition_released" in seen:
            out["submitted -> partition_released"].append(
                seen["partition_released"] - seen["submitted"]
            )
    return out


STEPS = ("submitted", "scheduled", "partition_ready", "started", "completed")


def report(before: Sample, after: Sample, jobs: int, seconds: float, stack: Stack) -> None:
    per = 1000.0 / jobs
    print(f"{jobs} trivial jobs (gpu=0.1, process backend, 2 workers x 4 virtual devices)")
    print(f"  end to end: {seconds:.2f} s, {jobs / seconds:.1f} jobs/s")
    print("  CPU by process (ms per job):")
    total = services = 0.0
    for name in after.cpu:
        ms = (after.cpu[name] - before.cpu.get(name, 0.0)) * per
        total += ms
        if name not in ("nats", "client", "zygotes", "launchers (counted)"):
            services += ms
        print(f"    {name:24s} {ms:7.2f}")
    print(f"    {'services (the six above)':24s} {services:7.2f}")
    print(f"    {'all named processes':24s} {total:7.2f}")
    if after.group is not None and before.group is not None:
        group = (after.group - before.group) * per
        print(f"    {'jobs: the rest (sandboxes)':24s} {group - total:7.2f}")
        print(f"    {'every process of the run':24s} {group:7.2f}  (cpuacct group)")
    busy = (after.machine - before.machine) / seconds
    print(f"  machine busy: {busy:.2f} cores of {os.cpu_count()} (whatever runs on it)")
    for key, what in (("in_msgs", "published into"), ("out_msgs", "delivered by")):
        delta = float(after.varz[key]) - float(before.varz[key])
        print(f"  messages {what} nats-server per job: {delta / jobs:.1f}")
    api_before = before.jsz.get("api", {}) or {}
    api_after = after.jsz.get("api", {}) or {}
    calls = float(api_after.get("total", 0)) - float(api_before.get("total", 0))
    print(f"  JetStream API calls per job: {calls / jobs:.2f}")
    s0, s1 = before.streams(), after.streams()
    stored = {k: (v - s0.get(k, 0.0)) / jobs for k, v in s1.items() if v != s0.get(k, 0.0)}
    print("  messages stored per job: " + ", ".join(f"{k} {v:.2f}" for k, v in stored.items()))
    c0, c1 = before.connections(), after.connections()
    print("  by connection (published / delivered per job):")
    for name, (pub, sub) in sorted(c1.items()):
        p0, d0 = c0.get(name, (0.0, 0.0))
        if pub - p0 or sub - d0:
            print(f"    {name:28s} {(pub - p0) / jobs:6.2f} / {(sub - d0) / jobs:6.2f}")
    print("  per service, per job: SQLite transactions / events applied")
    for name in after.metrics:
        tx = after.counter(name, "cumulus_eventlog_transactions_total") - before.counter(
            name, "cumulus_eventlog_transactions_total"
        )
        applied = after.counter(name, "cumulus_events_applied_total") - before.counter(
            name, "cumulus_events_applied_total"
        )
        print(f"    {name:24s} {tx / jobs:6.2f} / {applied / jobs:6.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--window", type=int, default=200, help="jobs in flight at most")
    parser.add_argument("--gpu", type=float, default=0.1)
    parser.add_argument("--py-spy", dest="py_spy", type=Path, help="profile into this folder")
    parser.add_argument("--top", type=int, default=15, help="frames shown per process")
    parser.add_argument(
        "--sandbox", default="bwrap", help="worker.sandbox: bwrap (the default) or none"
    )
    parser.add_argument("--sample", type=int, default=50, help="jobs whose steps are timed")
    parser.add_argument("--report", type=Path, help="only print the profiles in this folder")
    args = parser.parse_args()
    if args.report:
        Spy.report_files(args.report, args.top)
        return
    global ACCOUNTING
    ACCOUNTING = Accounting()
    try:
        await run(args)
    finally:
        ACCOUNTING.close()


async def run(args: argparse.Namespace) -> None:
    metrics_base = free_port()
    with tempfile.TemporaryDirectory(prefix="cumulus-profile-") as tmp:
        stack = Stack(
            data_dir=Path(tmp),
            workers=["worker-1", "worker-2"],
            devices="4x16GiB",
            backend="process",
            env={
                "CUMULUS_METRICS_PORT": str(metrics_base),
                "CUMULUS_WORKER_SANDBOX": args.sandbox,
            },
        )
        spy: Spy | None = None
        try:
            await stack.start()
            ports = dict(stack._metrics_ports)  # each service's metrics endpoint
            async with AsyncClient(profile=stack.profile()) as client:
                await client.run(trivial, gpu=args.gpu, duration=600, logs=None)  # warm up
                await burst(client, min(50, args.jobs), args.window, args.gpu)
                if args.py_spy:
                    spy = Spy(args.py_spy, stack)
                    await asyncio.sleep(1.0)  # py-spy attaches
                before = Sample(stack, ports)
                seconds, done = await burst(client, args.jobs, args.window, args.gpu)
                await asyncio.sleep(0.5)  # the last releases and acks
                after = Sample(stack, ports)
                if spy is not None:
                    spy.stop()
                    spy = None
                timed = done[:: max(1, len(done) // args.sample)]
                steps = await stages(timed)
        finally:
            if spy is not None:
                spy.stop()
            stack.stop()
    report(before, after, args.jobs, seconds, stack)
    print(f"  a job's steps, p50 / p90 ms over {len(timed)} jobs:")
    for step, values in steps.items():
        values.sort()
        p50, p90 = values[len(values) // 2], values[int(len(values) * 0.9)]
        print(f"    {step:34s} {p50 * 1000:8.1f} / {p90 * 1000:8.1f}")
    if args.py_spy:
        print("py-spy, by process:")
        Spy.report_files(args.py_spy, args.top)


if __name__ == "__main__":
    asyncio.run(main())
