"""Prometheus metrics beyond the seed's (those are in shared/telemetry.py), and the values a
scrape reads from live services.

Every process registers prometheus_client's default collectors (process CPU and RSS, Python's
GC); `start` serves them with the rest on `<bind>:<port>/metrics`, and the process's health
checks on `/healthz` and `/readyz` beside it (shared/health.py). Labels are bounded: status,
phase, stream, service, consumer, worker and device, never a job id. The job-latency
histograms carry the job's trace id as an exemplar (OpenMetrics exposition), so a slow job in
Grafana links to its trace.

Gauges that describe state (jobs by state, GPU tenths per device, outbox depth, consumer lag)
are not kept up to date per event: a scrape asks each live service (`watch`) for them, in the
scrape's thread. A service's `gauges()` only reads, and copies a dict before walking it (the
event loop may change it meanwhile).
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
"""Buckets of the job-latency phases: a trivial job's phases take milliseconds."""

JOBS_SUBMITTED = Counter("cumulus_jobs_submitted_total", "Jobs the gateway accepted")
JOBS_FINISHED = Counter(
    "cumulus_jobs_finished_total",
    "Jobs that ended, by status (completed, failed, timed_out, cancelled)",
    ["status"],
)
PARTITION_CREATE = Histogram(
    "cumulus_partition_create_seconds",
    "Time chronos_cli took to create a job's partitions (every device, retries included)",
    buckets=PHASE_BUCKETS,
)
JOB_START = Histogram(
    "cumulus_job_start_seconds",
    "Time from a runner taking a partitioned job to its process or container running",
    buckets=PHASE_BUCKETS,
)
JOB_RUN = Histogram(
    "cumulus_job_run_seconds",
    "Time a job's process or container ran (finer buckets than cumulus_job_duration_seconds)",
    buckets=PHASE_BUCKETS,
)
RESULT_DELIVERY = Histogram(
    "cumulus_job_result_delivery_seconds",
    "Time from a runner recording a job's end to the gateway holding it (what users read)",
    buckets=PHASE_BUCKETS,
)
LOG_LINES = Counter(
    "cumulus_job_log_lines_total", "Job output lines a runner published", ["stream"]
)
LOG_BYTES = Counter(
    "cumulus_job_log_bytes_total", "Bytes of job output lines a runner published", ["stream"]
)

# Every label value exported from the start, as 0: a rate or an increase needs a base.
for _status in ("completed", "failed", "timed_out", "cancelled"):
    JOBS_FINISHED.labels(_status)
for _stream in ("stdout", "stderr"):
    LOG_LINES.labels(_stream)
    LOG_BYTES.labels(_stream)

GaugeValue = tuple[str, tuple[str, ...], float]
"""(metric name, label values, value): one sample a service gives a scrape."""

GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cumulus_jobs": ("Jobs the gateway holds, by state (ended ones until forgotten)", ("state",)),
    "cumulus_queue_length": ("Jobs waiting in the scheduler's queue", ()),
    "cumulus_gpu_tenths_allocated": (
        "Tenths of a GPU allocated to jobs, per worker and device (the scheduler's view)",
        ("worker", "device"),
    ),
    "cumulus_gpu_tenths_free": (
        "Tenths of a GPU free, per worker and device (the scheduler's view)",
        ("worker", "device"),
    ),
    "cumulus_outbox_depth": (
        "Events a service committed and has not yet published",
        ("service",),
    ),
    "cumulus_consumer_lag": (
        "Messages of a durable consumer not yet applied (pending plus unacknowledged)",
        ("service", "consumer"),
    ),
}
"""The gauges read from services at scrape time: name -> (help, label names)."""


class Watched(Protocol):
    def gauges(self) -> Iterable[GaugeValue]: ...


_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(service: Watched) -> None:
    """Have scrapes ask `service` for its gauges while it lives."""
    _watched.add(service)


class _ServiceGauges:
    """The GAUGES, read from every watched service at scrape time."""

    def describe(self) -> Iterator[Metric]:
        for name, (doc, labels) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, labels=list(labels))

    def collect(self) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(name, doc, labels=list(labels))
            for name, (doc, labels) in GAUGES.items()
        }
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for service in list(_watched):
            for name, labels, value in _read(service):
                if (name, labels) not in seen:  # two copies in one process: the first counts
                    seen.add((name, labels))
                    families[name].add_metric(list(labels), value)
        yield from families.values()


def _read(service: Watched) -> list[GaugeValue]:
    """A service's gauges; a dict changed under the read is read again, once."""
    for _ in range(2):
        try:
            return list(service.gauges())
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
        except Exception:
            log.debug("gauges not read", exc_info=True)
            return []
    return []


REGISTRY.register(_ServiceGauges())


def trace_id(traceparent: str) -> str:
    """The trace id of a W3C traceparent (its second field), or ""."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def observe(histogram: Histogram, value: float, traceparent: str = "") -> None:
    """Observe `value`, with the job's trace id as the exemplar when it has one."""
    tid = trace_id(traceparent)
    histogram.observe(max(0.0, value), {"trace_id": tid} if tid else None)


def count_logs(events: Iterable[Any]) -> None:
    """Count the lines and bytes of JobLog events a runner is about to publish."""
    for event in events:
        for line in getattr(event, "lines", ()):
            LOG_LINES.labels(line.stream).inc()
            LOG_BYTES.labels(line.stream).inc(len(line.text.encode()))


_started: set[int] = set()
_start_lock = threading.Lock()


def start(port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics on `addr:port` (0: off), and the process's `/healthz` and `/readyz`
    beside it (shared/health.py); once per port in a process. Any other path is /metrics, as
    prometheus_client serves it."""
    if not port:
        return
    with _start_lock:
        if port in _started:
            return
        _Server.address_family = _family(addr, port)
        httpd = make_server(addr, port, _app(), _Server, handler_class=_Quiet)
        threading.Thread(target=httpd.serve_forever, name=f"metrics-{port}", daemon=True).start()
        _started.add(port)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _app() -> WsgiApp:
    metrics_app: WsgiApp = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        from shared import health

        status, body = health.http(path, parse_qs(environ.get("QUERY_STRING", "")))
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        )
        return [body]

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request: a slow scrape never holds up a health check."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    """No access log: a supervisor asks every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _family(addr: str, port: int) -> socket.AddressFamily:
    """IPv6 for an IPv6 address (`::`), else IPv4."""
    infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM)
    return infos[0][0] if infos else socket.AF_INET


class NatsCollector:
    """nats-server's health and JetStream figures, read from its monitoring port at scrape
    time (`cumulus up` serves them with its own process's metrics)."""

    def __init__(self, monitor_port: int, host: str = "127.0.0.1") -> None:
        self.base = f"http://{host}:{monitor_port}"

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + path, timeout=2) as reply:
            data: dict[str, Any] = json.loads(reply.read())
            return data

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cumulus_nats_up", "1 when nats-server's /varz answers")
        try:
            varz = self._get("/varz")
            jsz = self._get("/jsz?streams=true")
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _varz(varz)
        yield from _jsz(jsz)


def _varz(varz: dict[str, Any]) -> Iterator[Metric]:
    gauge = GaugeMetricFamily("cumulus_nats_connections", "Clients connected to nats-server")
    gauge.add_metric([], varz.get("connections", 0))
    yield gauge
    mem = GaugeMetricFamily("cumulus_nats_memory_bytes", "nats-server's resident memory")
    mem.add_metric([], varz.get("mem", 0))
    yield mem
    for key, name in (("in_msgs", "received"), ("out_msgs", "sent")):
        counter = CounterMetricFamily(
            f"cumulus_nats_messages_{name}", f"Messages nats-server {name} (all clients)"
        )
        counter.add_metric([], varz.get(key, 0))
        yield counter


def _jsz(jsz: dict[str, Any]) -> Iterator[Metric]:
    messages = GaugeMetricFamily(
        "cumulus_jetstream_stream_messages", "Messages a JetStream stream holds", labels=["stream"]
    )
    size = GaugeMetricFamily(
        "cumulus_jetstream_stream_bytes", "Bytes a JetStream stream holds", labels=["stream"]
    )
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            state = stream.get("state") or {}
            messages.add_metric([stream.get("name", "")], state.get("messages", 0))
            size.add_metric([stream.get("name", "")], state.get("bytes", 0))
    yield messages
    yield size


_nats: NatsCollector | None = None


def watch_nats(monitor_port: int) -> None:
    """Serve nats-server's figures (its monitoring port on loopback) with this process's,
    and its `/healthz` as this process's readiness (`cumulus up`: shared/health.py)."""
    global _nats
    if _nats is None:
        _nats = NatsCollector(monitor_port)
        REGISTRY.register(_nats)
        from shared import health

        health.check_also("nats", _nats_health)
    else:
        _nats.base = f"http://127.0.0.1:{monitor_port}"


def _nats_health() -> str:
    """Why the stack's nats-server is not healthy ("" when it is)."""
    if _nats is None:
        return "not watched"
    try:
        with urllib.request.urlopen(_nats.base + "/healthz", timeout=2) as reply:
            reply.read()
    except urllib.error.HTTPError as exc:
        return f"nats-server's /healthz answers {exc.code}: {exc.read()[:200]!r}"
    except OSError as exc:
        return f"nats-server does not answer at {_nats.base} ({exc})"
    return ""
