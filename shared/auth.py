"""Identities and permissions: every connection to the bus is someone, and may do only its part.

nats-server's own config-file authorization holds them (docs/security.md says why this and not
decentralised JWT accounts): each identity is an nkey user (an ed25519 key pair; the server
keeps only the public key, the holder proves the seed by signing the server's nonce) with
publish and subscribe permissions made from its role:

- `user` U: publishes only its own API subjects `cumulus.api.U.>` and its warm maps' inputs
  `mapin.U.>`; subscribes only to its own
  jobs `jobs.U.>`, their output `logs.U.>` and its private inbox. No JetStream API at all:
  uploads, replay and large results go through the gateway, which knows the user from the
  subject.
- `gateway`: answers `cumulus.api.*.*`; the only publisher of `submitted` and
  `cancel_requested`.
- `scheduler`: the only publisher of placements (`queued`, `scheduled`, `cancel`, `revoked`)
  and of `workers.*.lost` / `workers.*.node`, of the election marker `jobs._._._.elected`
  and of its lease (`$KV.cumulus-scheduler.>`).
- `worker` W (its partitioner and runner): publishes only the events of its own worker token
  (`jobs.*.*.W.<partition or run event>`, its jobs' output `logs.*.*.W` and result parts
  `results.*.*.W.*`, `workers.W.>`), uses only its own durable consumers, reads code, pulls
  warm maps' inputs (any map's: which map runs where is the scheduler's choice).
- `observer`: reads `jobs.>`, `logs.>`, `results.>` and `workers.>` and the read-only API,
  and asks any service whether it is alive and ready (`cumulus.health.>`); publishes no event.

Every service identity answers, and may ask, its own health subjects only
(`cumulus.health.<service>[.<instance>]`, shared/health.py; a worker W those of its
partitioner, runner and agent under `W`), so a Swarm HEALTHCHECK or a systemd unit can ask
with the service's own credentials.
- `admin`: everything (the operator's tool and `cumulus up`).

Credentials live in one JSON file per identity (mode 0600): name, role, URL, nkey seed, inbox
prefix and TLS files. Every inbox prefix is private to its identity, so nobody reads replies
meant for someone else.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import nkeys

from shared import subjects
from shared.errors import ConfigError, InvalidArgument

Role = Literal["user", "gateway", "scheduler", "worker", "observer", "admin"]
ROLES: tuple[Role, ...] = ("user", "gateway", "scheduler", "worker", "observer", "admin")

WORKER_JOB_EVENTS = (
    "partition_ready",
    "partition_failed",
    "partition_released",
    "started",
    "attempt_failed",
    "log",
    "result",
    "completed",
    "failed",
    "timed_out",
    "cancelled",
)
"""Job events a worker publishes, always under its own worker token (`log` and `result` under
`logs.` and `results.`: shared/subjects.py)."""
SCHEDULER_JOB_EVENTS = ("queued", "scheduled", "cancel", "revoked", "failed", "cancelled")
GATEWAY_JOB_EVENTS = ("submitted", "cancel_requested")
WORKER_EVENTS = ("registered", "heartbeat", "deregistered")
SCHEDULER_WORKER_EVENTS = ("lost", "node")
WORKER_SERVICES = ("partitioner", "runner", "worker")
"""A worker's processes that answer health checks (shared/health.py): its two services and
the agent that runs both."""
READ_ONLY_OPS = ("status", "jobs", "workers", "health", "watch")
"""API operations an observer may call for any user."""


class TlsFiles(msgspec.Struct, kw_only=True, omit_defaults=True):
    ca: str = ""
    """CA bundle that signed the server (and, for mTLS, the clients)."""
    cert: str = ""
    """This identity's client certificate (mTLS)."""
    key: str = ""


class Credentials(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One identity's credentials file."""

    name: str
    role: Role
    seed: str = ""
    """The nkey seed (`SU...`): whoever holds it is this identity. Never leaves the file.
    Empty for a profile of a stack without authentication (`cumulus up --insecure`)."""
    url: str = ""
    """Where the bus is (a profile is credentials plus where to use them)."""
    workers: list[str] = []
    """For a worker identity: the worker ids it acts for."""
    tls: TlsFiles | None = None

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.role, self.name)

    @property
    def public_key(self) -> str:
        return public_key(self.seed)


def inbox_prefix(role: Role, name: str) -> str:
    """A private inbox per identity: `_INBOX.<role>.<name>`; replies to one identity's
    requests cannot be read by another."""
    return f"_INBOX.{role}.{name}"


def new_seed() -> str:
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    return str(nkeys.from_seed(seed.encode()).public_key.decode())


def durables(worker_id: str) -> tuple[str, ...]:
    """The durable consumers of a worker's services (services/partitioner, services/runner)."""
    return (f"partitioner-{worker_id}", f"runner-{worker_id}")


def _consumer_api(stream: str, durable: str) -> list[str]:
    """Using a durable consumer, not making one: a consumer create chooses its filter, so the
    scheduler makes a worker's consumers for it (`cumulus.consumers.<W>.create`), under the
    worker's own subjects only (shared/bus.py consumer_refusal)."""
    api = "$JS.API.CONSUMER"
    return [
        f"{api}.INFO.{stream}.{durable}",
        f"{api}.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _object_reader(bucket: str) -> list[str]:
    stream = f"OBJ_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def worker_subject(worker_id: str, event: str) -> str:
    """The subjects worker `worker_id` may publish event `event` of any job on."""
    if event == subjects.LOG_EVENT:
        return subjects.log("*", "*", worker_id)
    if event == subjects.RESULT_EVENT:
        return subjects.result("*", "*", worker_id, "*")
    return subjects.job("*", "*", worker_id, event)


def _worker_publish(workers: Iterable[str]) -> list[str]:
    allow = ["$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES", "cumulus.dead.>"]
    for w in workers:
        allow += [worker_subject(w, name) for name in WORKER_JOB_EVENTS]
        allow += [f"workers.{w}.{name}" for name in WORKER_EVENTS]
        allow.append(subjects.secrets_request(w))
        allow.append(subjects.consumer_request(w))
        for durable in durables(w):
            allow += _consumer_api(subjects.JOBS_STREAM, durable)
    allow += _object_reader(subjects.CODE_BUCKET)
    allow += _map_reader()
    return allow


def _map_reader() -> list[str]:
    """A warm map's runner pulls and acknowledges the map's inputs (`map-<job>`, made by the
    gateway) and asks how many are left; it creates and deletes no consumer."""
    api, stream = "$JS.API.CONSUMER", subjects.MAPIN_STREAM
    return [f"{api}.INFO.{stream}.*", f"{api}.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>"]


def _health(services: Iterable[str], instances: Iterable[str], roll_call: bool) -> list[str]:
    """Health subjects (shared/health.py) of `services` under each of `instances` ("*": any),
    and with `roll_call` the subjects every instance answers."""
    out = [subjects.health(s, i) for s in services for i in instances]
    return out + ([subjects.health(s) for s in services] if roll_call else [])


HEALTH_MICRO = ["$SRV.*", "$SRV.*.cumulus-health", "$SRV.*.cumulus-health.*"]
"""The micro discovery subjects (`nats micro ls`) of the `cumulus-health` service."""


def permissions(creds: Credentials) -> dict[str, Any]:
    """The nats-server `permissions` block of one identity."""
    inbox = f"{creds.inbox_prefix}.>"
    publish: list[str]
    subscribe: list[str]
    responses = False
    if creds.role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if creds.role == "user":
        # `$JS.FC.>`: answering the flow-control requests of its watch replays (the gateway's
        # push consumers into its inbox); not `allow_responses`, which would let a user answer
        # a service's publish in JetStream's place (a forged ack) for events it can read.
        # `mapin.U.>`: the inputs of its own warm maps (docs/map.md), straight to their queue.
        publish = [f"cumulus.api.{creds.name}.>", "$JS.FC.>", f"mapin.{creds.name}.>"]
        subscribe = [f"jobs.{creds.name}.>", f"logs.{creds.name}.>", inbox]
    elif creds.role == "observer":
        publish = [f"cumulus.api.*.{op}" for op in READ_ONLY_OPS]
        publish += ["cumulus.observe.>", "$SRV.>", "$JS.FC.>", f"{subjects.HEALTH_PREFIX}.>"]
        subscribe = ["jobs.>", "logs.>", "results.>", "workers.>", "cumulus.dead.>", inbox]
    elif creds.role == "worker":
        mine = _health(WORKER_SERVICES, creds.workers, roll_call=False)
        publish = _worker_publish(creds.workers) + mine
        subscribe = [inbox, *mine, *_health(WORKER_SERVICES, (), roll_call=True), *HEALTH_MICRO]
        responses = True  # health answers only: it subscribes to nothing else with a reply
    elif creds.role == "gateway":
        publish = [f"jobs.*.*.{subjects.NO_WORKER}.{name}" for name in GATEWAY_JOB_EVENTS]
        publish += ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$O.>", "cumulus.dead.>"]
        publish += ["$KV.cumulus-secrets.>"]  # users' secrets, ciphertext (gateway/secrets.py)
        publish += ["cumulus.scheduler.>", "$SRV.>"]
        subscribe = ["cumulus.api.*.*", "cumulus.api.*.upload.*", "cumulus.observe.>"]
        subscribe += ["cumulus.secrets.*.get"]
        subscribe += ["$SRV.>", inbox]
        health = _health(["gateway"], ["*"], roll_call=True)
        publish += health
        subscribe += health
        responses = True
    else:  # scheduler
        publish = [f"jobs.*.*.*.{name}" for name in SCHEDULER_JOB_EVENTS]
        publish += [f"workers.*.{name}" for name in SCHEDULER_WORKER_EVENTS]
        # The election marker and the lease (services/scheduler/lease.py).
        publish += [subjects.ELECTED, f"$KV.{subjects.LEASE_BUCKET}.>"]
        publish += ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "cumulus.dead.>", "$SRV.>"]
        subscribe = ["cumulus.scheduler.>", "cumulus.consumers.*.create", "$SRV.>", inbox]
        health = _health(["scheduler"], ["*"], roll_call=True)
        publish += health
        subscribe += health
        responses = True
    block: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if responses:
        block["allow_responses"] = True
    return block


# -- the identities of one installation --------------------------------------------------


@dataclass
class AuthDir:
    """The identities of one installation, kept in a directory (mode 0700):

    `<dir>/creds/<role>-<name>.json`  each identity's credentials (0600)
    `<dir>/authorization.conf`        the nats-server `authorization` block (public keys only)
    """

    root: Path
    url: str = ""
    tls: TlsFiles | None = None
    """Server CA (and client certificates, by identity name under `<root>/tls/`) when TLS is on."""
    ca_dir: Path | None = None
    """Where the CA that signs client certificates is (`ca.crt`, `ca.key`; shared/certs.py);
    None: `<root>/tls`. With TLS on, `ensure` issues each identity its client certificate."""
    _creds: dict[str, Credentials] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        (self.root / "creds").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for path in sorted((self.root / "creds").glob("*.json")):
            creds = load_credentials(path)
            self._creds[self._key(creds.role, creds.name)] = creds

    @staticmethod
    def _key(role: Role, name: str) -> str:
        return f"{role}-{name}"

    def path(self, role: Role, name: str) -> Path:
        return self.root / "creds" / f"{self._key(role, name)}.json"

    def ensure(self, role: Role, name: str, workers: Iterable[str] = ()) -> Path:
        """The credentials file of this identity, made (with a new key) if it is missing.
        Render and reload the server's authorization afterwards for it to take effect."""
        if role not in ROLES:
            raise InvalidArgument(f"Unknown role {role!r}: one of {', '.join(ROLES)}")
        if not subjects.valid_token(name):
            raise InvalidArgument(
                f"Invalid identity name {name!r}: use letters, digits, '-' and '_'"
            )
        key = self._key(role, name)
        existing = self._creds.get(key)
        wanted = sorted(set(workers))
        tls = self._tls_for(role, name)
        if (
            existing is None
            or existing.url != self.url
            or existing.workers != wanted
            or existing.tls != tls
        ):
            seed = existing.seed if existing else new_seed()
            creds = Credentials(name=name, role=role, seed=seed, url=self.url, workers=wanted)
            if tls is not None:
                creds.tls = tls
            write_credentials(self.path(role, name), creds)
            self._creds[key] = creds
        return self.path(role, name)

    def _tls_for(self, role: Role, name: str) -> TlsFiles | None:
        if self.tls is None:
            return None
        cert = self.root / "tls" / f"{role}-{name}.crt"
        key = self.root / "tls" / f"{role}-{name}.key"
        ca_dir = self.ca_dir or self.root / "tls"
        if not (cert.exists() and key.exists()) and (ca_dir / "ca.key").exists():
            from shared import certs

            certs.issue(ca_dir, f"{role}-{name}", out=self.root / "tls")
        if cert.exists() and key.exists():
            return TlsFiles(ca=self.tls.ca, cert=str(cert), key=str(key))
        return TlsFiles(ca=self.tls.ca)

    def identities(self) -> list[Credentials]:
        return list(self._creds.values())

    def authorization(self) -> dict[str, Any]:
        """The nats-server `authorization` block: each identity's public key and permissions."""
        users = [
            {"nkey": c.public_key, "permissions": permissions(c)}
            for c in sorted(self._creds.values(), key=lambda c: (c.role, c.name))
        ]
        return {"users": users}


def write_credentials(path: Path, creds: Credentials) -> None:
    """Write a credentials file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(creds)))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_credentials(path: str | Path) -> Credentials:
    """Read a credentials file; refuse one that others may read (like ssh does a key)."""
    p = Path(os.path.expanduser(str(path)))
    try:
        mode = p.stat().st_mode & 0o077
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read credentials {p}: {exc.strerror or exc}", key="nats.credentials"
        ) from None
    if mode:
        raise ConfigError(
            f"credentials {p} are readable by others (mode {oct(mode)}): chmod 600 {p}",
            key="nats.credentials",
        )
    try:
        creds = msgspec.json.decode(data, type=Credentials)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"invalid credentials file {p}: {exc}", key="nats.credentials") from None
    if creds.tls is not None:
        creds.tls = _beside(creds.tls, p.parent)
    return creds


def _beside(tls: TlsFiles, where: Path) -> TlsFiles:
    """TLS files named relative to the credentials file (a bundle `cumulus users add --out`
    wrote) are found beside it."""

    def resolve(name: str) -> str:
        return str(where / name) if name and not os.path.isabs(name) else name

    return TlsFiles(ca=resolve(tls.ca), cert=resolve(tls.cert), key=resolve(tls.key))


def connect_options(creds: Credentials | None) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` that present this identity (and TLS files)."""
    if creds is None:
        return {}
    options: dict[str, Any] = {"inbox_prefix": creds.inbox_prefix}
    if creds.seed:
        options["nkeys_seed_str"] = creds.seed
    if creds.tls is not None and creds.tls.ca:
        options["tls"] = client_ssl_context(creds.tls)
    return options


class _SslEofNoise(logging.Filter):
    """nats-py's protocol answers True to `eof_received`, which asyncio warns about on every
    TLS connection it closes; the warning says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


_SSL_EOF_NOISE = _SslEofNoise()


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    logging.getLogger("asyncio").addFilter(_SSL_EOF_NOISE)  # once: the same filter object
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    if tls.cert and tls.key:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def server_tls(cert: Path, key: Path, ca: Path) -> dict[str, Any]:
    """nats-server's `tls` block: its certificate, and a certificate from every client signed
    by `ca` (mTLS: `verify`), the handshake within 2 s."""
    return {
        "cert_file": str(cert),
        "key_file": str(key),
        "ca_file": str(ca),
        "verify": True,
        "timeout": 2,
    }


def server_config(
    *,
    host: str,
    port: int,
    store_dir: Path,
    authorization: dict[str, Any] | None,
    tls: dict[str, Any] | None = None,
    monitor_port: int = 0,
) -> str:
    """A nats-server config file (JSON is valid nats-server config syntax); with
    `monitor_port`, its HTTP monitoring (`/healthz`) on loopback."""
    config: dict[str, Any] = {
        "host": host,
        "port": port,
        "jetstream": {"store_dir": str(store_dir)},
    }
    if monitor_port:
        config["http"] = f"127.0.0.1:{monitor_port}"
    if authorization is not None:
        config["authorization"] = authorization
    if tls is not None:
        config["tls"] = tls
    return json.dumps(config, indent=2)
