"""`cumulus doctor`: check what a deployment needs and print each problem with its fix.

    cumulus doctor [--config F] [--data-dir D] [--profile P] [--json] [--timeout S]

Checks, in order, each `ok`, `warn` or `FAIL` (or `skip` when an earlier failure leaves it
nothing to look at):

- `credentials`, `tls`: the profile's identity file, and its TLS files where it names them
  (readable, the certificate valid for more than TLS_WARN_DAYS);
- `nats`: nats-server answers with the profile's identity; `jetstream`: JetStream is on, and
  `streams`/`consumers`: every stream and the code bucket exist, each service's durable consumer
  too, and none is far behind (these need the operator's profile: a user's cannot read them);
- `services`: the gateway answers and a scheduler leads; each service's own readiness where its
  health endpoint answers (shared/health.py);
- `workers`: at least one is registered, each ready and heartbeating; `clock`: each worker's
  clock against the bus's (its last heartbeat's time against when the server stored it);
- `docker`, `swarm`, `job image`, `wheelhouse`: where the configuration's backend needs them;
- `ssh <worker>`: each agentless worker (`ssh.workers`) accepts the configured key;
- `disk`: free space on the data dir.

Exit status 0 when nothing FAILed (warnings included), 1 otherwise, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from cumulus import AsyncClient, RetryPolicy
from cumulus.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from shared import auth, bus, subjects
from shared import config as config_mod
from shared.config import Config
from shared.errors import ConfigError, CumulusError

Status = Literal["ok", "warn", "FAIL", "skip"]

TLS_WARN_DAYS = 14
"""A certificate expiring sooner than this is a warning."""
LAG_WARN = 1000
"""Events a durable consumer may have pending before it is called behind."""
SKEW_WARN_S = 2.0
"""Clock difference between a worker and the bus beyond which placements and deadlines drift."""
DISK_FAIL_BYTES = 1 << 30
"""Free space on the data dir below which stores and job directories fail to write."""
DISK_WARN_FRACTION = 0.10
ASK_AS_OPERATOR = "run doctor with the operator's profile (`--profile admin`) for these checks"


@dataclass
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Doctor:
    config: Config
    profile: str | None
    url: str | None
    timeout: float
    findings: list[Finding]
    role: str = ""
    """The profile's role (shared/auth.py); "" without an identity."""
    answered: dict[str, list[Any]] | None = None
    """Service -> the health reports its instances gave (None: not asked)."""

    def add(self, check: str, status: Status, detail: str, fix: str = "") -> None:
        self.findings.append(Finding(check, status, detail, fix))


# -- local checks --------------------------------------------------------------------------


def check_credentials(doc: Doctor) -> auth.Credentials | None:
    from cumulus import _profiles

    try:
        creds, _ = _profiles.resolve(doc.profile)
    except (CumulusError, OSError, ValueError) as exc:
        message = exc.message if isinstance(exc, CumulusError) else str(exc)
        doc.add(
            "credentials",
            "FAIL",
            f"profile {doc.profile or 'default'}: {message}",
            "name a profile that exists (`cumulus profile list`); an operator makes one with "
            "`cumulus users add NAME`",
        )
        return None
    if creds is None:
        doc.add("credentials", "warn", "no identity: connecting without credentials (open bus)")
        return None
    doc.role = creds.role
    doc.add("credentials", "ok", f"{creds.role} {creds.name!r}, for {creds.url}")
    if creds.tls is not None:
        check_tls(doc, creds.tls)
    return creds


def check_tls(doc: Doctor, tls: auth.TlsFiles) -> None:
    for label, path in (("CA", tls.ca), ("certificate", tls.cert), ("key", tls.key)):
        if path and not os.access(path, os.R_OK):
            doc.add(
                "tls",
                "FAIL",
                f"the {label} {path} cannot be read",
                "copy the TLS files the operator issued (`cumulus certs issue`) to that path",
            )
            return
    if not tls.cert:
        doc.add("tls", "ok", f"server verified by {tls.ca}")
        return
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    days = left.total_seconds() / 86400
    if days <= 0:
        doc.add(
            "tls",
            "FAIL",
            f"the certificate {tls.cert} expired {-days:.0f} days ago",
            "issue a new one: `cumulus certs issue CA_DIR NAME`",
        )
    elif days < TLS_WARN_DAYS:
        doc.add(
            "tls",
            "warn",
            f"the certificate {tls.cert} expires in {days:.0f} days",
            "issue a new one before then: `cumulus certs issue CA_DIR NAME`",
        )
    else:
        doc.add("tls", "ok", f"client certificate valid for {days:.0f} more days")


def check_disk(doc: Doctor) -> None:
    path = doc.config.data_path
    probe = path if path.exists() else path.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        doc.add("disk", "FAIL", f"{path}: {exc}", "create the data dir or fix `data_dir`")
        return
    free = usage.free / (1 << 30)
    detail = f"{path}: {free:.1f} GiB free of {usage.total / (1 << 30):.1f} GiB"
    if usage.free < DISK_FAIL_BYTES:
        doc.add("disk", "FAIL", detail, "free space there: stores and job directories need it")
    elif usage.free < DISK_WARN_FRACTION * usage.total:
        doc.add("disk", "warn", detail, "free space there before the streams fill it")
    else:
        doc.add("disk", "ok", detail)


def _uses_docker(config: Config) -> bool:
    return config.worker.backend in ("docker", "swarm", "auto")


def check_docker(doc: Doctor) -> None:
    """The engine, Swarm, the job image and the wheelhouse, where the backend needs them."""
    config = doc.config
    if not _uses_docker(config):
        doc.add("docker", "skip", f"worker.backend is {config.worker.backend}: not needed")
        return
    must = config.worker.backend != "auto"
    try:
        import docker

        engine = docker.from_env(timeout=max(1, int(doc.timeout)))
        info = engine.info()
    except Exception as exc:  # the SDK raises several kinds; each means "no engine"
        doc.add(
            "docker",
            "FAIL" if must else "warn",
            f"no Docker engine answers ({type(exc).__name__}: {str(exc)[:160]})",
            "start it (`systemctl start docker`) or set DOCKER_HOST"
            + ("" if must else "; `auto` runs jobs as processes meanwhile"),
        )
        return
    doc.add("docker", "ok", f"engine {info.get('ServerVersion', '?')} ({info.get('Name', '')})")
    if config.worker.backend == "swarm":
        _check_swarm(doc, info)
    _check_image(doc, engine, must)
    _check_wheelhouse(doc)


def _check_swarm(doc: Doctor, info: dict[str, Any]) -> None:
    swarm = info.get("Swarm") or {}
    state = swarm.get("LocalNodeState", "inactive")
    if state != "active":
        doc.add(
            "swarm",
            "FAIL",
            f"this engine is not in a Swarm (state {state})",
            "`docker swarm init` on the manager, `docker swarm join` on the others",
        )
    elif not swarm.get("ControlAvailable") and not doc.config.container.swarm_manager:
        doc.add(
            "swarm",
            "FAIL",
            "this engine is a Swarm worker node and container.swarm_manager is not set",
            "set container.swarm_manager to a manager's Docker API (docs/deploy.md)",
        )
    else:
        doc.add("swarm", "ok", f"node {swarm.get('NodeID', '?')[:12]} ({state})")


def _check_image(doc: Doctor, engine: Any, must: bool) -> None:
    name = doc.config.container.image
    try:
        image = engine.images.get(name)
    except Exception as exc:
        doc.add(
            "job image",
            "FAIL" if must else "warn",
            f"{name} is not on this engine ({type(exc).__name__})",
            "build it: `bash infra/images/build-images.sh` (on every node that runs jobs, or "
            "`docker save | docker load` it there)"
            + ("" if must else "; `auto` runs jobs as processes meanwhile"),
        )
        return
    doc.add("job image", "ok", f"{name} is {image.id}")


def _check_wheelhouse(doc: Doctor) -> None:
    path = doc.config.container.wheelhouse
    if not path:
        doc.add("wheelhouse", "skip", "none set: requirements install from the index")
        return
    where = Path(os.path.expanduser(path))
    if not where.is_dir():
        doc.add(
            "wheelhouse",
            "FAIL",
            f"container.wheelhouse {where} is not a directory",
            "create it with the wheels jobs need (`pip download -d DIR …`) or unset it",
        )
        return
    mode = where.stat().st_mode
    wheels = len(list(where.glob("*.whl")))
    if not mode & stat.S_IROTH or not mode & stat.S_IXOTH:
        doc.add(
            "wheelhouse",
            "FAIL",
            f"{where} is not readable by every user (mode {stat.filemode(mode)})",
            f"`chmod o+rx {where}`: jobs install from it as their own users",
        )
    elif not wheels:
        doc.add("wheelhouse", "warn", f"{where} holds no wheels", "put the jobs' wheels there")
    else:
        doc.add("wheelhouse", "ok", f"{where}: {wheels} wheels")


async def check_ssh(doc: Doctor) -> None:
    from services.partitioner.ssh import SshPool, parse_address, parse_workers

    try:
        workers = parse_workers(doc.config.ssh.workers)
    except ValueError as exc:
        doc.add("ssh", "FAIL", str(exc), "fix ssh.workers (docs/config.md)")
        return
    pool = SshPool(doc.config.ssh)
    try:
        for worker_id, address in sorted(workers.items()):
            target = parse_address(address, doc.config.ssh.user, doc.config.ssh.port)
            try:
                await pool.connection(target)
            except CumulusError as exc:
                doc.add(
                    f"ssh {worker_id}",
                    "FAIL",
                    exc.message,
                    f"check sshd on {target.host}:{target.port}, the key {doc.config.ssh.key_path} "
                    "in its authorized_keys, and ssh.known_hosts",
                )
            else:
                doc.add(f"ssh {worker_id}", "ok", f"{target} accepts the key")
    finally:
        await pool.close()


# -- checks over the bus -------------------------------------------------------------------


async def check_bus(doc: Doctor) -> None:
    """Everything that needs a connection: one, for all of them."""
    started = time.monotonic()
    client = AsyncClient(doc.url, profile=doc.profile, retry=RetryPolicy(max_attempts=1))
    try:
        await asyncio.wait_for(client.connect(), doc.timeout + 1.0)
    except (CumulusError, TimeoutError) as exc:
        message = (
            exc.message
            if isinstance(exc, CumulusError)
            else f"no answer from {client.nats_url} within {doc.timeout + 1.0:g} s"
        )
        doc.add(
            "nats",
            "FAIL",
            message,
            "start nats-server (`cumulus up`, or its unit) and check the profile's URL "
            "(`cumulus profile show`)",
        )
        for check in ("jetstream", "services", "workers", "clock"):
            doc.add(check, "skip", "needs the bus")
        return
    try:
        doc.add("nats", "ok", f"{client.nats_url} answered in {time.monotonic() - started:.2f} s")
        await _check_jetstream(doc, client)
        if not await _check_services(doc, client):
            for check in ("workers", "clock"):
                doc.add(check, "skip", "needs the gateway and the scheduler")
            return
        workers = await _check_workers(doc, client)
        _check_runners(doc, workers)
        await _check_clocks(doc, client, workers)
    finally:
        await client.close()


async def _check_jetstream(doc: Doctor, client: AsyncClient) -> None:
    js = client.nc.jetstream(timeout=doc.timeout)
    try:
        account = await js.account_info()
    except Exception as exc:
        if "permission" in str(exc).lower() or isinstance(exc, TimeoutError):
            doc.add(
                "jetstream",
                "skip",
                "this profile may not read JetStream's state",
                ASK_AS_OPERATOR,
            )
            return
        doc.add(
            "jetstream",
            "FAIL",
            f"JetStream does not answer ({exc})",
            "run nats-server with JetStream on (`-js`, or `jetstream {}` in its config)",
        )
        return
    doc.add("jetstream", "ok", f"{account.streams} streams, {account.consumers} consumers")
    names = [str(s.name) for s in bus.streams(doc.config.retention)]
    names.append(f"OBJ_{subjects.CODE_BUCKET}")
    missing = []
    for name in names:
        with contextlib.suppress(Exception):
            await js.stream_info(name)
            continue
        missing.append(name)
    if missing:
        doc.add(
            "streams",
            "FAIL",
            f"missing: {', '.join(missing)}",
            "start the scheduler and the gateway: they create the streams at start",
        )
    else:
        doc.add("streams", "ok", ", ".join(names))
    await _check_consumers(doc, js)


CONSUMERS = (
    (subjects.JOBS_STREAM, "gateway", "gateway"),
    (subjects.JOBS_STREAM, "scheduler-jobs", "scheduler"),
    (subjects.WORKERS_STREAM, "scheduler-workers", "scheduler"),
)
"""(stream, durable prefix, the service that keeps it) of the control plane."""


async def _consumers(js: Any, stream: str) -> list[Any]:
    try:
        return list(await js.consumers_info(stream))
    except Exception:
        return []


async def _check_consumers(doc: Doctor, js: Any) -> None:
    by_stream = {
        s: await _consumers(js, s) for s in (subjects.JOBS_STREAM, subjects.WORKERS_STREAM)
    }
    problems: list[str] = []
    for stream, prefix, service in CONSUMERS:
        found = [c for c in by_stream[stream] if c.name.startswith(prefix)]
        if not found:
            problems.append(f"no {prefix} consumer on {stream} (the {service} never started)")
    behind = [
        f"{c.name} {c.num_pending} behind"
        for infos in by_stream.values()
        for c in infos
        if (c.num_pending or 0) > LAG_WARN and (c.config.durable_name or "")
    ]
    if problems:
        doc.add("consumers", "FAIL", "; ".join(problems), "start that service")
    elif behind:
        doc.add(
            "consumers",
            "warn",
            "; ".join(behind),
            "a service is slow or stopped: `cumulus health --service NAME` says which",
        )
    else:
        count = sum(len(v) for v in by_stream.values())
        doc.add("consumers", "ok", f"{count} consumers, none more than {LAG_WARN} behind")


async def _check_services(doc: Doctor, client: AsyncClient) -> bool:
    """Whether the gateway and a scheduler answer (the worker checks ask them)."""
    try:
        health = await client.health()
    except CumulusError as exc:
        doc.add(
            "services",
            "FAIL",
            f"the gateway does not answer ({exc.code}: {exc.message})",
            "start the gateway (`cumulus gateway`, or its unit) and see its log",
        )
        return False
    if health.scheduler != "SERVING":
        doc.add(
            "services",
            "FAIL",
            "the gateway answers but no scheduler does",
            "start the scheduler (`cumulus scheduler`, or its unit) and see its log",
        )
        return False
    doc.add("services", "ok", f"gateway {health.version} up {health.uptime_s:.0f} s; scheduler")
    await _check_readiness(doc, client)
    return True


async def _check_readiness(doc: Doctor, client: AsyncClient) -> None:
    """Each service's own readiness, from its health endpoint (shared/health.py): every
    instance answers a roll call on `cumulus.health.<service>`."""
    from cumulus.cli import health as ask
    from shared import health

    if doc.role == "user":  # a user may not ask the services (shared/auth.py)
        doc.add("service health", "skip", "this profile may not ask the services", ASK_AS_OPERATOR)
        return
    body = msgspec.json.encode(health.HealthRequest())
    answered: dict[str, list[health.Report]] = {}
    for service in health.SERVICES:
        try:
            replies = await ask.roll_call(client.nc, subjects.health(service), body, doc.timeout)
        except Exception as exc:  # a refusal of this profile, or the bus going away
            doc.add("service health", "skip", f"cannot ask: {exc}", ASK_AS_OPERATOR)
            return
        reports = []
        for msg in replies or []:
            with contextlib.suppress(Exception):
                reports.append(ask.reply_report(msg))
        answered[service] = reports
    for service in ("gateway", "scheduler"):
        if not answered[service]:
            doc.add(
                f"service {service}",
                "FAIL",
                f"no {service} answers its health check ({subjects.health(service)})",
                f"start the {service}; if it runs, it predates health checks: upgrade it",
            )
    if not any(answered[s] for s in health.WORKER_SIDE):
        doc.add(
            "service runner",
            "FAIL",
            "no worker agent, partitioner or runner answers its health check",
            "start `cumulus worker` on each GPU host",
        )
    doc.answered = answered
    for reports in answered.values():
        for report in reports:
            name = f"service {report.service} {report.instance}".strip()
            if report.ready:
                lag = sum(report.lag.values())
                doc.add(name, "ok", f"ready (lag {lag}, up {report.uptime_s:.0f} s)")
            else:
                why = "; ".join(report.problems) or "not ready"
                doc.add(name, "FAIL", why, f"see that {report.service}'s log (pid {report.pid})")


async def _check_workers(doc: Doctor, client: AsyncClient) -> list[Any]:
    try:
        listing = await client.worker_list()
    except CumulusError as exc:
        doc.add("workers", "FAIL", f"{exc.code}: {exc.message}", "see the scheduler's log")
        return []
    workers = list(listing.workers)
    if not workers:
        doc.add(
            "workers",
            "FAIL",
            "no worker is registered: jobs wait forever",
            "start `cumulus worker` on each GPU host (docs/deploy.md)",
        )
        return []
    down = [w for w in workers if w.status != "ready"]
    now = time.time()
    late = 3 * doc.config.worker.heartbeat_s
    stale = [w for w in workers if w.status == "ready" and w.last_seen and now - w.last_seen > late]
    if down:
        doc.add(
            "workers",
            "FAIL",
            "; ".join(f"{w.worker_id} {w.status} {w.down_reason}".strip() for w in down),
            "restart the worker agent on those hosts, or see its log",
        )
    elif stale:
        doc.add(
            "workers",
            "warn",
            ", ".join(f"{w.worker_id} silent {now - w.last_seen:.0f} s" for w in stale),
            "its heartbeats are late: is its agent busy or its network slow?",
        )
    else:
        doc.add("workers", "ok", f"{len(workers)} ready: {', '.join(w.worker_id for w in workers)}")
    return workers


def _check_runners(doc: Doctor, workers: list[Any]) -> None:
    """A registered worker whose runner is gone still heartbeats (its partitioner does) but
    never starts a job: each needs a runner (or a worker agent) answering as itself."""
    if doc.answered is None:
        return
    running = {r.instance for s in ("runner", "worker") for r in doc.answered.get(s, [])}
    for worker in workers:
        if worker.worker_id not in running:
            doc.add(
                f"service runner {worker.worker_id}",
                "FAIL",
                f"worker {worker.worker_id} is registered but no runner answers for it: its "
                "jobs are placed and never start",
                f"start its runner (`cumulus worker` on {worker.hostname or 'its host'})",
            )


async def _check_clocks(doc: Doctor, client: AsyncClient, workers: list[Any]) -> None:
    """A worker's clock against the bus's: its last heartbeat's `ts` (the worker's clock)
    against when the server stored it (the server's clock); the difference also holds the
    network's delay, milliseconds on a LAN."""
    if not workers:
        return
    js = client.nc.jetstream(timeout=doc.timeout)
    skews: list[tuple[str, float]] = []
    for worker in workers:
        subject = subjects.worker(worker.worker_id, "heartbeat")
        try:
            msg = await js.get_last_msg(subjects.WORKERS_STREAM, subject)
            sent = float(json.loads(msg.data or b"{}").get("ts", 0.0))
        except Exception:
            continue
        stored = _stored_at(msg.time)
        if sent and stored:
            skews.append((worker.worker_id, sent - stored))
    if not skews:
        doc.add("clock", "skip", "no heartbeat readable with this profile")
        return
    worst_id, worst = max(skews, key=lambda item: abs(item[1]))
    detail = f"largest difference {worst:+.3f} s ({worst_id}) over {len(skews)} workers"
    if abs(worst) > SKEW_WARN_S:
        doc.add("clock", "warn", detail, "run NTP (chrony, systemd-timesyncd) on every host")
    else:
        doc.add("clock", "ok", detail)


def _stored_at(value: object) -> float:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        text = value.rstrip("Z")
        whole, _, frac = text.partition(".")
        stamp = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC).timestamp()
        return stamp + (float(f"0.{frac}") if frac else 0.0)
    return 0.0


# -- the command ---------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a deployment: the bus, streams, services, workers, Docker, SSH, disk",
        description="Each problem is printed with its fix; exit 1 when one check FAILs. Run "
        "with the operator's profile (--profile admin) to check streams and consumers too.",
    )
    p.add_argument("--config", metavar="FILE", help="the deployment's config (docs/config.md)")
    p.add_argument("--data-dir", metavar="DIR", help="the data dir to check (default: config's)")
    p.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds per check (default 5)"
    )
    p.add_argument("--json", action="store_true", help="{ok, checks: [{check, status, ...}]}")


async def diagnose(
    config: Config, profile: str | None, timeout: float = 5.0, url: str | None = None
) -> list[Finding]:
    """Every check, in order; never raises for what it finds."""
    doc = Doctor(config, profile, url, timeout, [])
    check_credentials(doc)
    await check_bus(doc)
    check_docker(doc)
    if doc.config.ssh.workers:
        await check_ssh(doc)
    check_disk(doc)
    return doc.findings


def _print(findings: list[Finding]) -> None:
    problems = sum(f.status == "FAIL" for f in findings)
    warnings = sum(f.status == "warn" for f in findings)
    width = max(len(f.check) for f in findings)
    for f in findings:
        print(f"  {f.status:<4}  {f.check:<{width}}  {f.detail}")
        if f.fix and f.status in ("FAIL", "warn"):
            print(f"  {'':<4}  {'':<{width}}  fix: {f.fix}")
    print(f"cumulus doctor: {len(findings)} checks, {problems} problem(s), {warnings} warning(s)")


async def doctor(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    if args.data_dir:
        environ["CUMULUS_DATA_DIR"] = args.data_dir
    try:
        config = config_mod.load(args.config, environ=environ)
    except ConfigError as exc:
        print(f"cumulus doctor: {exc.message}")
        return EXIT_USAGE
    findings = await diagnose(config, args.profile, args.timeout, args.url)
    failed = any(f.status == "FAIL" for f in findings)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(f) for f in findings]}, indent=2))
    else:
        _print(findings)
    return EXIT_FAILED if failed else EXIT_OK
