"""`cumulus health --service NAME`: is one Cumulus process alive, and (`--ready`) ready?

For supervisors: exit 0 healthy, 1 not (Docker's HEALTHCHECK and systemd read only that), 2
bad usage. The question goes over the bus to the process's `cumulus-health` micro service
(`cumulus.health.<service>.<instance>`; without an instance, the roll call that every instance
answers: all that answer must be healthy). When the bus cannot be reached, or nothing answers
there, and the process's metrics port is known (`--url http://HOST:PORT`, or the config's
`metrics_port` with `--config`), its `/healthz` or `/readyz` answers instead. Otherwise one
line says why, within `--timeout`. shared/health.py says what alive and ready mean.

`--config FILE` asks as the process itself would be configured: its bus, its credentials, its
instance (config `instance`, a worker's id) and its metrics port, so a container's HEALTHCHECK
or a unit's `ExecStartPost=` needs nothing else (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import nats.errors

from cumulus.cli.exits import EXIT_FAILED, EXIT_OK, UsageError
from shared import auth, subjects
from shared.errors import ERROR_CODE_HEADER, ERROR_HEADER
from shared.health import MAX_LAG, READY_WAIT_S, SERVICES, WORKER_SIDE, Report, instance_for

TIMEOUT_S = 3.0
GATHER_S = 0.3
"""After the first answer to a roll call, how long a quiet spell ends the gathering."""
RETRY_S = 1.0
"""With `--wait`: the pause between two checks."""


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `cumulus health` that ask one service (its parser is in parser.py)."""
    p.add_argument(
        "--service",
        choices=SERVICES,
        help="ask this service whether it is alive (exit 0) or not (exit 1): for supervisors",
    )
    p.add_argument(
        "--instance",
        metavar="ID",
        help="the one process to ask (config `instance`; a worker's id); default: with "
        "--config, the config's; else every instance answers, and all must be healthy",
    )
    p.add_argument(
        "--ready",
        action="store_true",
        help="ask for ready (connected, replayed, consumers caught up), not only alive",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="ask as this service's config says: its bus, credentials, instance, metrics port",
    )
    p.add_argument(
        "--url",
        dest="health_url",
        metavar="URL",
        help="http://HOST:PORT: the process's metrics port, asked when the bus cannot answer; "
        "nats://…: the bus to ask",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for an answer (default {TIMEOUT_S:g})",
    )
    p.add_argument(
        "--max-lag",
        type=int,
        default=MAX_LAG,
        metavar="N",
        help=f"with --ready: messages a consumer may be behind (default {MAX_LAG})",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="ask again each second until healthy, for up to S seconds (ExecStartPost=)",
    )


@dataclass
class Target:
    service: str
    instance: str
    """"": the roll call."""
    nats_url: str
    creds: auth.Credentials | None
    http_url: str
    """The process's metrics port (`http://host:port`); "": none known."""


@dataclass
class Outcome:
    reports: list[Report]
    via: str
    """Where the answers came from: "nats" or the metrics URL; "" when nothing answered."""
    why: str = ""
    """Why nothing answered (the lines tried, joined)."""


def _target(args: argparse.Namespace) -> Target:
    nats_url: str = args.url or ""
    http_url = ""
    given: str = args.health_url or ""
    if given.startswith(("http://", "https://")):
        http_url = given.rstrip("/")
    elif given.startswith(("nats://", "tls://")):
        nats_url = given
    elif given:
        raise UsageError(f"--url {given!r}: give http://HOST:PORT (a metrics port) or nats://…")
    if args.config:
        from shared import config as config_mod

        config = config_mod.load(args.config)
        path = config.nats.credentials
        if not http_url and config.metrics_port:
            host = config.metrics_bind
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            host = f"[{host}]" if ":" in host else host
            http_url = f"http://{host}:{config.metrics_port}"
        # A control-plane process without `instance` answers as "default" and to the roll
        # call, which also finds every copy when this shell lacks their $CUMULUS_INSTANCE.
        worker_side = args.service in WORKER_SIDE
        instance = instance_for(args.service, config) if worker_side else config.instance
        return Target(
            args.service,
            args.instance or instance,
            nats_url or config.nats.url,
            auth.load_credentials(path) if path else None,
            http_url,
        )
    from cumulus import AsyncClient

    client = AsyncClient(nats_url or None, None, profile=args.profile)  # resolves, no connect
    return Target(args.service, args.instance or "", client.nats_url, client.credentials, http_url)


async def _connect(t: Target, timeout: float) -> Any:
    """A connection without retries. nats-py tries its servers over and over until the
    timeout even without reconnects: once each server has failed, that is the answer."""
    servers = t.nats_url.split(",")
    errors: list[Exception] = []
    failed = asyncio.Event()

    async def seen(exc: Exception) -> None:
        errors.append(exc)
        if len(errors) >= len(servers):
            failed.set()

    connecting = asyncio.ensure_future(
        nats.connect(
            servers=servers,
            name="cumulus-health",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=max(0.1, min(2.0, timeout)),
            error_cb=seen,
            **auth.connect_options(t.creds),
        )
    )
    giving_up = asyncio.ensure_future(failed.wait())
    try:
        await asyncio.wait({connecting, giving_up}, timeout=timeout, return_when="FIRST_COMPLETED")
    finally:
        giving_up.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    await asyncio.gather(connecting, return_exceptions=True)
    raise errors[-1] if errors else TimeoutError(f"no answer within {timeout:g} s")


def _decode(data: bytes) -> Report:
    return msgspec.json.decode(data, type=Report)


async def _over_nats(t: Target, body: bytes, timeout: float) -> tuple[list[Report], str]:
    """The answers over the bus, or why there are none."""
    started = time.monotonic()
    try:
        nc = await _connect(t, timeout)
    except Exception as exc:
        return [], f"cannot reach the bus at {t.nats_url} ({str(exc) or type(exc).__name__})"
    left = max(0.1, timeout - (time.monotonic() - started))
    subject = subjects.health(t.service, t.instance)
    who = f"{t.service} {t.instance}" if t.instance else f"no {t.service}"
    try:
        if t.instance:
            try:
                msg = await nc.request(subject, body, timeout=left)
            except nats.errors.NoRespondersError:
                return [], f"no {who} answers on {subject}: is it running?"
            except nats.errors.TimeoutError:
                return [], _no_answer(subject, left)
            return [reply_report(msg)], ""
        replies = await roll_call(nc, subject, body, left)
        if replies is None:
            return [], f"{who} answers on {subject}: is one running?"
        if not replies:
            return [], _no_answer(subject, left)
        return [reply_report(m) for m in replies], ""
    except _ErrorReply as exc:
        return [], str(exc)
    finally:
        await nc.close()


def _no_answer(subject: str, timeout: float) -> str:
    return (
        f"no answer on {subject} within {timeout:.1f} s: is it running, and may this "
        "profile ask (operators, observers and the service's own identity may)?"
    )


class _ErrorReply(Exception):
    pass


def reply_report(msg: Any) -> Report:
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise _ErrorReply(f"{headers[ERROR_CODE_HEADER]}: {headers.get(ERROR_HEADER, '')}")
    return _decode(msg.data)


async def roll_call(nc: Any, subject: str, body: bytes, timeout: float) -> list[Any] | None:
    """Every answer to one request on `subject` (None: nobody listens there)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, body, reply=inbox)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(left, GATHER_S) if out else left)
            except nats.errors.TimeoutError:
                break
            if (msg.headers or {}).get("Status") == "503" and not msg.data:
                return out or None
            out.append(msg)
    finally:
        await sub.unsubscribe()
    return out


async def _over_http(t: Target, ready: bool, max_lag: int, timeout: float) -> Outcome:
    path = "/readyz" if ready else "/healthz"
    url = f"{t.http_url}{path}?max_lag={max_lag}&service={t.service}"

    def get() -> tuple[int, bytes]:
        try:
            # /readyz waits up to READY_WAIT_S for the process's loop, and says so itself.
            with urllib.request.urlopen(url, timeout=max(timeout, READY_WAIT_S + 1)) as reply:
                return int(reply.status), reply.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    try:
        status, data = await asyncio.to_thread(get)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Outcome([], "", f"nothing answers at {t.http_url} ({reason}): is it running?")
    try:
        body = json.loads(data)
        reports = msgspec.convert(body.get("services", []), list[Report])
    except (ValueError, AttributeError, msgspec.ValidationError):
        return Outcome([], "", f"{url} answered {status} without a health report")
    if status == 404 or not reports:
        return Outcome([], "", f"{url} answered {status}: {body.get('error') or body.get('note')}")
    return Outcome(reports, t.http_url)


async def ask(t: Target, ready: bool, max_lag: int, timeout: float) -> Outcome:
    """The answers: over the bus, else from the metrics port."""
    body = msgspec.json.encode({"max_lag": max_lag})
    reports, why = await _over_nats(t, body, timeout)
    if reports:
        return Outcome(reports, "nats")
    if not t.http_url:
        return Outcome([], "", why + "; give --url http://HOST:PORT to ask its metrics port")
    outcome = await _over_http(t, ready, max_lag, timeout)
    if not outcome.reports:
        outcome.why = f"{why}; {outcome.why}"
    return outcome


def healthy(report: Report, ready: bool) -> bool:
    return bool(report.ready) if ready else report.live


def line(report: Report, ready: bool) -> str:
    """`scheduler default: ready (lag 0, position 42, up 12 s)`, or what is wrong."""
    who = f"{report.service} {report.instance}".strip()
    if healthy(report, ready):
        lag = sum(report.lag.values())
        facts = ([f"lag {lag}"] if ready else []) + [
            f"position {report.position}",
            f"up {report.uptime_s:.0f} s",
            f"pid {report.pid}",
        ]
        return f"{who}: {'ready' if ready else 'alive'} ({', '.join(facts)})"
    state = "NOT READY" if ready and report.live else "NOT ALIVE"
    return f"{who}: {state}: {'; '.join(report.problems) or 'unknown'}"


def wants_service(args: argparse.Namespace) -> bool:
    """True when `cumulus health` asks one service (else it is the API's health)."""
    return bool(args.service or args.ready or args.instance or args.config or args.health_url)


async def service_health(args: argparse.Namespace) -> int:
    """`cumulus health --service NAME …`: print each instance's line; exit 0 or 1."""
    if not args.service:
        raise UsageError(f"--service is needed: one of {', '.join(SERVICES)}")
    if args.timeout <= 0 or args.max_lag < 0 or args.wait < 0:
        raise UsageError("--timeout must be above 0, --max-lag and --wait 0 or more")
    t = _target(args)
    deadline = time.monotonic() + args.wait
    while True:
        outcome = await ask(t, args.ready, args.max_lag, args.timeout)
        ok = bool(outcome.reports) and all(healthy(r, args.ready) for r in outcome.reports)
        if ok or time.monotonic() + RETRY_S > deadline:
            break
        await asyncio.sleep(RETRY_S)
    if args.json:
        print(
            json.dumps(
                {
                    "service": t.service,
                    "ok": ok,
                    "via": outcome.via,
                    "why": outcome.why,
                    "instances": msgspec.to_builtins(outcome.reports),
                }
            )
        )
    elif not outcome.reports:
        print(f"cumulus health: {t.service}: {outcome.why}", file=sys.stderr)
    else:
        for report in outcome.reports:
            print(line(report, args.ready), flush=True)
        if outcome.via != "nats":
            print(f"(answered by {outcome.via}: the bus did not)", flush=True)
    return EXIT_OK if ok else EXIT_FAILED
