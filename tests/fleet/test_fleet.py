"""The whole fleet at once (issue 12's "done when"), on one VM.

- a NATS cluster of three (nkey identities, mutual TLS for clients and routes, every stream and
  bucket with three replicas), listening on the test bridge;
- three hosts as nested Docker engines in one Swarm (host 1 the manager) with a local registry:
  the job image reaches the nodes by digest;
- on this VM, the central services: two gateways and two schedulers (one leads, one stands by),
  each connected first to a different server;
- inside hosts 2 and 3, one worker agent each (`cumulus worker`: partitioner + runner), its
  identity and mTLS, its own engine, the Swarm services of its jobs made through host 1's
  manager and pinned to its own node.

The identities and server configs are made with the commands docs/deploy.md gives
(`cumulus certs`, `cumulus users add --auth-dir`, `cumulus nats-config`). While jobs flow,
the server leading the JOBS stream is killed, then the leading scheduler, then host 3's engine
(and the agent on it). Every job ends exactly once: completed, or failed UNAVAILABLE naming
worker-3 where it had started there; a completed job started once. Once host 3 is back and its
agent restarted, no partition, container or service is left on any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient, AsyncJob, RetryPolicy
from cumulus.cli import main as cli_main
from services.stack import Proc
from shared import api, auth, bus, subjects
from shared import events as ev
from shared.errors import MalformedEvent
from tests.fleet import hosts as fleet_hosts
from tests.fleet.conftest import need
from tests.fleet.hosts import REPO, Hosts
from tests.fleet.nats_cluster import NatsCluster

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]

PREFIX = "cuf-fleet"
JOB_IMAGE = "cumulus-job:latest"
WORKERS = {2: "worker-2", 3: "worker-3"}
"""Host index -> the worker agent on it."""
LOST = 3
TERMINAL = ("completed", "failed", "timed_out", "cancelled")
SMALL = "64MiB"
"""Each stream's max_bytes: three servers reserve every stream's limit on this one disk."""


def nap(i: int) -> int:
    import time as t

    t.sleep(4)
    return i * 10


def _cli(*argv: str) -> None:
    """One `cumulus` command as docs/deploy.md gives it, in this process."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli_main(list(argv))
    assert code == 0, f"cumulus {' '.join(argv)} exited {code}"


def _urls(cluster: NatsCluster, first: int) -> str:
    """Every server's URL, server `first` (1-based) first: processes spread over them."""
    urls = cluster.urls.split(",")
    k = (first - 1) % len(urls)
    return ",".join(urls[k:] + urls[:k])


@dataclass
class Fleet:
    root: Path
    hosts: Hosts
    cluster: NatsCluster
    image: str
    central: dict[str, Proc] = field(default_factory=dict)
    agents: dict[int, int] = field(default_factory=dict)
    """Host index -> the pid of its agent inside the host."""

    @property
    def auth_dir(self) -> Path:
        return self.root / "auth"

    def creds(self, role: str, name: str) -> str:
        return str(self.auth_dir / "creds" / f"{role}-{name}.json")

    def central_env(self, name: str, role: str, first: int) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CUMULUS_DATA_DIR": str(self.root / name),
            "CUMULUS_INSTANCE": name,
            "CUMULUS_NATS_URL": _urls(self.cluster, first),
            "CUMULUS_NATS_REPLICAS": "3",
            "CUMULUS_NATS_CREDENTIALS": self.creds(role, role),
            "CUMULUS_SCHEDULER_LEASE_TTL_S": "3",
            "CUMULUS_RETENTION_JOBS_MAX_BYTES": SMALL,
            "CUMULUS_RETENTION_LOGS_MAX_BYTES": SMALL,
            "CUMULUS_RETENTION_RESULTS_MAX_BYTES": SMALL,
            "CUMULUS_LOGGING_FORMAT": "text",
        }

    def start_central(self, name: str, module: str, first: int) -> Proc:
        role = "gateway" if module == "gateway" else "scheduler"
        proc = Proc(
            name,
            [sys.executable, "-m", f"services.{module}"],
            self.central_env(name, role, first),
            self.root / "logs" / f"{name}.log",
        )
        proc.start()
        self.central[name] = proc
        return proc

    def agent_dir(self, index: int) -> Path:
        return self.hosts.host_dir(index) / "agent"

    def start_agent(self, index: int) -> int:
        """`cumulus worker` inside host `index`: its data and credentials in the host's
        directory (the job directories it bind-mounts must be on the node)."""
        worker = WORKERS[index]
        data = self.agent_dir(index)
        data.mkdir(parents=True, exist_ok=True)
        env = {
            "PYTHONUNBUFFERED": "1",
            "HOME": str(data),
            "CUMULUS_DATA_DIR": str(data),
            "CUMULUS_NATS_URL": _urls(self.cluster, index),
            "CUMULUS_NATS_CREDENTIALS": str(data / "bundle" / f"{worker}.json"),
            "CUMULUS_WORKER_ID": worker,
            "CUMULUS_WORKER_BACKEND": "swarm",
            "CUMULUS_WORKER_DEVICES": "2x16GiB",
            "CUMULUS_WORKER_DEVICE_SOURCE": "virtual",
            # 3 misses of 3 s: a NATS stream election (4-7 s here) is not a lost worker.
            "CUMULUS_WORKER_HEARTBEAT_S": "3",
            "CUMULUS_CONTAINER_IMAGE": self.image,
            "CUMULUS_CONTAINER_SWARM_NODE": self.hosts.node_id(index),
            "CUMULUS_CONTAINER_SWARM_MANAGER": self.hosts.docker_url(1),
            "CUMULUS_LOGGING_FORMAT": "text",
        }
        argv = [str(REPO / ".venv" / "bin" / "cumulus"), "worker"]
        pid = self.hosts.spawn(index, argv, env, log=data / f"agent-{len(self.agents)}.log")
        self.agents[index] = pid
        return pid

    def check_alive(self) -> None:
        for name, proc in self.central.items():
            assert proc.alive() or name == "scheduler-a", f"{name} died: see {proc.log_path}"

    def stop(self) -> None:
        """Stop the agents and the central services; the agents' logs kept beside the others'."""
        for index, pid in self.agents.items():
            with contextlib.suppress(Exception):
                if self.hosts.engine_running(index) and self.hosts.alive(index, pid):
                    self.hosts.signal(index, pid, signal.SIGTERM)
                    self.hosts.wait_exit(index, pid, 20)
        for proc in self.central.values():
            proc.stop()
        for index in WORKERS:
            for log in self.agent_dir(index).glob("agent-*.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(log, self.root / "logs" / f"host{index}-{log.name}")
            with contextlib.suppress(Exception):  # the host's dockerd, for a failed run
                engine = self.hosts.outer.containers.get(self.hosts.host(index).name)
                (self.root / "logs" / f"host{index}-dockerd.log").write_bytes(engine.logs(tail=300))


def _identities(root: Path, cluster: NatsCluster) -> None:
    """The fleet's identities, as docs/deploy.md makes them (CA, `users add --auth-dir`)."""
    ca, authdir = root / "ca", root / "auth"
    _cli("certs", "init", str(ca))
    common = ["--auth-dir", str(authdir), "--url", cluster.urls, "--ca-dir", str(ca)]
    for role in ("admin", "gateway", "scheduler"):
        _cli("users", "add", role, "--role", role, *common)
    _cli("users", "add", "alice", *common)
    for worker in WORKERS.values():
        _cli("users", "add", worker, "--role", "worker", *common)


def _bundle(fleet: Fleet, index: int) -> None:
    """The worker's credentials bundle handed to its host (docs/deploy.md step 2)."""
    worker = WORKERS[index]
    out = fleet.agent_dir(index) / "bundle" / f"{worker}.json"
    _cli(
        "users", "add", worker, "--role", "worker", "--auth-dir", str(fleet.auth_dir),
        "--url", fleet.cluster.urls, "--ca-dir", str(fleet.root / "ca"), "--out", str(out),
    )  # fmt: skip


async def _admin(fleet: Fleet) -> NatsClient:
    return await bus.connect(
        fleet.cluster.urls, "fleet-test", credentials=fleet.creds("admin", "admin")
    )


async def _role(nc: NatsClient, holder: str) -> str:
    with contextlib.suppress(Exception):
        reply = await api.request(nc, f"cumulus.scheduler.role.{holder}", {}, dict, timeout=1.0)
        return str(reply.get("role", ""))
    return ""


async def _wait(what: str, check: Any, timeout: float) -> float:
    """Until `await check()` is true (bounded); the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        await asyncio.sleep(0.3)
    return time.monotonic() - started


async def _ready_workers(nc: NatsClient) -> set[str]:
    with contextlib.suppress(Exception):
        reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=2.0)
        return {w["worker_id"] for w in reply.get("workers", []) if w.get("status") == "ready"}
    return set()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    need(fleet_hosts.problem())
    root = tmp_path_factory.mktemp("fleet")
    with Hosts(PREFIX, count=3) as hosts:
        image = hosts.push(JOB_IMAGE)
        hosts.pull_all(image, list(WORKERS))  # the first job on a node need not wait for it
        cluster = NatsCluster(root / "nats", size=3, tls=root / "ca", host=hosts.gateway_ip)
        _identities(root, cluster)
        cluster.auth_dir = auth.AuthDir(root / "auth")
        fleet = Fleet(root=root, hosts=hosts, cluster=cluster, image=image)
        try:
            cluster.start(timeout=60)
            for index in WORKERS:
                _bundle(fleet, index)
            yield fleet
        finally:
            fleet.stop()
            cluster.stop()


@pytest.fixture(scope="module")
async def running(fleet: Fleet) -> AsyncIterator[NatsClient]:
    """The central services and both agents up: a leader, a follower, both workers ready."""
    fleet.start_central("scheduler-a", "scheduler", 1)
    nc = await _admin(fleet)
    try:
        await _wait("scheduler-a leads", lambda: _is(nc, "scheduler-a", "leader"), 60)
        fleet.start_central("scheduler-b", "scheduler", 2)
        fleet.start_central("gateway-1", "gateway", 1)
        fleet.start_central("gateway-2", "gateway", 3)
        await _wait("scheduler-b follows", lambda: _is(nc, "scheduler-b", "follower"), 60)
        for index in WORKERS:
            fleet.start_agent(index)

        async def both_ready() -> bool:
            return await _ready_workers(nc) >= set(WORKERS.values())

        took = await _wait("both workers ready", both_ready, 120)
        print(f"\n[fleet] both agents registered {took:.1f} s after their start")
        yield nc
    finally:
        await nc.close()


async def _is(nc: NatsClient, holder: str, role: str) -> bool:
    return await _role(nc, holder) == role


async def _history(nc: NatsClient) -> list[tuple[str, str, dict[str, Any]]]:
    """Every job event the JOBS stream holds, as a consumer believes them: (job id, event name,
    body). A superseded scheduler's decisions published after its successor's marker are
    fenced here as every service fences them (shared/events.py `stale`)."""
    js = nc.jetstream()
    last = (await js.stream_info(subjects.JOBS_STREAM)).state.last_seq
    out: list[tuple[str, str, dict[str, Any]]] = []
    known = 0
    sub = await js.subscribe("jobs.>", ordered_consumer=True)
    try:
        while last:
            msg = await sub.next_msg(timeout=10)
            with contextlib.suppress(MalformedEvent, ValueError):
                event = ev.decode(msg.data)
                if not ev.stale(event, known):
                    known = ev.epoch_after(known, event)
                    _, job, _, name = subjects.parse_job_subject(msg.subject)
                    out.append((job, name, json.loads(msg.data)))
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return out


async def test_jobs_end_exactly_once_through_every_fault(fleet: Fleet, running: NatsClient) -> None:
    nc = running
    patient = RetryPolicy(max_attempts=8)
    faults: dict[str, float] = {}
    async with AsyncClient(profile=fleet.creds("user", "alice"), retry=patient) as client:
        jobs: list[AsyncJob] = []

        async def submit(n: int) -> None:
            for _ in range(n):
                jobs.append(await client.submit(nap, len(jobs), gpu=0.5, duration=600))

        await submit(6)
        # 1. The server leading the job stream dies; jobs are submitted meanwhile.
        leader = fleet.cluster.stream_leader(subjects.JOBS_STREAM)
        assert leader
        faults["nats"] = time.monotonic()
        fleet.cluster.kill(leader)
        await submit(4)
        await asyncio.to_thread(fleet.cluster.restart, leader, 60.0)
        # 2. The leading scheduler dies; the standby takes over, and the first comes back.
        fleet.central["scheduler-a"].kill9()
        faults["scheduler"] = time.monotonic()
        await submit(4)
        took = await _wait("scheduler-b leads", lambda: _is(nc, "scheduler-b", "leader"), 60)
        print(f"[fleet] scheduler-b leads {took:.1f} s after scheduler-a was killed")
        fleet.start_central("scheduler-a", "scheduler", 1)
        await _wait("scheduler-a follows", lambda: _is(nc, "scheduler-a", "follower"), 60)
        # 3. Host 3's engine stops while jobs run there: its agent goes with it.
        await _wait("a job runs on worker-3", lambda: _started_on(nc, WORKERS[LOST]), 60)
        await submit(4)
        faults["host"] = time.monotonic()
        fleet.hosts.stop_engine(LOST)
        await submit(2)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(_outcome(job) for job in jobs), return_exceptions=False), 240
        )
    fleet.check_alive()

    history = await _history(nc)
    ends = Counter(job for job, name, _ in history if name in TERMINAL)
    started = Counter(job for job, name, _ in history if name == "started")
    completed = 0
    for job, (status, code, message) in zip(jobs, outcomes, strict=True):
        assert ends[job.job_id] == 1, f"{job.job_id} ended {ends[job.job_id]} times"
        if status == "COMPLETED":
            completed += 1
            assert started[job.job_id] == 1, f"{job.job_id} started {started[job.job_id]} times"
        else:
            assert (status, code) == ("FAILED", "UNAVAILABLE"), (job.job_id, status, message)
            assert WORKERS[LOST] in message
    assert completed >= len(jobs) - 6, f"only {completed} of {len(jobs)} completed"
    print(f"[fleet] {completed} of {len(jobs)} jobs completed, the rest failed UNAVAILABLE")

    # Host 3 comes back; its agent, restarted, leaves nothing behind; neither does anyone.
    fleet.hosts.start_engine(LOST, timeout=120)
    fleet.start_agent(LOST)

    async def nothing_left() -> bool:
        return not await asyncio.to_thread(_leftovers, fleet) and await _all_free(nc)

    took = await _wait("nothing left on any host", nothing_left, 120)
    print(f"[fleet] clean {took:.1f} s after host {LOST} came back")


async def _started_on(nc: NatsClient, worker: str) -> bool:
    with contextlib.suppress(Exception):
        reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=2.0)
        for w in reply.get("workers", []):
            if w["worker_id"] == worker:
                return any(d.get("jobs") for d in w.get("devices", []))
    return False


async def _all_free(nc: NatsClient) -> bool:
    """The scheduler holds no share of any device (every partition released)."""
    with contextlib.suppress(Exception):
        reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=2.0)
        workers = reply.get("workers", [])
        return bool(workers) and all(not d.get("jobs") for w in workers for d in w["devices"])
    return False


def _leftovers(fleet: Fleet) -> list[str]:
    """Job services, job containers and chronos partitions anywhere in the fleet."""
    found = [f"service {s}" for s in fleet.hosts.services() if s.startswith("cumulus-")]
    for index in (1, 2, 3):
        found += [
            f"host {index}: container {c}"
            for c in fleet.hosts.containers(index)
            if c.startswith("cumulus-") and not c.startswith("cumulus-worker-")  # claims
        ]
    for index, worker in WORKERS.items():
        listed = fleet.hosts.exec(
            index,
            f"{REPO}/.venv/bin/chronos_cli --state-dir {fleet.agent_dir(index)}/chronos-{worker} "
            "--json list",
        )
        partitions = json.loads(listed)["partitions"]
        found += [f"{worker}: partition {p.get('id', p)}" for p in partitions]
    return found


async def _outcome(job: AsyncJob) -> tuple[str, str, str]:
    """(status, error code, message) once the job ended."""
    with contextlib.suppress(Exception):
        await job.result(timeout=230)
    info = await job.status()
    return str(info.status), info.error_code, info.error_message
