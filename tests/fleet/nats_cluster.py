"""A NATS cluster of real nats-server processes on loopback, for the fleet tests.

Each server's config is what `cumulus nats-config` writes for an operator (shared/cluster.py):
routes between all of them, JetStream, the installation's identities and, with `tls`, mutual
TLS for clients and routes from one CA. Every server is started on free ports and stopped by
its pid; `kill` is a SIGKILL (a host lost), `restart` brings the same server back on the same
ports and store.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cumulus.cli import main as cli_main
from services.stack import free_port, nats_server_binary
from shared import auth, certs, cluster


@dataclass
class Server:
    name: str
    host: str
    port: int
    route_port: int
    monitor_port: int
    config_path: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class NatsCluster:
    """`size` nats-servers joined into one cluster; `urls` is what `nats.url` takes."""

    root: Path
    size: int = 3
    auth_dir: auth.AuthDir | None = None
    """The identities every server accepts (their `authorization`); None: an open bus."""
    tls: Path | None = None
    """A CA directory (`ca.crt`, `ca.key`; shared/certs.py): each server gets a certificate
    from it and demands one of it from every client and peer (mTLS). None: no TLS."""
    host: str = "127.0.0.1"
    """Where the servers listen (clients and routes): loopback, or this machine's address on
    a test network that nested hosts reach (tests/fleet/hosts.py `gateway_ip`)."""
    servers: dict[str, Server] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(1, self.size + 1):
            name = f"n{i}"
            self.servers[name] = Server(
                name=name,
                host=self.host,
                port=free_port(),
                route_port=free_port(),
                monitor_port=free_port(),
                config_path=self.root / f"{name}.conf",
                log_path=self.root / f"{name}.log",
            )

    @property
    def names(self) -> list[str]:
        return list(self.servers)

    @property
    def urls(self) -> str:
        """Every server's client URL, comma-joined (the form `nats.url` takes)."""
        return ",".join(s.url for s in self.servers.values())

    def url_of(self, name: str) -> str:
        return self.servers[name].url

    # -- configuration -----------------------------------------------------------------

    def _tls_of(self, name: str) -> cluster.ServerTls | None:
        if self.tls is None:
            return None
        out = self.root / "tls"
        cert, key = out / f"{name}.crt", out / f"{name}.key"
        if not cert.exists():
            # Good for server and client authentication (a server dials its peers' routes).
            certs.issue(
                self.tls, name, server=True, hosts=sorted({self.host, "127.0.0.1"}), out=out
            )
        return cluster.ServerTls(cert=cert, key=key, ca=self.tls / "ca.crt")

    def write_config(self, name: str) -> Path:
        """(Re)write one server's config with `cumulus nats-config`, as an operator does
        (docs/deploy.md): the identities as `auth_dir` holds them now."""
        server = self.servers[name]
        argv = ["nats-config", "--name", name, "--listen", f"{self.host}:{server.port}"]
        argv += ["--cluster", f"{self.host}:{server.route_port}"]
        for peer in self.servers.values():
            argv += ["--peer", f"{self.host}:{peer.route_port}"]
        argv += ["--store-dir", str(self.root / name / "jetstream")]
        argv += ["--monitor-port", str(server.monitor_port), "--out", str(server.config_path)]
        if self.auth_dir is not None:
            argv += ["--auth-dir", str(self.auth_dir.root)]
        tls = self._tls_of(name)
        if tls is not None:
            argv += ["--cert", str(tls.cert), "--key", str(tls.key), "--ca", str(tls.ca)]
        if self.auth_dir is None or tls is None:
            argv.append("--insecure")
        with contextlib.redirect_stderr(io.StringIO()):
            rc = cli_main(argv)
        assert rc == 0, f"cumulus {' '.join(argv)} exited with {rc}"
        return server.config_path

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start every server; return once each is up and JetStream has a meta leader."""
        for name in self.servers:
            self.write_config(name)
            self._spawn(name)
        deadline = time.monotonic() + timeout
        for name in self.servers:
            self.wait_healthy(name, deadline - time.monotonic())

    def _spawn(self, name: str) -> None:
        server = self.servers[name]
        with open(server.log_path, "ab") as log:
            server.popen = subprocess.Popen(
                [nats_server_binary(), "-c", str(server.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_healthy(self, name: str, timeout: float = 30.0) -> None:
        """Until `name` answers `/healthz` with 200: up, and JetStream current with the
        cluster (a meta leader exists and this server has caught up with it)."""
        server = self.servers[name]
        deadline = time.monotonic() + max(timeout, 0.1)
        while True:
            if not server.alive():
                raise RuntimeError(f"nats-server {name} exited; see {server.log_path}")
            if self._get(server, "/healthz") is not None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nats-server {name} not healthy within {timeout:.0f} s; see {server.log_path}"
                )
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL one server by its pid (a host lost: no goodbye to its peers)."""
        server = self.servers[name]
        if server.popen is not None and server.alive():
            server.popen.send_signal(signal.SIGKILL)
            server.popen.wait(timeout=10)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start `name` again on its ports and store (after `kill`), until it is healthy."""
        self.kill(name)
        self._spawn(name)
        self.wait_healthy(name, timeout)

    def reload(self) -> None:
        """Rewrite every live server's config (new identities) and have it reload (SIGHUP)."""
        for name, server in self.servers.items():
            if server.alive() and server.popen is not None:
                self.write_config(name)
                server.popen.send_signal(signal.SIGHUP)
        time.sleep(0.2)

    def stop(self) -> None:
        """Stop every server by pid: SIGTERM, then SIGKILL after a grace period."""
        for server in self.servers.values():
            if server.popen is not None and server.alive():
                server.popen.send_signal(signal.SIGTERM)
        for server in self.servers.values():
            if server.popen is None:
                continue
            try:
                server.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.popen.kill()
                server.popen.wait(timeout=10)

    # -- what the servers say ----------------------------------------------------------

    def _get(self, server: Server, path: str) -> Any:
        """The JSON a server's monitoring endpoint answers, or None (down, or not 200)."""
        url = f"http://127.0.0.1:{server.monitor_port}{path}"
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(url, timeout=2) as reply,
        ):
            return json.loads(reply.read())
        return None

    def stream_leader(self, stream: str) -> str:
        """The name of the server leading `stream` now ("" while none does), as a live
        server's `/jsz` reports it."""
        for server in self.servers.values():
            if not server.alive():
                continue
            jsz = self._get(server, "/jsz?streams=true")
            if jsz is None:
                continue
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        return str((detail.get("cluster") or {}).get("leader") or "")
        return ""

    def routes(self, name: str) -> int:
        """How many route connections `name` has (2 per peer in 2.10+: pooled)."""
        routez = self._get(self.servers[name], "/routez")
        return int(routez.get("num_routes", 0)) if routez else 0

    def peers_current(self, stream: str) -> dict[str, bool]:
        """Each replica of `stream` -> whether it is current, as the leader sees them."""
        leader = self.stream_leader(stream)
        if not leader:
            return {}
        jsz = self._get(self.servers[leader], "/jsz?streams=true")
        for account in (jsz or {}).get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    info = detail.get("cluster") or {}
                    out = {leader: True}
                    for replica in info.get("replicas") or []:
                        out[str(replica["name"])] = bool(replica.get("current"))
                    return out
        return {}
