"""Container latency: Cumulus on Swarm and on the Docker engine against the raw floor.

Floors, measured in the same run with the same job image: a raw `docker service create` (from
the image ID, pinned, restart none) → task running → first output line read from the service
logs, and a raw `containers.run` → running → output read. Cumulus: submit → container running
(the JobStarted event) and submit → result for a trivial job, and log-line latency (print in the
job → line received by a subscriber) p50/p99.

    .venv/bin/python bench/container_latency.py [--jobs 10] [--lines 200]

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
from docker.types import ContainerSpec, Placement, RestartPolicy, TaskTemplate

from cumulus import AsyncClient
from services.stack import Stack
from shared import events as ev

IMAGE = "cumulus-job:latest"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def floor_engine(client: docker.DockerClient, image: str, n: int) -> dict[str, list[float]]:
    running, read = [], []
    for _ in range(n):
        t0 = time.monotonic()
        c = client.containers.run(
            image, ["-c", "print(2+2)"], entrypoint="python3", detach=True, network_mode="none"
        )
        t_run = 0.0
        while True:
            if not t_run:
                c.reload()
                if c.status in ("running", "exited"):
                    t_run = time.monotonic() - t0
            if b"4" in c.logs():
                read.append(time.monotonic() - t0)
                break
            time.sleep(0.01)
        running.append(t_run or read[-1])
        c.remove(force=True)
    return {"running": running, "read": read}


def floor_swarm(client: docker.DockerClient, image: str, n: int) -> dict[str, list[float]]:
    node = client.info()["Swarm"]["NodeID"]
    running, read = [], []
    for i in range(n):
        t0 = time.monotonic()
        spec = ContainerSpec(image, command=["python3", "-c", "print(2+2)"])
        template = TaskTemplate(
            spec,
            restart_policy=RestartPolicy(condition="none"),
            placement=Placement(constraints=[f"node.id=={node}"]),
        )
        sid = client.api.create_service(template, name=f"cumulus-bench-floor-{i}")["ID"]
        t_run = 0.0
        try:
            while time.monotonic() - t0 < 30:
                if not t_run:
                    for task in client.api.tasks(filters={"service": sid}):
                        if task["Status"]["State"] in ("running", "complete"):
                            t_run = time.monotonic() - t0
                logs = b"".join(client.api.service_logs(sid, stdout=True, stderr=True))
                if b"4" in logs:
                    read.append(time.monotonic() - t0)
                    break
                time.sleep(0.02)
        finally:
            client.api.remove_service(sid)
        running.append(t_run or read[-1])
    return {"running": running, "read": read}


def trivial() -> int:
    return 2 + 2


def ticker(n: int, pause: float) -> int:
    import time as t

    for i in range(n):
        print(f"{t.time():.6f} {i}", flush=True)
        t.sleep(pause)
    return n


async def cumulus(kind: str, jobs: int, lines: int) -> dict[str, list[float]]:
    data = Path(tempfile.mkdtemp(prefix=f"cumulus-bench-{kind}-"))
    stack = Stack(data_dir=data, workers=[f"{kind}-bench"], backend=kind)
    await stack.start()
    out: dict[str, list[float]] = {"started": [], "result": [], "log": []}
    try:
        async with AsyncClient(profile=stack.profile()) as client:
            await client.run(trivial, gpu=0.1, duration=600, logs=None, timeout=60)  # warm-up
            for _ in range(jobs):
                t0 = time.time()
                job = await client.submit(trivial, gpu=0.1, duration=600)
                async for event in job.events():
                    if isinstance(event, ev.JobStarted):
                        out["started"].append(time.time() - t0)
                    if isinstance(event, ev.Terminal):
                        break
                assert await job.result(timeout=60) == 4
                out["result"].append(time.time() - t0)
            job = await client.submit(ticker, lines, 0.01, gpu=0.1, duration=600)
            async for event in job.events():
                if isinstance(event, ev.JobLog):
                    now = time.time()
                    for line in event.lines:
                        out["log"].append(now - float(line.text.split()[0]))
    finally:
        stack.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--lines", type=int, default=200)
    args = parser.parse_args()
    client = docker.from_env()
    image = str(client.images.get(IMAGE).id)
    floors = {
        "docker": floor_engine(client, image, args.jobs),
        "swarm": floor_swarm(client, image, args.jobs),
    }
    print(f"| figure (p50 of {args.jobs}, log lines: {args.lines}) | engine | Swarm |")
    print("|---|---|---|")
    runs = {kind: asyncio.run(cumulus(kind, args.jobs, args.lines)) for kind in ("docker", "swarm")}

    def p50(values: list[float]) -> str:
        return ms(statistics.median(values))

    def ratio(k: str) -> str:
        return f"{statistics.median(runs[k]['result']) / statistics.median(floors[k]['read']):.2f}x"

    rows: list[tuple[str, Any]] = [
        ("floor: raw create → running", lambda k: p50(floors[k]["running"])),
        ("floor: raw create → output read", lambda k: p50(floors[k]["read"])),
        ("Cumulus: submit → container running", lambda k: p50(runs[k]["started"])),
        ("Cumulus: submit → result", lambda k: p50(runs[k]["result"])),
        ("ratio submit → result / floor output read", ratio),
        ("Cumulus: submit → result p99", lambda k: ms(pct(runs[k]["result"], 0.99))),
        ("log line print → subscriber p50", lambda k: ms(pct(runs[k]["log"], 0.5))),
        ("log line print → subscriber p99", lambda k: ms(pct(runs[k]["log"], 0.99))),
    ]
    for label, cell in rows:
        print(f"| {label} | {cell('docker')} | {cell('swarm')} |")


if __name__ == "__main__":
    main()
