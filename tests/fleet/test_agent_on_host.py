"""A real worker agent on another host: `cumulus worker` inside host 2 (a nested engine that is
a Swarm worker node), the control plane on this VM (nats-server with nkeys and mTLS on the
test bridge, scheduler, gateway), the Swarm manager on host 1.

The agent's runner keeps its own engine (host 2's local socket: job directories, the
requirements volume, the claim marker, the job image) and makes its services through the
manager (`container.swarm_manager`), over mutual TLS (`container.swarm_manager_tls`): the
nested manager's dockerd listens in plain TCP, so a TLS front on this VM (`TlsFront`, what
`dockerd --tlsverify` does: a server certificate from a CA, a client certificate required)
stands before it. Jobs submitted through the SDK run on host 2's node, with
and without requirements; SIGTERM stops the agent cleanly, and nothing of the jobs is left on
either host. The manager's engine never needs the job image.

Run: .venv/bin/python -m pytest -q -s tests/fleet/test_agent_on_host.py (figures printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient
from services.runner.jobdirs import requirements_key
from services.stack import Stack
from shared import api, auth, certs
from tests.fleet.hosts import REPO, Hosts, hosts_for, wait_for
from tests.runner.conftest import make_wheel

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(300)]

FLEET_PREFIX = "cuf-h3b"
FLEET_HOSTS = 2
JOB_IMAGE = "cumulus-job:latest"
WORKER = "fleet-w2"
REQUIREMENT = "cumulus_probe==1.0"


def report(what: str, seconds: float) -> None:
    print(f"[fleet] {what}: {seconds:.2f} s")


@pytest.fixture(scope="module")
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    yield from hosts_for(request)


@pytest.fixture(scope="module")
def job_image(hosts: Hosts) -> str:
    """The job image by digest, pulled on host 2 only (the agent's own engine runs its claim
    marker and the job from it); host 1, the manager, never gets it."""
    reference = hosts.push(JOB_IMAGE)
    report(f"push {JOB_IMAGE} to the registry", hosts.timings.pushes[JOB_IMAGE])
    report("pull by digest on host 2", hosts.pull(2, reference))
    return reference


@pytest.fixture(scope="module")
async def stack(hosts: Hosts) -> AsyncIterator[Stack]:
    """The control plane on this VM, listening on the bridge's gateway address only, with
    nkeys and mTLS; no local worker."""
    s = Stack(
        data_dir=hosts.root / "stack",
        workers=[],
        secure=True,
        tls=True,
        listen=hosts.gateway_ip,
    )
    try:
        await s.start(timeout=60)
        yield s
    finally:
        s.stop()


class TlsFront(threading.Thread):
    """A TLS endpoint before a plain engine API, as `dockerd --tlsverify` serves one: the
    server's certificate from `ca_dir`'s CA, a client certificate from it required."""

    def __init__(self, listen: str, target: tuple[str, int], ca_dir: Path) -> None:
        super().__init__(name="tls-front", daemon=True)
        certs.make_ca(ca_dir)
        certs.issue(ca_dir, "manager", server=True, hosts=[listen])
        self.context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(ca_dir / "ca.crt")
        )
        self.context.load_cert_chain(ca_dir / "manager.crt", ca_dir / "manager.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.target = target
        self.server = socket.create_server((listen, 0))
        self.server.settimeout(0.2)
        self.url = f"tcp://{listen}:{self.server.getsockname()[1]}"
        self.accepted = 0
        self.refused = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            conn.close()
            return
        self.accepted += 1
        tls.settimeout(None)
        with tls, socket.create_connection(self.target, timeout=10) as up:
            up.settimeout(None)
            self._pump(tls, up)

    def _pump(self, tls: ssl.SSLSocket, up: socket.socket) -> None:
        while not self._stop.is_set():
            ready = [tls] if tls.pending() else select.select([tls, up], [], [], 0.5)[0]
            for end in ready:
                other = up if end is tls else tls
                try:
                    data = end.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not data:
                    return
                other.sendall(data)

    def client_files(self, ca_dir: Path, where: Path) -> Path:
        """Docker's names for a client's TLS files (ca.pem, cert.pem, key.pem) in `where`."""
        certs.issue(ca_dir, "runner", out=where)
        shutil.copy(ca_dir / "ca.crt", where / "ca.pem")
        (where / "runner.crt").rename(where / "cert.pem")
        (where / "runner.key").rename(where / "key.pem")
        return where

    def stop(self) -> None:
        self._stop.set()
        self.server.close()


@pytest.fixture(scope="module")
def manager_tls(hosts: Hosts) -> Iterator[TlsFront]:
    front = TlsFront(hosts.gateway_ip, (hosts.host(1).ip, 2375), hosts.root / "manager-ca")
    front.start()
    try:
        yield front
    finally:
        front.stop()


def install_credentials(stack: Stack, where: Path) -> Path:
    """The worker's credentials and TLS files copied to the host (as an operator installs
    them), the TLS files named relative to the credentials file."""
    made = Path(stack.credentials("worker", WORKER, (WORKER,)))
    stack.reload()
    creds = auth.load_credentials(made)
    where.mkdir(parents=True, exist_ok=True)
    assert creds.tls is not None
    for name, source in (("ca.crt", creds.tls.ca), ("worker.crt", creds.tls.cert)):
        shutil.copy(source, where / name)
    shutil.copy(creds.tls.key, where / "worker.key")
    (where / "worker.key").chmod(0o600)
    creds.tls = auth.TlsFiles(ca="ca.crt", cert="worker.crt", key="worker.key")
    path = where / "worker.json"
    auth.write_credentials(path, creds)
    return path


@dataclass
class Agent:
    """The worker agent running inside a host."""

    hosts: Hosts
    index: int
    pid: int
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def agent_config(hosts: Hosts, stack: Stack, image: str, creds: Path, front: TlsFront) -> Path:
    home = hosts.host_dir(2)
    tls = front.client_files(hosts.root / "manager-ca", home / "docker-tls")
    wheels = home / "wheelhouse"
    make_wheel(wheels)
    wheels.chmod(0o755)
    config = {
        "data_dir": str(home / "data"),
        "nats": {"url": stack.url, "credentials": str(creds)},
        "worker": {
            "id": WORKER,
            "backend": "swarm",
            "devices": "2x16GiB",
            "device_source": "virtual",
            "heartbeat_s": 2.0,
        },
        "container": {
            "image": image,
            "swarm_node": hosts.node_id(2),
            "swarm_manager": front.url,
            "swarm_manager_tls": str(tls),
            "wheelhouse": str(wheels),
        },
        "logging": {"format": "text"},
    }
    path = home / "worker.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


async def registered(stack: Stack, worker: str) -> bool:
    nc = await stack.connect()
    try:
        reply = await api.request(nc, "cumulus.scheduler.workers", {}, dict, timeout=2.0)
    finally:
        await nc.close()
    return any(w["worker_id"] == worker and w["status"] == "ready" for w in reply["workers"])


@pytest.fixture(scope="module")
async def agent(
    hosts: Hosts,
    stack: Stack,
    job_image: str,
    manager_tls: TlsFront,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Agent]:
    creds = install_credentials(stack, hosts.host_dir(2) / "creds")
    config = agent_config(hosts, stack, job_image, creds, manager_tls)
    log = hosts.host_dir(2) / "worker.log"
    command = str(REPO / ".venv" / "bin" / "cumulus")  # its #! is the venv's python
    started = time.monotonic()
    pid = hosts.spawn(
        2,
        [command, "worker", "--config", str(config)],
        env={"PYTHONUNBUFFERED": "1"},
        log=log,
    )
    me = Agent(hosts, 2, pid, log)
    try:
        deadline = time.monotonic() + 90
        while not await registered(stack, WORKER):
            if not hosts.alive(2, pid) or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not register; its log:\n{me.tail()}")
            await asyncio.sleep(0.2)
        report(
            "agent started inside host 2 -> registered with the scheduler",
            time.monotonic() - started,
        )
        yield me
    finally:
        if hosts.alive(2, pid):
            hosts.signal(2, pid, signal.SIGKILL)
        with contextlib.suppress(OSError):  # kept for a look after the hosts are gone
            shutil.copy(log, tmp_path_factory.mktemp("agent") / "worker.log")
            shutil.copytree(
                stack.data_dir / "logs", tmp_path_factory.mktemp("stack-logs"), dirs_exist_ok=True
            )


@pytest.fixture
async def client(stack: Stack, agent: Agent) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(profile=stack.profile()) as c:
        yield c


def hello(seconds: float) -> str:
    import socket
    import time as t

    print("hello from a remote node", flush=True)
    t.sleep(seconds)
    return socket.gethostname()


def uses_probe(seconds: float) -> tuple[int, str]:
    import time as t

    import cumulus_probe

    print("probe imported", flush=True)
    t.sleep(seconds)
    return cumulus_probe.VALUE, str(cumulus_probe.__file__)


def where_it_ran(hosts: Hosts, job_id: str) -> set[int]:
    """The hosts whose engine has (had, until it is removed) the job's container."""
    name = f"cumulus-{job_id}-"
    return {i for i in hosts.indices if any(n.startswith(name) for n in hosts.containers(i))}


async def run_on_node(
    client: AsyncClient, hosts: Hosts, func: Any, *args: Any, **options: Any
) -> tuple[Any, list[str], set[int], float]:
    """Submit, watch which engine runs the job's container, and get its logs and value."""
    started = time.monotonic()
    job = await client.submit(func, *args, gpu=0.5, duration=600, **options)
    result = asyncio.create_task(job.result(timeout=150))
    seen: set[int] = set()
    while not result.done() and not seen:
        seen = await asyncio.to_thread(where_it_ran, hosts, job.job_id)
        await asyncio.sleep(0.1)
    value = await result
    took = time.monotonic() - started
    lines = [line.text async for line in job.logs()]
    return value, lines, seen, took


async def test_the_agent_inside_a_host_registers_over_mtls(
    agent: Agent, stack: Stack, manager_tls: TlsFront
) -> None:
    assert agent.hosts.alive(2, agent.pid)
    assert stack.url.startswith(f"nats://{agent.hosts.gateway_ip}:")
    # The agent is a process of host 2, not of this VM: its engine is host 2's own.
    assert agent.hosts.exec(2, f"cat /proc/{agent.pid}/cmdline | tr '\\0' ' '").find("worker") > 0
    # It checked its node with the manager through TLS, with its client certificate.
    assert manager_tls.accepted > 0
    # A client without a certificate of the manager's CA is refused there.
    refused = manager_tls.refused
    bare = ssl.create_default_context(cafile=str(agent.hosts.root / "manager-ca" / "ca.crt"))
    host, port = manager_tls.url.removeprefix("tcp://").split(":")
    with (
        contextlib.suppress(ssl.SSLError, OSError),
        bare.wrap_socket(socket.create_connection((host, int(port)), 5), server_hostname=host) as s,
    ):
        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        assert not s.recv(100).startswith(b"HTTP/1.0 200"), "served without a certificate"
    wait_for("the front to refuse it", lambda: manager_tls.refused > refused, 5)


async def test_a_job_runs_on_the_agents_own_node(client: AsyncClient, agent: Agent) -> None:
    hosts = agent.hosts
    value, lines, seen, took = await run_on_node(client, hosts, hello, 1.0)
    report("first job on host 2 (no requirements): submit -> result", took)
    assert lines == ["hello from a remote node"]
    assert isinstance(value, str)
    assert value
    assert seen == {2}, f"the job's container was on hosts {seen}, not host 2"
    _, _, _, again = await run_on_node(client, hosts, hello, 0.0)
    report("second job on host 2 (no requirements): submit -> result", again)


async def test_a_job_with_requirements_runs_on_the_agents_own_node(
    client: AsyncClient, agent: Agent
) -> None:
    """Its environment volume is made on host 2's engine, where Swarm runs its task."""
    hosts = agent.hosts
    reqs = [REQUIREMENT]
    value, lines, seen, took = await run_on_node(client, hosts, uses_probe, 1.0, requirements=reqs)
    report("first job with requirements on host 2 (installs them): submit -> result", took)
    assert value[0] == 42
    assert value[1].startswith("/env/site/")
    assert lines == ["probe imported"]
    assert seen == {2}
    volume = f"cumulus-env-{requirements_key(reqs)}"
    assert [v.name for v in hosts.client(2).volumes.list() if v.name == volume] == [volume]
    assert not [v for v in hosts.client(1).volumes.list() if v.name.startswith("cumulus-")]
    value, _, seen, took = await run_on_node(client, hosts, uses_probe, 0.0, requirements=reqs)
    report("second job with requirements on host 2 (from its volume): submit -> result", took)
    assert value[0] == 42
    assert seen == {2}


async def test_sigterm_stops_the_agent_and_nothing_of_the_jobs_is_left(agent: Agent) -> None:
    hosts = agent.hosts
    started = time.monotonic()
    hosts.signal(2, agent.pid, signal.SIGTERM)
    code = await asyncio.to_thread(hosts.wait_exit, 2, agent.pid, 30)
    report("SIGTERM -> agent exited", time.monotonic() - started)
    assert code == 0, agent.tail()
    assert not hosts.alive(2, agent.pid)
    await asyncio.to_thread(nothing_left, hosts)
    # Host 1 only manages: the job image, the claim and the volumes stayed on host 2.
    repo = hosts.registry + "/" + JOB_IMAGE.split(":")[0]
    assert not hosts.client(1).images.list(name=repo)
    # What stays on purpose: the requirements' environment volume on host 2 (a cache shared
    # by jobs with the same requirements), and the Swarm's internal overlay network.
    left = sorted(v.name for v in hosts.client(2).volumes.list() if v.name.startswith("cumulus"))
    assert left == [f"cumulus-env-{requirements_key([REQUIREMENT])}"]


def nothing_left(hosts: Hosts, within: float = 20) -> None:
    """No service in the Swarm, no container on any host (the claim marker included)."""

    def clean() -> bool:
        return not hosts.services() and not any(hosts.containers(i) for i in hosts.indices)

    try:
        wait_for("nothing left on the hosts", clean, within, every=0.25)
    except Exception:
        found = {i: hosts.containers(i) for i in hosts.indices}
        raise AssertionError(f"left: services {hosts.services()}, containers {found}") from None
