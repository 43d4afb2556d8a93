"""Several hosts on one VM: nested Docker engines in one real Swarm, with a local registry.

`Hosts(prefix, count=3)` brings up, on a user-defined bridge network with a fixed subnet:

- `count` hosts, each a container of the node image (infra/fleet/node, built by
  infra/ci/setup-fleet.sh) running its own dockerd, reachable at `docker_url(i)`
  (tcp://<ip>:2375, only on that bridge: tests talk to it from this VM), with its
  `/var/lib/docker` on a Docker volume (overlay2 on the container's own overlayfs fails);
- one Swarm: host 1 is the manager (`swarm init --default-addr-pool` away from the bridge's
  subnet), the others join as workers; every node carries the seed's GPU labels (`gpu.count`,
  `gpu.<i>.name`, `gpu.<i>.memory`, `chronos.installed`, `ssh.address`);
- a registry (Debian's docker-registry, infra/fleet/registry) on that network; every engine
  is told it is an insecure registry the way an operator does it on a real host: daemon.json
  plus SIGHUP to dockerd, no engine restart. `push(image)` returns the image's reference by
  digest, which Swarm pulls on whichever node runs the service;
- per host, a directory of this VM (`host_dir(i)`) bind-mounted into that host at the same
  path: a worker agent "on" host i keeps its data directory there, so the job directories it
  bind-mounts into its jobs' containers exist on the node that runs them;
- the repository (and the interpreter its `.venv` was made from, when that is not the
  system's: pyenv's prefix here) bind-mounted read-only into every host at the same paths, so
  `.venv/bin/python` runs there: the node image is the same Debian 12 as this VM, so its
  compiled wheels load. `spawn(i, argv, env, log)` starts a process inside host i (detached,
  its output in a file under `host_dir(i)`), `signal` and `alive` follow it by pid, and
  `gateway_ip` is this VM's address on the bridge: a server the hosts' processes reach
  listens there (never on 0.0.0.0).

Hosts are numbered from 1. Host 1 is the manager: stop only the others. Everything made
carries the label `cumulus.fleet=<prefix>` (and the prefix in its name), so `cleanup()` removes
exactly this instance's containers, network and volumes, also those a crashed earlier run with
the same prefix left behind. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import signal as signals
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import pytest

from tests.fleet.conftest import need

NODE_IMAGE = "cumulus-fleet-node:latest"
REGISTRY_IMAGE = "cumulus-fleet-registry:latest"
LABEL = "cumulus.fleet"
ENGINE_PORT = 2375
REGISTRY_PORT = 5000
SWARM_POOL = "10.214.0.0/16"
"""Overlay subnets of the nested Swarm (`--default-addr-pool`): away from the bridge's."""
SUBNET_BASE = "10.213"
"""The bridge is 10.213.N.0/24, N chosen from the prefix (the next one when taken)."""
DOCKER_CAPS = {
    # `--privileged` fails on these VMs ("unable to apply caps"): DESIGN.md, Verified 2026-12-01.
    "cap_add": ["ALL"],
    "cap_drop": ["SYS_RESOURCE"],
    "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
    "device_cgroup_rules": ["a *:* rwm"],
}
UNMASKED: dict[str, list[str]] = {"MaskedPaths": [], "ReadonlyPaths": []}
"""What the CLI's `--security-opt systempaths=unconfined` sends (the API has no such option)."""
REPO = Path(__file__).resolve().parents[2]
"""The repository root: mounted read-only into every host at the same path."""
SYSTEM_PREFIXES = {"/", "/usr", "/usr/local"}
T = TypeVar("T")


def shared_paths() -> list[Path]:
    """What a host needs of this VM to run the repository's `.venv/bin/python`: the repository
    and, when the venv was made from an interpreter outside the system's directories (pyenv),
    that interpreter's prefix; the system libraries it links (libssl, libffi) are the node
    image's own Debian 12 ones."""
    paths = [REPO]
    for prefix in (sys.prefix, sys.base_prefix):
        where = Path(prefix).resolve()
        if str(where) in SYSTEM_PREFIXES or where.is_relative_to(REPO):
            continue
        if not any(where.is_relative_to(p) for p in paths):
            paths.append(where)
    return paths


class FleetError(RuntimeError):
    """The hosts could not be brought up (or did not reach the state waited for)."""


def problem() -> str | None:
    """Why `Hosts` cannot run on this machine, or None (for tests/fleet/conftest.py `need`)."""
    try:
        client = docker.from_env(timeout=10)
    except docker.errors.DockerException:
        return "no Docker engine reachable (sudo infra/ci/setup-docker.sh)"
    try:
        client.ping()
        for image in (NODE_IMAGE, REGISTRY_IMAGE):
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                return f"the image {image} is missing (infra/ci/setup-fleet.sh builds it)"
    except docker.errors.DockerException as exc:
        return f"the Docker engine does not answer: {exc}"
    finally:
        client.close()
    return None


def wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.1) -> T:
    """`check()`'s first truthy value, polled until `timeout`; FleetError naming `what` after."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            got = check()
            if got:
                return got
        except (docker.errors.DockerException, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            why = f" (last error: {last})" if last else ""
            raise FleetError(f"{what}: not within {timeout:.0f} s{why}")
        time.sleep(every)


@dataclass
class Host:
    """One nested engine: its container on this VM, its address on the bridge."""

    index: int
    name: str
    ip: str
    directory: Path
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"tcp://{self.ip}:{ENGINE_PORT}"


@dataclass
class Timings:
    """Seconds each phase took (for the report and docs/benchmarks.md)."""

    engines: float = 0.0
    swarm: float = 0.0
    registry: float = 0.0
    total: float = 0.0
    pushes: dict[str, float] = field(default_factory=dict)
    pulls: dict[str, float] = field(default_factory=dict)


class Hosts:
    """`count` nested engines in one Swarm plus a registry; see the module's docstring."""

    def __init__(
        self,
        prefix: str,
        count: int = 3,
        *,
        gpus: int = 2,
        root: Path | None = None,
        heartbeat_s: float = 2.0,
        node_image: str = NODE_IMAGE,
        registry_image: str = REGISTRY_IMAGE,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.prefix = prefix
        self.count = count
        self.gpus = gpus
        self.heartbeat_s = heartbeat_s
        self.node_image = node_image
        self.registry_image = registry_image
        self._own_root = root is None
        self.root = root or Path(tempfile.gettempdir()) / f"{prefix}-hosts"
        self.outer = docker.from_env(timeout=120)
        self.network = f"{prefix}-net"
        self.subnet = ""
        self.registry = ""
        """The registry's address as the nodes see it: `<ip>:5000`."""
        self._registry_local = ""
        """The registry's address as this VM's engine sees it (127.0.0.1:<published port>)."""
        self.gateway_ip = ""
        """This VM's address on the bridge: where servers the hosts' processes reach listen."""
        self._hosts: dict[int, Host] = {}
        self._clients: dict[int, docker.DockerClient] = {}
        self._spawned: dict[tuple[int, int], Path] = {}
        """(host, pid) -> the file its exit status is written to."""
        self._lock = threading.Lock()
        self.timings = Timings()

    # -- bring up ------------------------------------------------------------------------

    def start(self) -> Hosts:
        """Bring everything up (about 5-10 s on a 2-core VM); cleans up after a failure."""
        started = time.monotonic()
        try:
            self.cleanup()
            self._make_network()
            t = time.monotonic()
            with ThreadPoolExecutor(max_workers=self.count + 1) as pool:
                # Every one finished (or failed) before the cleanup of a failure starts.
                made = [pool.submit(self._start_registry)]
                made += [pool.submit(self._start_engine_container, i) for i in self.indices]
                for future in made:
                    future.result()
            self.timings.engines = time.monotonic() - t
            t = time.monotonic()
            self._form_swarm()
            self.timings.swarm = time.monotonic() - t
            t = time.monotonic()
            self._trust_registry()
            self.timings.registry = time.monotonic() - t
        except BaseException:
            self.cleanup()
            raise
        self.timings.total = time.monotonic() - started
        return self

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def indices(self) -> list[int]:
        return list(range(1, self.count + 1))

    def _labels(self, **more: str) -> dict[str, str]:
        return {LABEL: self.prefix, **more}

    def _parallel(self, fn: Callable[[int], Any], items: list[int]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            return list(pool.map(fn, items))

    def _make_network(self) -> None:
        """A bridge with a fixed subnet (the hosts keep their addresses across restarts)."""
        first = int(hashlib.sha256(self.prefix.encode()).hexdigest(), 16) % 150 + 50
        for n in range(first, first + 20):
            subnet = f"{SUBNET_BASE}.{n % 250}.0/24"
            ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
            try:
                self.outer.networks.create(
                    self.network, driver="bridge", ipam=ipam, labels=self._labels()
                )
            except docker.errors.APIError as exc:
                if "overlap" in str(exc).lower():
                    continue
                raise
            self.subnet = subnet
            config = self.outer.api.inspect_network(self.network)["IPAM"]["Config"] or [{}]
            self.gateway_ip = str(config[0].get("Gateway") or self._address(1))
            return
        raise FleetError(f"no free subnet under {SUBNET_BASE}.0.0/16 for {self.network}")

    def _address(self, last: int) -> str:
        return self.subnet.rsplit(".", 1)[0] + f".{last}"

    def _create(self, name: str, image: str, ip: str, **kwargs: Any) -> str:
        """Create (not start) a container on the bridge at a fixed address."""
        api = self.outer.api
        networking = api.create_networking_config(
            {self.network: api.create_endpoint_config(ipv4_address=ip)}
        )
        host_config = api.create_host_config(**kwargs.pop("host_config", {}))
        host_config.update(kwargs.pop("raw_host_config", {}))
        made = api.create_container(
            image,
            name=name,
            hostname=name,
            labels=self._labels(**kwargs.pop("labels", {})),
            host_config=host_config,
            networking_config=networking,
            **kwargs,
        )
        return str(made["Id"])

    def _start_engine_container(self, index: int) -> None:
        name = f"{self.prefix}-h{index}"
        directory = self.root / f"h{index}"
        directory.mkdir(parents=True, exist_ok=True)
        host = Host(index, name, self._address(10 + index), directory.resolve())
        volume = f"{name}-docker"
        self.outer.volumes.create(volume, labels=self._labels())
        mounts = [
            docker.types.Mount("/var/lib/docker", volume, type="volume"),
            docker.types.Mount(str(host.directory), str(host.directory), type="bind"),
        ]
        mounts += [
            docker.types.Mount(str(path), str(path), type="bind", read_only=True)
            for path in shared_paths()
        ]
        self._create(
            name,
            self.node_image,
            host.ip,
            labels={f"{LABEL}.host": str(index)},
            host_config={"mounts": mounts, **DOCKER_CAPS},
            raw_host_config=UNMASKED,
        )
        self.outer.api.start(name)
        with self._lock:
            self._hosts[index] = host
        self._wait_engine(index)

    def _wait_engine(self, index: int, timeout: float = 60) -> None:
        def up() -> bool:
            # A short-lived client with a short timeout: one attempt that hangs (an engine
            # still starting under load) must not use up the whole wait.
            probe = docker.DockerClient(base_url=self.docker_url(index), version="1.41", timeout=5)
            try:
                return bool(probe.ping())
            finally:
                probe.close()

        wait_for(f"the engine of host {index} ({self.docker_url(index)})", up, timeout)

    def _form_swarm(self) -> None:
        manager = self.client(1)
        ip = self._hosts[1].ip
        manager.swarm.init(
            advertise_addr=ip,
            listen_addr=f"{ip}:2377",
            default_addr_pool=[SWARM_POOL],
            subnet_size=24,
            dispatcher_heartbeat_period=int(self.heartbeat_s * 1e9),
        )
        manager.swarm.reload()
        token = manager.swarm.attrs["JoinTokens"]["Worker"]

        def join(index: int) -> None:
            me = self._hosts[index].ip
            self.client(index).swarm.join(
                remote_addrs=[f"{ip}:2377"],
                join_token=token,
                listen_addr=f"{me}:2377",
                advertise_addr=me,
            )

        self._parallel(join, self.indices[1:])
        for index in self.indices:
            info = self.client(index).info()["Swarm"]
            self._hosts[index].node_id = str(info["NodeID"])
            self.wait_node(index, "ready")
        self._parallel(self._label_node, self.indices)

    def gpu_labels(self, index: int) -> dict[str, str]:
        """The seed's node labels for host `index` (virtual GPUs: no real device here)."""
        labels = {
            "gpu.count": str(self.gpus),
            "chronos.installed": "true",
            "ssh.address": self._hosts[index].ip,
        }
        for gpu in range(self.gpus):
            labels[f"gpu.{gpu}.name"] = "Virtual GPU"
            labels[f"gpu.{gpu}.memory"] = "40960"
        return labels

    def _label_node(self, index: int) -> None:
        self.label(index, self.gpu_labels(index))

    def label(self, index: int, labels: dict[str, str]) -> None:
        """Add labels to host `index`'s Swarm node (`docker node update --label-add`)."""
        for _ in range(5):  # the node's version moves while it settles: retry on conflict
            node = self.manager.nodes.get(self.node_id(index))
            spec = dict(node.attrs["Spec"])
            spec["Labels"] = {**(spec.get("Labels") or {}), **labels}
            try:
                node.update(spec)
                return
            except docker.errors.APIError as exc:
                if "out of sequence" not in str(exc) and exc.status_code != 409:
                    raise
        raise FleetError(f"could not label the node of host {index}")

    def node_labels(self, index: int) -> dict[str, str]:
        node = self.manager.nodes.get(self.node_id(index))
        return dict(node.attrs["Spec"].get("Labels") or {})

    def _start_registry(self) -> None:
        name = f"{self.prefix}-registry"
        volume = f"{name}-data"
        self.outer.volumes.create(volume, labels=self._labels())
        self.registry = f"{self._address(2)}:{REGISTRY_PORT}"
        self._create(
            name,
            self.registry_image,
            self._address(2),
            ports=[REGISTRY_PORT],
            host_config={
                "mounts": [docker.types.Mount("/var/lib/docker-registry", volume, type="volume")],
                # Published on loopback only: this VM's engine pushes to it as 127.0.0.1:<port>
                # (a loopback registry needs no insecure-registries entry on the VM's engine).
                "port_bindings": {REGISTRY_PORT: ("127.0.0.1", None)},
            },
        )
        self.outer.api.start(name)
        port = self.outer.api.port(name, REGISTRY_PORT)[0]["HostPort"]
        self._registry_local = f"127.0.0.1:{port}"

    def _trust_registry(self) -> None:
        if not self._registry_local:
            raise FleetError("the registry container did not start")
        self._wait_registry()
        self._parallel(self._tell_insecure, self.indices)

    def _wait_registry(self, timeout: float = 30) -> None:
        import urllib.request

        def answers() -> bool:
            with urllib.request.urlopen(f"http://{self._registry_local}/v2/", timeout=2) as r:
                return bool(r.status == 200)

        wait_for(f"the registry at {self._registry_local}", answers, timeout)

    def _tell_insecure(self, index: int) -> None:
        """daemon.json + SIGHUP, as docs/deploy.md tells an operator (no engine restart)."""
        config = json.dumps({"insecure-registries": [self.registry]})
        script = f"printf '%s\\n' '{config}' > /etc/docker/daemon.json && kill -HUP 1"
        self.exec(index, script)

        def trusted() -> bool:
            configs = self.client(index).info()["RegistryConfig"]["IndexConfigs"]
            entry = configs.get(self.registry) or {}
            return entry.get("Secure") is False

        wait_for(f"host {index} to trust the registry {self.registry}", trusted, 15)

    def exec(self, index: int, script: str) -> str:
        """Run `sh -c script` on host `index` itself (beside its dockerd); its output."""
        container = self.outer.containers.get(self._hosts[index].name)
        code, out = container.exec_run(["sh", "-c", script])
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        if code != 0:
            raise FleetError(f"on host {index}: {script!r} failed ({code}): {text.strip()}")
        return text

    # -- processes on a host --------------------------------------------------------------

    def spawn(
        self,
        index: int,
        argv: list[str],
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> int:
        """Start `argv` inside host `index`, detached, in the repository's directory; its pid
        there. Its output goes to `log` (default `host_dir(index)/<program>-<n>.log`, readable
        from this VM too) and its exit status, once it ends, to `<log>.status`.

        A shell started by `docker exec` waits for it and records the status: the host's
        PID 1 is dockerd, which reaps no processes it did not start, so an ended process
        would otherwise stay a zombie that `kill -0` still finds.
        """
        where = self.host_dir(index)
        if log is None:
            stem = Path(argv[0]).name if len(argv) < 3 or argv[1] != "-m" else argv[2]
            log = where / f"{stem}-{len(self._spawned) + 1}.log"
        status, pidfile = Path(f"{log}.status"), Path(f"{log}.pid")
        for path in (status, pidfile):
            path.unlink(missing_ok=True)
        script = (
            "log=$1 status=$2 pidfile=$3; shift 3; "
            '( "$@" >"$log" 2>&1 </dev/null & echo $! >"$pidfile.tmp"; '
            'mv "$pidfile.tmp" "$pidfile"; wait $!; echo $? >"$status" ) '
            ">/dev/null 2>&1 </dev/null & "
            'for _ in $(seq 500); do [ -s "$pidfile" ] && exec cat "$pidfile"; sleep 0.01; done; '
            "exit 1"
        )
        container = self.outer.containers.get(self.host(index).name)
        code, out = container.exec_run(
            ["sh", "-c", script, "spawn", str(log), str(status), str(pidfile), *argv],
            environment=env or {},
            workdir=str(REPO),
        )
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        if code != 0 or not text.strip().isdigit():
            raise FleetError(f"on host {index}: could not start {shlex.join(argv)}: {text}")
        pid = int(text.strip())
        self._spawned[(index, pid)] = status
        return pid

    def signal(self, index: int, pid: int, sig: int = signals.SIGTERM) -> None:
        """Send `sig` to process `pid` inside host `index` (quietly none if it is gone).
        A process `spawn` started ignores SIGINT (sh starts background commands so): stop it
        with SIGTERM, as a supervisor does."""
        container = self.outer.containers.get(self.host(index).name)
        container.exec_run(["kill", f"-{int(sig)}", str(pid)])

    def alive(self, index: int, pid: int) -> bool:
        """Whether process `pid` inside host `index` still runs (a zombie does not)."""
        check = f"grep -q '^State:[[:space:]]*[^Z]' /proc/{int(pid)}/status 2>/dev/null"
        container = self.outer.containers.get(self.host(index).name)
        code, _ = container.exec_run(["sh", "-c", check])
        return bool(code == 0)

    def exit_status(self, index: int, pid: int) -> int | None:
        """The exit status of a process `spawn` started, once it ended; None before."""
        status = self._spawned.get((index, pid))
        if status is None:
            raise FleetError(f"process {pid} on host {index} was not started by spawn")
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(status.read_text().strip())
        return None

    def wait_exit(self, index: int, pid: int, timeout: float) -> int:
        """Wait (bounded) for a spawned process to end; its exit status."""
        deadline = time.monotonic() + timeout
        while (code := self.exit_status(index, pid)) is None:
            if time.monotonic() > deadline:
                raise FleetError(f"process {pid} on host {index} did not end in {timeout:.0f} s")
            time.sleep(0.1)
        return code

    # -- images --------------------------------------------------------------------------

    def push(self, local_image: str, name: str = "") -> str:
        """Push a local image to the registry once; return `<registry>/<name>@sha256:...`.

        This VM's engine pushes through the registry's loopback port; the digest names the
        same manifest at the registry's address on the bridge, which is what nodes pull.
        """
        repo = name or local_image.split("@", 1)[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
        tag = f"{self._registry_local}/{repo}:latest"
        started = time.monotonic()
        image = self.outer.images.get(local_image)
        image.tag(tag)
        try:
            digest = ""
            for line in self.outer.api.push(tag, stream=True, decode=True):
                if line.get("error"):
                    raise FleetError(f"push of {local_image} failed: {line['error']}")
                digest = line.get("aux", {}).get("Digest", digest)
        finally:
            with contextlib.suppress(docker.errors.APIError):
                self.outer.images.remove(tag, noprune=True)
        if not digest:
            raise FleetError(f"the registry gave no digest for {local_image}")
        self.timings.pushes[local_image] = time.monotonic() - started
        return f"{self.registry}/{repo}@{digest}"

    def pull(self, index: int, reference: str) -> float:
        """Pull `reference` on host `index`; the seconds it took."""
        started = time.monotonic()
        self.client(index).images.pull(reference)
        took = time.monotonic() - started
        self.timings.pulls[f"h{index}"] = took
        return took

    def pull_all(self, reference: str, indices: list[int] | None = None) -> dict[int, float]:
        """Pull `reference` on several hosts (default: all), one after the other (on 2 cores two
        pulls at once took 32 s each against 11-15 s alone); the seconds each took."""
        chosen = self.indices if indices is None else indices
        return {i: self.pull(i, reference) for i in chosen}

    # -- looking at the hosts ------------------------------------------------------------

    def host(self, index: int) -> Host:
        try:
            return self._hosts[index]
        except KeyError:
            raise FleetError(f"no host {index} (hosts are 1..{self.count})") from None

    def docker_url(self, index: int) -> str:
        """DOCKER_HOST for host `index`'s engine (tcp, reachable from this VM only)."""
        return self.host(index).url

    def host_dir(self, index: int) -> Path:
        """A directory shared by this VM and host `index` at the same path (see module doc)."""
        return self.host(index).directory

    def hostname(self, index: int) -> str:
        return self.host(index).name

    def node_id(self, index: int) -> str:
        return self.host(index).node_id

    def client(self, index: int) -> docker.DockerClient:
        """A client of host `index`'s engine (kept; closed by cleanup)."""
        with self._lock:
            if index not in self._clients:
                self._clients[index] = docker.DockerClient(
                    base_url=self.docker_url(index), version="auto", timeout=60
                )
            return self._clients[index]

    @property
    def manager(self) -> docker.DockerClient:
        return self.client(1)

    def node_state(self, index: int) -> str:
        """The manager's view of host `index`'s node: ready, down, unknown, disconnected."""
        node = self.manager.api.inspect_node(self.node_id(index))
        return str(node["Status"]["State"])

    def wait_node(self, index: int, state: str, timeout: float = 60) -> float:
        """Wait until the manager sees host `index`'s node in `state`; the seconds it took."""
        started = time.monotonic()
        wait_for(
            f"node of host {index} to be {state}",
            lambda: self.node_state(index) == state,
            timeout,
        )
        return time.monotonic() - started

    def containers(self, index: int) -> list[str]:
        """Names of every container on host `index`'s engine, running or not."""
        found = self.client(index).api.containers(all=True)
        return sorted(str(c["Names"][0]).lstrip("/") for c in found)

    def services(self) -> list[str]:
        """Names of every service in the Swarm."""
        return sorted(str(s["Spec"]["Name"]) for s in self.manager.api.services())

    def stop_engine(self, index: int, timeout: int = 10) -> None:
        """Stop host `index`'s engine (its containers go with it; its state stays)."""
        if index == 1:
            raise FleetError("host 1 is the Swarm's only manager; stop another host")
        self._drop_client(index)
        self.outer.api.stop(self.host(index).name, timeout=timeout)

    def start_engine(self, index: int, timeout: float = 60) -> None:
        """Start host `index`'s engine again and wait until its node is ready."""
        self.outer.api.start(self.host(index).name)
        self._wait_engine(index, timeout)
        self.wait_node(index, "ready", timeout)

    def engine_running(self, index: int) -> bool:
        state = self.outer.api.inspect_container(self.host(index).name)["State"]
        return bool(state.get("Running"))

    def _drop_client(self, index: int) -> None:
        with self._lock:
            client = self._clients.pop(index, None)
        if client is not None:
            client.close()

    # -- cleanup -------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove exactly what this prefix made: containers, then volumes and the network."""
        for index in list(self._clients):
            self._drop_client(index)
        wanted = {"label": [f"{LABEL}={self.prefix}"]}
        api = self.outer.api
        for container in api.containers(all=True, filters=wanted):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container["Id"], force=True, v=True)
        for volume in api.volumes(filters=wanted).get("Volumes") or []:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_volume(volume["Name"], force=True)
        for network in api.networks(filters=wanted):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_network(network["Id"])
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        """Clean up and close the client of this VM's engine."""
        self.cleanup()
        self.outer.close()

    def leftovers(self) -> list[str]:
        """Docker objects of this prefix still on this VM's engine (after cleanup: none)."""
        wanted = {"label": [f"{LABEL}={self.prefix}"]}
        api = self.outer.api
        found = [f"container {c['Names'][0]}" for c in api.containers(all=True, filters=wanted)]
        found += [f"volume {v['Name']}" for v in api.volumes(filters=wanted).get("Volumes") or []]
        found += [f"network {n['Name']}" for n in api.networks(filters=wanted)]
        return found


@contextlib.contextmanager
def running(prefix: str, count: int = 3, **kwargs: Any) -> Iterator[Hosts]:
    """`with running("h3t", 3) as hosts:` up, then everything removed however the block ends."""
    hosts = Hosts(prefix, count, **kwargs)
    try:
        yield hosts.start()
    finally:
        hosts.close()


def hosts_for(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """The body of a module-scoped fixture: `FLEET_PREFIX` (default "cuf") and `FLEET_HOSTS`
    (default 3) set in the test module choose the prefix and the count; skips (fails in CI)
    without an engine or the fleet images. Use it as

        @pytest.fixture(scope="module")
        def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
            yield from hosts_for(request)
    """
    need(problem())
    prefix = str(getattr(request.module, "FLEET_PREFIX", "cuf"))
    count = int(getattr(request.module, "FLEET_HOSTS", 3))
    with running(prefix, count) as hosts:
        yield hosts
