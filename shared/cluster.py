"""nats-server configuration for one server of a Cumulus NATS cluster (docs/deploy.md).

A fleet's bus is three nats-server processes on three hosts, joined by routes into one
cluster, with JetStream keeping every stream, bucket and object store on all three
(`nats.replicas: 3`): one host lost, the bus goes on. Each server's config file says:

- who it is (`server_name`, unique: JetStream's Raft groups name their peers by it) and which
  cluster it belongs to (`cluster.name`, the same on every server);
- where clients connect (`host`, `port`) and where its peers do (`cluster.host`/`port`), and
  the peers' route URLs (the same list on every server; a server skips its own);
- its JetStream store directory;
- who may connect: the `authorization` block of the installation's identities
  (shared/auth.py's AuthDir, public keys only) -- identical on every server, since a client
  may land on any of them;
- mutual TLS for clients (shared/auth.py server_tls) and for routes, from the same CA: only a
  server holding a certificate of that CA joins the cluster;
- monitoring (`/healthz`, `/jsz`) on loopback only.

`cumulus nats-config` writes it (cumulus/cli/natsconfig.py); tests/fleet/nats_cluster.py runs
three of them on one machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import auth, subjects
from shared.errors import InvalidArgument

CLIENT_PORT = 4222
ROUTE_PORT = 6222
MONITOR_PORT = 8222
CLUSTER_NAME = "cumulus"


@dataclass(frozen=True)
class ServerTls:
    """This server's certificate and key, and the CA that signed every client's and every
    peer's certificate. The certificate must be valid for the names clients and peers dial
    (`cumulus certs issue CA NAME --server --host ...`), for both server and client
    authentication: a server presents it when it dials its peers' routes too."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ServerSpec:
    """One server of the cluster, as its config file describes it."""

    name: str
    """Unique in the cluster (JetStream's peers are named by it); letters, digits, - and _."""
    store_dir: Path
    """JetStream's store on this host: streams, buckets, Raft logs."""
    peers: tuple[str, ...]
    """`host:port` of every server's cluster listener (this one's may be among them)."""
    host: str = "0.0.0.0"
    port: int = CLIENT_PORT
    cluster_host: str = "0.0.0.0"
    cluster_port: int = ROUTE_PORT
    cluster_name: str = CLUSTER_NAME
    monitor_port: int = MONITOR_PORT
    """nats-server's HTTP monitoring on 127.0.0.1 (0: none)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More top-level settings as they are (e.g. `max_payload`)."""

    def validate(self) -> None:
        """InvalidArgument naming what to fix, before a server is started with it."""
        if not subjects.valid_token(self.name):
            raise InvalidArgument(
                f"Invalid server name {self.name!r}: use letters, digits, '-' and '_'"
            )
        if not self.cluster_name or not subjects.valid_token(self.cluster_name):
            raise InvalidArgument(f"Invalid cluster name {self.cluster_name!r}")
        for port in (self.port, self.cluster_port, self.monitor_port):
            if not 0 <= port <= 65535:
                raise InvalidArgument(f"Port {port} is out of range (0-65535)")
        if not self.peers:
            raise InvalidArgument(
                "A cluster server needs its peers' cluster addresses (--peer HOST:PORT, "
                "the same list on every server)"
            )
        for peer in self.peers:
            split_address(peer, ROUTE_PORT)


def split_address(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` -> (host, port); InvalidArgument if it is none."""
    host, port = text.strip(), default_port
    if host.startswith("["):
        inside, _, rest = host[1:].partition("]")
        host = inside
        if rest:
            port = _port(text, rest.removeprefix(":"))
    elif host.count(":") == 1:
        host, _, raw = host.partition(":")
        port = _port(text, raw)
    if not host:
        raise InvalidArgument(f"Invalid address {text!r}: expected HOST or HOST:PORT")
    return host, port


def _port(text: str, raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) <= 65535:
        raise InvalidArgument(f"Invalid port in {text!r}: expected HOST:PORT, PORT 1-65535")
    return int(raw)


def route_url(peer: str) -> str:
    """The route URL of a peer's `host:port` (TLS, when on, is the cluster block's)."""
    host, port = split_address(peer, ROUTE_PORT)
    return f"nats-route://{f'[{host}]' if ':' in host else host}:{port}"


def route_tls(tls: ServerTls) -> dict[str, Any]:
    """The cluster block's `tls`: this server's certificate both ways, and a certificate of
    the same CA demanded from every peer (`verify`), so only the fleet's servers join."""
    return auth.server_tls(tls.cert, tls.key, tls.ca)


def server_config(
    spec: ServerSpec,
    authorization: dict[str, Any] | None,
    tls: ServerTls | None,
) -> dict[str, Any]:
    """The config of one cluster server (a dict; `render` writes it). `authorization` None or
    `tls` None leave that protection off: for a loopback experiment only."""
    spec.validate()
    cluster: dict[str, Any] = {
        "name": spec.cluster_name,
        "host": spec.cluster_host,
        "port": spec.cluster_port,
        "routes": [route_url(p) for p in spec.peers],
        # Clients use the URLs they were given (names the certificate holds), not addresses
        # the servers would gossip to them.
        "no_advertise": True,
    }
    config: dict[str, Any] = {
        "server_name": spec.name,
        "host": spec.host,
        "port": spec.port,
        "jetstream": {"store_dir": str(spec.store_dir)},
        "cluster": cluster,
        **spec.extra,
    }
    if spec.monitor_port:
        config["http"] = f"127.0.0.1:{spec.monitor_port}"
    if authorization is not None:
        config["authorization"] = authorization
    if tls is not None:
        config["tls"] = auth.server_tls(tls.cert, tls.key, tls.ca)
        cluster["tls"] = route_tls(tls)
    return config


def render(config: dict[str, Any]) -> str:
    """The config file's text (JSON is valid nats-server config syntax)."""
    return json.dumps(config, indent=2) + "\n"


def authorization_of(auth_dir: Path) -> dict[str, Any]:
    """The `authorization` block of the identities in `auth_dir` (`cumulus up`'s
    `<data-dir>/auth`, or the operator's copy); InvalidArgument if it holds none."""
    if not (auth_dir / "creds").is_dir():
        raise InvalidArgument(
            f"{auth_dir} holds no identities (no creds/ directory): give the auth directory "
            "of the installation (`cumulus up --data-dir D` makes D/auth)"
        )
    block = auth.AuthDir(auth_dir).authorization()
    if not block["users"]:
        raise InvalidArgument(f"{auth_dir}/creds holds no credentials: nobody could connect")
    return block
