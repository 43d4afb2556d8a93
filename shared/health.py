"""Is a service alive, is it ready: what a supervisor asks (Swarm's HEALTHCHECK, systemd).

Alive: its event loop turned within STALL_S (a ticker notes each turn, TICK_S apart), no
consumer failed, and it is not stopping or ending. Ready: alive, started (its event log
replayed, its consumers made), connected to the bus, its event log takes writes, and each
durable consumer at most `max_lag` messages behind (MAX_LAG by default; asked of the server
only when someone asks, never per event).

Three ways to ask, every answer made here:

- NATS: each process serves the micro service `cumulus-health` (shared/subjects.py):
  `cumulus.health.<service>.<instance>` is this process, `cumulus.health.<service>` a roll call
  every instance answers. Body `{max_lag?}`, reply a `Report` (JSON).
- HTTP: `/healthz` and `/readyz` beside `/metrics` on the metrics port (shared/metrics.py),
  200 or 503 with a short JSON body; `?service=NAME` picks one service of the process,
  `?max_lag=N` the bound. /healthz is answered in the HTTP server's thread, so it tells a
  stuck event loop; /readyz asks the loop, and a loop that does not answer within
  READY_WAIT_S is not ready.
- systemd (a unit with `Type=notify`, `WatchdogSec=`): with `$NOTIFY_SOCKET`, READY=1 once
  every service of the process is ready, then WATCHDOG=1 at each tick while all are alive.

`cumulus health --service NAME` (cumulus/cli/health.py) asks over NATS, and the metrics port
when the bus cannot answer. A process that runs no service (`cumulus up`) answers its metrics
port's /readyz with the checks it registered (`check_also`: its nats-server).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import nats.micro

from shared import api, subjects

if TYPE_CHECKING:
    from nats.aio.client import Client

    from shared.config import Config
    from shared.service import ConsumerSpec, EventService

log = logging.getLogger(__name__)

TICK_S = 1.0
"""How often a service's ticker notes that its event loop turns (and tells systemd so)."""
STALL_S = 10.0
"""A loop that has not turned for this long is stuck: the service is not alive."""
MAX_LAG = 1000
"""Messages a durable consumer may be behind for its service to be ready (by default)."""
LAG_TIMEOUT_S = 1.0
"""How long a readiness check waits for the server to say a consumer's lag."""
LAG_CACHE_S = 1.0
"""Lags asked this recently are used again: a supervisor asking often costs the bus little."""
READY_WAIT_S = 5.0
"""How long /readyz waits for the event loop to answer."""
VERSION = "0.1.0"
DEFAULT_INSTANCE = "default"
"""The instance token of a control-plane process with no config `instance` (one copy)."""
SERVICES = ("gateway", "scheduler", "partitioner", "runner", "worker")
"""What `cumulus.health.<service>` names: the four services and the worker agent (its
partitioner and runner in one process, services/worker.py)."""
WORKER_SIDE = ("partitioner", "runner", "worker")
"""Services whose instance is their worker id."""


class HealthRequest(msgspec.Struct, kw_only=True):
    max_lag: Annotated[int, msgspec.Meta(ge=0)] = MAX_LAG


class Report(msgspec.Struct, kw_only=True):
    """One service's (or the worker agent's) answer."""

    service: str
    instance: str
    live: bool
    ready: bool | None = None
    """None: not asked (/healthz answers liveness only)."""
    problems: list[str] = []
    """Why it is not alive, or not ready; empty when it is both (or alive, for /healthz)."""
    lag: dict[str, int] = {}
    """Durable consumer -> messages not yet applied (a readiness check only)."""
    position: int = 0
    """Events its log holds (the last one applied)."""
    outbox: int = 0
    """Events committed and not yet published."""
    loop_s: float = 0.0
    """Seconds since its event loop last turned."""
    uptime_s: float = 0.0
    pid: int = 0


@dataclass(eq=False)
class _Entry:
    """What this module keeps of one serving service (beside it: nothing on the service)."""

    instance: str
    loop: asyncio.AbstractEventLoop
    started: float = field(default_factory=time.monotonic)
    tick: float = field(default_factory=time.monotonic)
    lag: dict[str, int] = field(default_factory=dict)
    lag_at: float = -LAG_CACHE_S
    lag_error: str = ""


_entries: weakref.WeakKeyDictionary[Any, _Entry] = weakref.WeakKeyDictionary()
"""Each serving service (weakly: a service that is gone is forgotten) -> what is kept of it."""
_groups: dict[str, list[weakref.ref[Any]]] = {}
"""A name for several services of this process (`worker`: the agent's two)."""
_notified_ready = False
_last_notify = 0.0


def instance_for(service: str, config: Config) -> str:
    """The instance token `service` answers under with `config`: config `instance`, else the
    worker id for a worker's services, else DEFAULT_INSTANCE."""
    if config.instance:
        return str(config.instance)
    if service in WORKER_SIDE:
        return config.worker_id
    return DEFAULT_INSTANCE


def _instance(service: EventService[Any]) -> str:
    return instance_for(service.name, service.config)


# -- serving ---------------------------------------------------------------------------------


async def serve(service: EventService[Any]) -> None:
    """Once connected: note the loop, start the ticker, and answer on the bus (`cumulus.health.
    <name>.<instance>` and the roll call). A subscription the identity may not make is logged
    by the bus helpers; the metrics port still answers."""
    assert service.nc is not None
    entry = _Entry(_instance(service), asyncio.get_running_loop())
    _entries[service] = entry
    service.spawn(_tick(entry), name="health")

    async def answer(data: bytes) -> Report:
        return await report(service, api.decode_request(data, HealthRequest).max_lag)

    # Not kept here: the connection's subscriptions hold the micro service's handlers.
    try:
        await _micro(service.nc, service.name, entry.instance, answer)
    except Exception as exc:  # a health check never stops a start; the metrics port answers
        log.warning(
            "health not served on the bus",
            extra={"fields": {"service": service.name, "error": repr(exc)}},
        )


def group(name: str, services: Sequence[EventService[Any]]) -> None:
    """Name several services of this process as one (the worker agent, before they start):
    `/readyz?service=<name>` and systemd's READY=1 wait for all of them."""
    _groups[name] = [weakref.ref(s) for s in services]


async def serve_group(name: str, services: Sequence[EventService[Any]]) -> None:
    """Answer for the group `name` on the bus too, on its first service's connection."""
    group(name, services)
    nc = services[0].nc
    assert nc is not None
    instance = instance_for(name, services[0].config)

    async def answer(data: bytes) -> Report:
        return await report_group(name, api.decode_request(data, HealthRequest).max_lag)

    try:
        await _micro(nc, name, instance, answer)
    except Exception as exc:  # the metrics port and the services' own subjects still answer
        log.warning("health not served on the bus", extra={"fields": {"error": repr(exc)}})


async def _micro(
    nc: Client, name: str, instance: str, answer: Callable[[bytes], Awaitable[Report]]
) -> Any:
    micro = await nats.micro.add_service(
        nc,
        name="cumulus-health",
        version=VERSION,
        description=f"Cumulus {name} {instance}: alive and ready (docs/deploy.md)",
    )
    handler = api.endpoint(answer)
    await micro.add_endpoint(name=name, subject=subjects.health(name, instance), handler=handler)
    # A queue group of its own: every instance hears the roll call.
    await micro.add_endpoint(
        name=f"{name}-all",
        subject=subjects.health(name),
        handler=handler,
        queue_group=f"health-{os.urandom(6).hex()}",
    )
    return micro


async def _tick(entry: _Entry) -> None:
    while True:
        entry.tick = time.monotonic()
        _notify_systemd()
        await asyncio.sleep(TICK_S)


# -- answering -------------------------------------------------------------------------------


def liveness(service: EventService[Any]) -> Report:
    """Is `service` alive: only reads, so the HTTP thread may call it while the loop runs."""
    entry = _entries.get(service)
    now = time.monotonic()
    problems: list[str] = []
    loop_s = now - entry.tick if entry is not None else 0.0
    if loop_s > STALL_S:
        problems.append(f"its event loop has not turned for {loop_s:.0f} s (stuck)")
    if service.failure is not None:
        problems.append(f"a consumer failed: {service.failure!r}"[:300])
    if service.exit_message:
        problems.append(f"ending: {service.exit_message}"[:300])
    elif service._stopping.is_set():
        problems.append("stopping")
    relay = service._relay
    return Report(
        service=service.name,
        instance=entry.instance if entry is not None else _instance(service),
        live=not problems,
        problems=problems,
        position=service.position,
        outbox=relay.waiting if relay is not None else 0,
        loop_s=round(loop_s, 3),
        uptime_s=round(now - entry.started, 3) if entry is not None else 0.0,
        pid=os.getpid(),
    )


async def report(service: EventService[Any], max_lag: int = MAX_LAG) -> Report:
    """Is `service` alive and ready (module docstring); on its event loop."""
    out = liveness(service)
    problems = out.problems
    nc = service.nc
    connected = nc is not None and nc.is_connected
    if not service.ready.is_set():
        problems.append("starting: its consumers are not made yet")
    if not connected:
        problems.append("not connected to the bus")
    if service.paused:
        problems.append("its event log refuses writes (is the data disk full?)")
    if connected and service.ready.is_set():
        lag, error = await _lag(service)
        out.lag = lag
        if error:
            problems.append(f"cannot read its consumers' lag: {error}")
        for consumer, behind in sorted(lag.items()):
            if behind > max_lag:
                problems.append(
                    f"consumer {consumer} is {behind} messages behind (more than {max_lag})"
                )
    out.ready = not problems
    return out


async def _lag(service: EventService[Any]) -> tuple[dict[str, int], str]:
    """Each durable consumer's lag (pending plus unacknowledged), asked of the server, all at
    once and within LAG_TIMEOUT_S."""
    entry = _entries.get(service)
    now = time.monotonic()
    if entry is not None and now - entry.lag_at < LAG_CACHE_S:
        return dict(entry.lag), entry.lag_error
    js = service.js
    specs = service.consumers() if js is not None else []

    async def one(spec: ConsumerSpec) -> int:
        assert js is not None
        info = await js.consumer_info(spec.stream, service.consumer_name(spec))
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    asked = [asyncio.ensure_future(one(spec)) for spec in specs]
    if asked:
        await asyncio.wait(asked, timeout=LAG_TIMEOUT_S)
    lag: dict[str, int] = {}
    error = ""
    for spec, task in zip(specs, asked, strict=True):
        if not task.done():
            task.cancel()
            error = f"{spec.durable}: no answer within {LAG_TIMEOUT_S:g} s"
        elif (exc := task.exception()) is not None:
            error = f"{spec.durable}: {type(exc).__name__} {exc}".strip()[:200]
        else:
            lag[spec.durable] = task.result()
    if entry is not None:
        entry.lag, entry.lag_at, entry.lag_error = lag, time.monotonic(), error
    return lag, error


def _members(name: str) -> list[EventService[Any]]:
    return [s for ref in _groups.get(name, []) if (s := ref()) is not None]


async def report_group(name: str, max_lag: int = MAX_LAG) -> Report:
    """One report for the group `name`: alive and ready when every member is."""
    return combine(name, [await report(s, max_lag) for s in _members(name)])


def combine(name: str, reports: Iterable[Report]) -> Report:
    """Several services' reports as one: each problem names its service."""
    parts = list(reports)
    if not parts:
        return Report(service=name, instance="", live=False, problems=["nothing serves"])
    ready = [r.ready for r in parts]
    return Report(
        service=name,
        instance=parts[0].instance,
        live=all(r.live for r in parts),
        ready=None if None in ready else all(ready),
        problems=[f"{r.service}: {p}" for r in parts for p in r.problems],
        lag={k: v for r in parts for k, v in r.lag.items()},
        position=sum(r.position for r in parts),
        outbox=sum(r.outbox for r in parts),
        loop_s=max(r.loop_s for r in parts),
        uptime_s=min(r.uptime_s for r in parts),
        pid=parts[0].pid,
    )


_also: list[tuple[str, Callable[[], str]]] = []
"""Checks of a process that runs no service itself (`cumulus up`: its nats-server): a name,
and `() -> why it is not ready ("" when it is)`, asked by /readyz (from the HTTP thread)."""


def check_also(name: str, check: Callable[[], str]) -> None:
    """Have this process's /healthz name `name` (alive: the process answers) and its /readyz
    ask `check`."""
    _also.append((name, check))


def _also_reports(ready: bool) -> list[Report]:
    out = []
    for name, check in _also:
        why = check() if ready else ""
        out.append(
            Report(
                service=name,
                instance=DEFAULT_INSTANCE,
                live=True,
                ready=not why if ready else None,
                problems=[why] if why else [],
                pid=os.getpid(),
            )
        )
    return out


# -- the metrics port ------------------------------------------------------------------------

_json = msgspec.json.Encoder()


def http(path: str, query: dict[str, list[str]]) -> tuple[int, bytes]:
    """The answer to GET /healthz or /readyz (in the HTTP server's thread): status, JSON."""
    ready = path == "/readyz"
    name = (query.get("service") or [""])[0]
    try:
        max_lag = max(0, int((query.get("max_lag") or [str(MAX_LAG)])[0]))
    except ValueError:
        return 400, _json.encode({"status": "error", "error": "max_lag must be a whole number"})
    services = _members(name) if name in _groups else list(_entries)
    if name and name not in _groups:
        services = [s for s in services if s.name == name]
        if not services:
            have = sorted({s.name for s in _entries} | set(_groups))
            error = f"no service {name!r} serves in this process (it has: {', '.join(have)})"
            return 404, _json.encode({"status": "unknown", "error": error})
    reports = [_ready_now(s, max_lag) if ready else liveness(s) for s in services]
    if not name and not reports:  # a process of no service (`cumulus up`): its own checks
        reports = _also_reports(ready)
    ok = all(r.ready if ready else r.live for r in reports)
    if ready and not reports:
        ok = False
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "services": reports}
    if not reports:
        body["note"] = "no service of this process serves yet (starting)"
    return (200 if ok else 503), _json.encode(body)


def _ready_now(service: EventService[Any], max_lag: int) -> Report:
    """`report`, asked of the service's loop from another thread, boundedly."""
    entry = _entries.get(service)
    if entry is None:
        out = liveness(service)
        out.ready, out.problems = False, [*out.problems, "starting"]
        return out
    try:
        future = asyncio.run_coroutine_threadsafe(report(service, max_lag), entry.loop)
        return future.result(READY_WAIT_S)
    except Exception as exc:  # the loop stuck (a timeout) or closed
        out = liveness(service)
        why = (
            f"its event loop did not answer within {READY_WAIT_S:.0f} s"
            if isinstance(exc, TimeoutError)
            else f"cannot ask it: {type(exc).__name__}"
        )
        out.ready, out.problems = False, [*out.problems, why]
        return out


# -- systemd ---------------------------------------------------------------------------------


def _notify_systemd() -> None:
    """READY=1 once every serving service (and group member) is ready; WATCHDOG=1 while all
    are alive. Nothing without $NOTIFY_SOCKET (not under systemd's Type=notify)."""
    global _notified_ready, _last_notify
    path = os.environ.get("NOTIFY_SOCKET", "")
    now = time.monotonic()
    if not path or now - _last_notify < TICK_S / 2:
        return
    _last_notify = now
    services = list(_entries)
    waited = [s for ref in (r for refs in _groups.values() for r in refs) if (s := ref())]
    messages = []
    if not _notified_ready and all(
        s in _entries and s.ready.is_set() for s in [*services, *waited]
    ):
        _notified_ready = True
        messages.append(b"READY=1")
    if os.environ.get("WATCHDOG_USEC") and all(liveness(s).live for s in services):
        messages.append(b"WATCHDOG=1")
    for message in messages:
        notify(path, message)


def notify(path: str, message: bytes) -> None:
    """One datagram to systemd's notification socket (`@name`: the abstract namespace).
    Never waits: a receiver that does not read (its queue full) would otherwise stop the
    event loop of the very process it watches; such a datagram is dropped."""
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except BlockingIOError:
        pass
    except OSError as exc:
        log.warning("cannot notify systemd", extra={"fields": {"error": str(exc)}})
