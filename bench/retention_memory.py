"""What the gateway and the scheduler hold per finished job, before and after `compact`, and
what their snapshots cost (issue 11: retention).

Each job goes the whole way through the real service's `step` (submitted, scheduled,
partition ready, started, completed with a small result, partition released), on `--workers`
workers of 8 devices; no bus, no log. tracemalloc counts what the state holds above a service
that saw the same workers and no job; then `compact` runs with `retention.forget_after_s: 0`
(every ended job is forgotten) and counts again. The snapshot's size and the time to take and
restore it are measured on a second service driven alike, with tracemalloc off.

    .venv/bin/python bench/retention_memory.py [--jobs 10000] [--workers 50]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.gateway.app import Gateway  # noqa: E402
from services.scheduler.app import Scheduler  # noqa: E402
from shared import events as ev  # noqa: E402
from shared.config import Config, RetentionConfig  # noqa: E402
from shared.service import EventService  # noqa: E402

DEVICES = 8
SPEC = ev.JobSpec(
    code_ref="c" * 64,
    entrypoint="function",
    requirements=["numpy==2.1.0"],
    gpu_tenths=5,
    duration_s=600,
    env={"SEED": "42", "MODE": "train"},
)
RESULT = msgspec.Raw(b'{"encoding": "json", "data": [1, 2, 3, 4, 5, 6, 7, 8]}')
MiB = 2**20

Service = EventService[Any]


def life(job_id: str, worker_id: str, attempt: int) -> list[ev.Event]:
    """What the worker's services publish for one job, after its placement."""
    placed: dict[str, Any] = {"job_id": job_id, "user": "alice", "worker_id": worker_id}
    return [
        ev.PartitionReady(
            spec=SPEC,
            attempt=attempt,
            partition_ids=[f"p-{job_id}"],
            devices=[0],
            env={"CUDA_VISIBLE_DEVICES": "0"},
            expires_at=0.0,
            **placed,
        ),
        ev.JobStarted(backend="process", handle="123", attempt=attempt, **placed),
        ev.JobCompleted(result=RESULT, runtime_s=1.5, attempt=attempt, **placed),
        ev.PartitionReleased(attempt=attempt, partition_ids=[f"p-{job_id}"], **placed),
    ]


def drive(service: Service, jobs: int, workers: int) -> None:
    """Register `workers`, then run `jobs` jobs to their end through `service.step`."""
    for w in range(workers):
        service.step(
            ev.WorkerRegistered(
                worker_id=f"w{w}",
                hostname=f"w{w}",
                devices=[
                    ev.DeviceInfo(index=i, name="GPU", memory_bytes=1 << 34) for i in range(DEVICES)
                ],
            )
        )
    for i in range(jobs):
        job_id = f"j{i:07d}-{'x' * 12}"
        decided = service.step(ev.JobSubmitted(job_id=job_id, user="alice", spec=SPEC))
        selected = [e for e in decided if isinstance(e, ev.WorkerSelected)]
        if selected:
            worker, attempt = selected[0].worker_id, selected[0].attempt
        else:  # the gateway decides nothing: play the scheduler's placement
            worker, attempt = f"w{i % workers}", 1
            service.step(
                ev.WorkerSelected(
                    job_id=job_id,
                    user="alice",
                    worker_id=worker,
                    spec=SPEC,
                    devices=[0],
                    tenths=5,
                    attempt=attempt,
                )
            )
        for event in life(job_id, worker, attempt):
            service.step(event)


@dataclass(frozen=True)
class Row:
    service: str
    held: float
    """Bytes the state holds for the finished jobs."""
    left: float
    """Bytes above the job-less service still held after compact."""
    compact_ms: float
    snapshot: int
    """Bytes of the snapshot of every finished job."""
    take_ms: float
    restore_ms: float
    compacted: int
    """Bytes of the snapshot taken after compact."""


def measure(name: str, make: Callable[[], Service], jobs: int, workers: int) -> Row:
    # Memory (tracemalloc slows everything, so no times here), above a service that saw the
    # same workers and no job.
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    empty = make()
    drive(empty, 0, workers)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    base += base - start  # the next service's own workers, as the empty one's
    service = make()
    drive(service, jobs, workers)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    service.compact(time.time() + 1)
    gc.collect()
    left = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    compacted = service.snapshot() or b""
    del empty, service
    # Times, on a second service driven alike.
    service = make()
    drive(service, jobs, workers)
    gc.collect()
    started = time.perf_counter()
    data = service.snapshot() or b""
    take_ms = (time.perf_counter() - started) * 1000
    fresh = make()
    started = time.perf_counter()
    fresh.restore(data)
    restore_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    service.compact(time.time() + 1)
    compact_ms = (time.perf_counter() - started) * 1000
    return Row(name, held, left, compact_ms, len(data), take_ms, restore_ms, len(compacted))


def table(rows: list[Row], jobs: int) -> str:
    per = 10_000 / jobs
    out = [
        f"{jobs} finished jobs; memory per 10,000 of them (tracemalloc), and what is left after "
        "compact (retention.forget_after_s 0)",
        "",
        "| service | held per 10,000 | left after compact | compact | snapshot | take | restore "
        "| snapshot after compact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.service} | {r.held * per / MiB:.1f} MiB ({r.held / jobs:.0f} B a job) "
            f"| {max(0.0, r.left) / MiB:.2f} MiB | {r.compact_ms:.0f} ms "
            f"| {r.snapshot / MiB:.1f} MiB | {r.take_ms:.0f} ms | {r.restore_ms:.0f} ms "
            f"| {r.compacted / 1024:.1f} KiB |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10_000, help="finished jobs (10000)")
    parser.add_argument("--workers", type=int, default=50, help="workers of 8 devices (50)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.workers < 1:
        parser.error("--jobs and --workers must be at least 1")
    config = Config(retention=RetentionConfig(forget_after_s=0))
    services: list[tuple[str, Callable[[], Service]]] = [
        ("gateway", lambda: Gateway(config)),
        ("scheduler", lambda: Scheduler(config)),
    ]
    rows = [measure(name, make, args.jobs, args.workers) for name, make in services]
    print(table(rows, args.jobs))


if __name__ == "__main__":
    main()
