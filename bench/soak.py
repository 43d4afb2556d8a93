"""A soak: many jobs with logs through one embedded stack; is disk and memory flat?

Submits `--jobs` jobs (each prints a few lines) through one stack (services/stack.py, process
backend, bwrap sandbox) from one code package, `--concurrency` submits at a time and at most
`--in-flight` jobs unfinished. Every `--every` seconds it samples the data dir's disk usage
(each service's SQLite files, nats-server's store, job directories) and every process's RSS
(nats-server, gateway, scheduler, partitioner, runner). At the end it prints the samples, the
growth over the last half of the run (after warm-up) per 1,000 jobs and whether each figure is
flat, and the restart time of each service (stop, start, ready again) on the data the run left.

Retention is set small enough for compaction to show within the run (snapshots every
`--snapshot-events` events, terminal jobs forgotten after `--forget-after` s, the job and log
streams capped at `--stream-max-bytes`); settings this tree's configuration does not know yet
are left out and named. Usage:

    .venv/bin/python bench/soak.py [--jobs 20000] [--concurrency 16] [--every 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client as NatsClient  # noqa: E402

from bench.chaos import descendants, known_settings, processes, quiet, rss_bytes  # noqa: E402
from cumulus import AsyncClient, CumulusError, RetryPolicy, package_function  # noqa: E402
from services.stack import Stack  # noqa: E402
from shared import api, auth, subjects  # noqa: E402
from shared import events as ev  # noqa: E402

MiB = 1024 * 1024
FLAT = 0.10
"""A figure is flat if, over the last half of the run, its fitted line grows by less than this
share of its level (or by less than 1 MiB)."""


def soak_job() -> int:
    import os

    index = int(os.environ.get("SOAK_INDEX", "0"))
    for line in range(int(os.environ.get("SOAK_LINES", "3"))):
        print(f"soak job {index} line {line}: the quick brown fox jumps over the lazy dog")
    return index


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def du(path: Path) -> int:
    """Bytes the files under `path` take on disk (blocks, as `du` counts)."""
    total = 0
    with contextlib.suppress(OSError):
        if path.is_file():
            return path.stat().st_blocks * 512
        for item in path.rglob("*"):
            with contextlib.suppress(OSError):
                if item.is_file() and not item.is_symlink():
                    total += item.stat().st_blocks * 512
    return total


def log_rows(db: Path) -> dict[str, int]:
    """Rows of the event log's tables (read only; {} while it cannot be read)."""
    out = {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return {}
    try:
        for table in ("log", "snapshot", "outbox", "dead"):
            with contextlib.suppress(sqlite3.Error):
                out[table] = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()
    return out


@dataclass
class Sample:
    t: float
    done: int
    disk: dict[str, int]
    """Bytes: `total`, `sqlite` (every service's files), `nats` (the bus's store), `jobs`."""
    streams: dict[str, int]
    """Bytes in each stream, as the server counts them."""
    rss: dict[str, int]
    """Bytes resident, by process."""
    rows: dict[str, dict[str, int]]
    """Rows of each service's event log tables (`log`, `snapshot`, `outbox`, `dead`)."""
    files: dict[str, int]
    """Bytes of each service's SQLite files (the database, its WAL and shared memory)."""


@dataclass
class Soak:
    stack: Stack
    nc: NatsClient
    samples: list[Sample] = field(default_factory=list)
    ended: dict[str, str] = field(default_factory=dict)
    """Job id -> how it ended (`completed`, or the failure's code)."""

    async def watch_ends(self) -> Any:
        """Count terminal events as the bus carries them (the operator sees every subject)."""

        async def on_end(msg: Any) -> None:
            job_id, name = msg.subject.split(".")[2], msg.subject.split(".")[4]
            code = ""
            if name != "completed":
                with contextlib.suppress(Exception):
                    code = msgspec.json.decode(msg.data).get("code", "")
            self.ended.setdefault(job_id, name if name == "completed" else f"{name} {code}")

        return [
            await self.nc.subscribe(s, cb=on_end) for s in subjects.job_events(*ev.TERMINAL_NAMES)
        ]

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in self.stack.procs.items():
            if proc.alive():
                out[name] = proc.pid
        procs = processes()
        for name, proc in self.stack.procs.items():
            if name.startswith("runner") and proc.alive():
                for info in descendants(procs, [proc.pid]):
                    if "services.runner.zygote" in info.cmdline:
                        out[f"zygote-{name.removeprefix('runner-')}"] = info.pid
                        break
        return out

    async def sample(self, t0: float) -> Sample:
        data = self.stack.data_dir
        sqlite = sum(du(p) for p in data.glob("*.sqlite*"))
        disk = {
            "total": await asyncio.to_thread(du, data),
            "sqlite": sqlite,
            "nats": await asyncio.to_thread(du, data / "nats"),
            "jobs": await asyncio.to_thread(du, data / next(iter(self._runner_dirs()), "none")),
        }
        streams = {}
        js = self.nc.jetstream()
        for name in (subjects.JOBS_STREAM, "LOGS", "RESULTS", f"OBJ_{subjects.CODE_BUCKET}"):
            with contextlib.suppress(Exception):
                streams[name] = int((await js.stream_info(name)).state.bytes)
        rss = {name: rss_bytes(pid) for name, pid in self.pids().items()}
        dbs = list(data.glob("*.sqlite"))
        rows = {db.stem: log_rows(db) for db in dbs}
        files = {db.stem: sum(du(f) for f in data.glob(f"{db.name}*")) for db in dbs}
        sample = Sample(
            round(time.monotonic() - t0, 1), len(self.ended), disk, streams, rss, rows, files
        )
        self.samples.append(sample)
        return sample

    def _runner_dirs(self) -> list[str]:
        return [p.name for p in self.stack.data_dir.glob("runner-*") if p.is_dir()]


async def submit_all(
    client: AsyncClient, soak: Soak, code_ref: str, jobs: int, concurrency: int, in_flight: int
) -> dict[str, int]:
    """Submit `jobs` jobs; the submit errors seen, by code (each retried with the same id)."""
    errors: collections.Counter[str] = collections.Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(jobs):
        queue.put_nowait(i)
    accepted = 0
    tag = f"{int(time.time()) % 100000}"

    async def one(i: int) -> None:
        nonlocal accepted
        body = {
            "code_ref": code_ref,
            "gpu": 0.1,
            "duration": 300,
            "job_id": f"jsoak{tag}x{i}",
            "env": {"SOAK_INDEX": str(i), "SOAK_LINES": "3"},
        }
        for attempt in range(200):
            try:
                await client.request("submit", body)
                accepted += 1
                return
            except CumulusError as exc:
                errors[exc.code] += 1
                if exc.code not in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    return
            await asyncio.sleep(min(5.0, 0.2 * (attempt + 1)))

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            while accepted - len(soak.ended) >= in_flight:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return dict(errors)


async def ready(nc: NatsClient, workers: list[str], within: float = 120.0) -> float | None:
    """Seconds until the gateway answers and the scheduler sees every worker ready."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        with contextlib.suppress(Exception):
            await api.request(nc, "health", {}, dict, timeout=1.0)
            reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=1.0)
            if set(workers) <= {w["worker_id"] for w in reply["workers"] if w["status"] == "ready"}:
                return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None


def log_lines(log_path: Path, msg: str) -> list[dict[str, Any]]:
    """The service's JSON log records with this `msg`, oldest first."""
    out = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if f'"msg": "{msg}"' in line:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


async def started(log_path: Path, before: int, within: float = 120.0) -> bool:
    """Until the service logs `service started` once more than `before` times."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len(log_lines(log_path, "service started")) > before:
            return True
        await asyncio.sleep(0.05)
    return False


async def restarts(stack: Stack, nc: NatsClient) -> list[dict[str, Any]]:
    """Stop, start and wait until ready (the service says it started, the gateway answers
    and the scheduler sees every worker), one process at a time."""
    out = []
    for name in list(stack.procs):
        proc = stack.procs[name]
        before = len(log_lines(proc.log_path, "service started"))
        t0 = time.monotonic()
        await asyncio.to_thread(proc.stop)
        stopped = time.monotonic() - t0
        t1 = time.monotonic()
        proc.start()
        ok = name == "nats" or await started(proc.log_path, before)
        took = await ready(nc, stack.workers) if ok else None
        replay = log_lines(proc.log_path, "replayed event log")[-1:] if name != "nats" else []
        out.append(
            {
                "process": name,
                "stop_s": round(stopped, 2),
                "ready_s": None if took is None else round(time.monotonic() - t1, 2),
                "replayed": {k: replay[0][k] for k in ("snapshot", "events") if k in replay[0]}
                if replay
                else {},
            }
        )
        log(f"restart {name}: stop {stopped:.2f} s, ready {out[-1]['ready_s']} s")
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var


def flatness(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Per figure: growth per 1,000 jobs over the first and the last half, and whether the
    last half is flat."""
    figures: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for s in samples:
        for group, values in (
            ("disk", s.disk),
            ("sqlite", s.files),
            ("stream", s.streams),
            ("rss", s.rss),
        ):
            for name, value in values.items():
                figures[f"{group} {name}"].append((float(s.done), float(value)))
    out = {}
    for name, points in figures.items():
        half = len(points) // 2
        first, last = points[: half + 1], points[half:]
        per_k = slope(last) * 1000
        span = last[-1][0] - last[0][0] if last else 0
        level = max(1.0, sum(y for _, y in last) / max(1, len(last)))
        growth = per_k * span / 1000
        out[name] = {
            "first_half_per_1k_jobs": round(slope(first) * 1000),
            "last_half_per_1k_jobs": round(per_k),
            "end": int(points[-1][1]),
            "flat": growth < max(FLAT * level, MiB),
        }
    return out


def table(samples: list[Sample]) -> str:
    names = sorted({n for s in samples for n in s.rss})
    head = ["t s", "jobs", "disk", "sqlite", "nats", "JOBS", "LOGS"] + [f"rss {n}" for n in names]
    rows = [head]
    for s in samples:
        rows.append(
            [f"{s.t:.0f}", str(s.done)]
            + [f"{s.disk.get(k, 0) / MiB:.1f}" for k in ("total", "sqlite", "nats")]
            + [f"{s.streams.get(k, 0) / MiB:.1f}" for k in ("JOBS", "LOGS")]
            + [f"{s.rss.get(n, 0) / MiB:.0f}" for n in names]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(text) + "\n(sizes in MiB)"


@dataclass
class Options:
    jobs: int
    concurrency: int
    in_flight: int
    every: float
    workers: int
    snapshot_events: int
    forget_after: float
    stream_max_bytes: str
    as_json: bool
    out: Path | None


def retention(opts: Options) -> tuple[dict[str, str], list[str]]:
    """The environment for the retention settings this tree knows, and the ones it does not."""
    wanted = {
        "retention.snapshot_events": str(opts.snapshot_events),
        "retention.forget_after_s": str(opts.forget_after),
        "retention.jobs_max_bytes": opts.stream_max_bytes,
        "retention.logs_max_bytes": opts.stream_max_bytes,
    }
    env = known_settings(wanted)
    unknown = [k for k in wanted if f"CUMULUS_{k.replace('.', '_').upper()}" not in env]
    return env, unknown


async def soak(opts: Options, root: Path) -> dict[str, Any]:
    env, unknown = retention(opts)
    if unknown:
        log(f"not known to this tree's configuration (left out): {', '.join(unknown)}")
    workers = [f"sw{i + 1}" for i in range(opts.workers)]
    stack = Stack(data_dir=root / "stack", workers=workers, devices="2x16GiB", env=env)
    await stack.start(timeout=120)
    try:
        creds = auth.load_credentials(stack.credentials("admin", "admin"))
        nc = await nats.connect(
            stack.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,
            error_cb=quiet,
            **auth.connect_options(creds),
        )
        s = Soak(stack, nc)
        subs = await s.watch_ends()
        async with AsyncClient(
            profile=stack.profile(), retry=RetryPolicy(max_attempts=1), packaging="pickle"
        ) as client:
            code_ref = await client.upload(package_function(soak_job))
            t0 = time.monotonic()
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_every(s, t0, opts.every, stop))
            errors = await submit_all(
                client, s, code_ref, opts.jobs, opts.concurrency, opts.in_flight
            )
            deadline = time.monotonic() + 600
            while len(s.ended) < opts.jobs and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            wall = time.monotonic() - t0
            await asyncio.sleep(min(30.0, opts.every * 2))  # a quiet stretch: compaction shows
            stop.set()
            await sampler
            await s.sample(t0)
        for sub in subs:
            await sub.unsubscribe()
        outcomes = collections.Counter(s.ended.values())
        restart = await restarts(stack, nc)
        await nc.close()
    finally:
        stack.stop()
    return {
        "jobs": opts.jobs,
        "wall_s": round(wall, 1),
        "jobs_per_s": round(len(s.ended) / wall, 1) if wall else 0.0,
        "outcomes": dict(outcomes),
        "submit_errors": errors,
        "retention": env,
        "retention_unknown": unknown,
        "samples": [msgspec.to_builtins(x) for x in s.samples],
        "table": table(s.samples),
        "flat": flatness(s.samples),
        "restarts": restart,
        "data": str(root),
    }


async def sample_every(s: Soak, t0: float, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        sample = await s.sample(t0)
        log(
            f"{sample.done} jobs done; disk {sample.disk['total'] / MiB:.1f} MiB; rss "
            + ", ".join(f"{k} {v / MiB:.0f}" for k, v in sorted(sample.rss.items()))
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def report(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['jobs']} jobs in {result['wall_s']} s ({result['jobs_per_s']} jobs/s), "
        f"outcomes {result['outcomes']}, submit errors {result['submit_errors']}",
        f"retention: {result['retention']}"
        + (
            f" (unknown here: {result['retention_unknown']})" if result["retention_unknown"] else ""
        ),
        result["table"],
        "growth per 1,000 jobs (first half -> last half), flat after warm-up?",
    ]
    for name, f in sorted(result["flat"].items()):
        lines.append(
            f"  {name:<22} {f['first_half_per_1k_jobs'] / 1024:>9.0f} KiB -> "
            f"{f['last_half_per_1k_jobs'] / 1024:>7.0f} KiB  end {f['end'] / MiB:7.1f} MiB  "
            + ("flat" if f["flat"] else "GROWING")
        )
    lines.append("restart after the run (stop, then start until ready):")
    for r in result["restarts"]:
        lines.append(
            f"  {r['process']:<22} stop {r['stop_s']:>5} s  ready {r['ready_s']} s  "
            + ", ".join(f"{k} {v}" for k, v in r["replayed"].items())
        )
    return "\n".join(lines)


def options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16, help="submits at a time")
    parser.add_argument("--in-flight", type=int, default=200, help="unfinished jobs at most")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--snapshot-events", type=int, default=1000)
    parser.add_argument("--forget-after", type=float, default=30.0)
    parser.add_argument("--stream-max-bytes", default="16MiB")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep the data here")
    a = parser.parse_args(argv)
    return Options(
        jobs=a.jobs,
        concurrency=a.concurrency,
        in_flight=a.in_flight,
        every=a.every,
        workers=a.workers,
        snapshot_events=a.snapshot_events,
        forget_after=a.forget_after,
        stream_max_bytes=a.stream_max_bytes,
        as_json=a.json,
        out=a.out,
    )


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    with tempfile.TemporaryDirectory(prefix="cumulus-soak-") as tmp:
        root = opts.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(soak(opts, root))
    if opts.as_json:
        print(json.dumps(result))
    else:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
