"""Telemetry: structured JSON logs, W3C trace context carried in events, OTel spans, Prometheus.

Spans are exported over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise tracing
costs a random id per job and nothing more. Metrics keep the seed's names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

WORKER_ASSIGNMENTS = Counter(
    "cumulus_worker_assignments_total", "Total number of worker assignments", ["status"]
)
ACTIVE_WORKERS = Gauge("cumulus_active_workers", "Number of active workers")
ASSIGNMENT_DURATION = Histogram("cumulus_assignment_duration_seconds", "Time to assign worker")
WORKER_ACTIVE_JOBS = Gauge("cumulus_worker_active_jobs", "Number of active jobs on worker")
JOB_DURATION = Histogram(
    "cumulus_job_duration_seconds",
    "Job execution duration",
    ["status"],
    buckets=(1, 5, 10, 30, 60, 300, 600, 1800, 3600),
)
GPU_MEMORY_USED = Gauge("cumulus_gpu_memory_used_bytes", "GPU memory used", ["device"])
MAP_INPUTS = Counter(
    "cumulus_map_inputs_total", "Warm map inputs answered on this worker", ["outcome"]
)
QUEUE_WAIT = Histogram(
    "cumulus_job_queue_wait_seconds", "Time from submission to placement on a worker"
)
COLD_START = Histogram(
    "cumulus_job_cold_start_seconds",
    "Time from submission to the job's process or container running",
)
EVENTS_APPLIED = Counter(
    "cumulus_events_applied_total", "Events applied to a service's state", ["service"]
)
DEAD_LETTERS = Counter(
    "cumulus_dead_letters_total",
    "Messages a service could not decode, believe or apply, and set aside",
    ["service"],
)
FENCED = Counter(
    "cumulus_fenced_events_total",
    "Decisions of a superseded scheduler (stamped with an older epoch) a service did not act on",
    ["service"],
)
CONSUMPTION_PAUSED = Gauge(
    "cumulus_consumption_paused",
    "1 while a service cannot write its event log (a full disk) and waits, else 0",
    ["service"],
)
EVENTLOG_TRANSACTIONS = Counter(
    "cumulus_eventlog_transactions_total",
    "SQLite write transactions of a service's event log (batches, outbox deletes, snapshots)",
    ["service"],
)
CONSUMER_GAPS = Counter(
    "cumulus_consumer_gaps_total",
    "Deliveries a service's consumer never received (a consumer sequence skipped, e.g. its "
    "leader died with one in flight); each made the consumer anew from the last applied event",
    ["service"],
)
SNAPSHOTS = Counter(
    "cumulus_snapshots_total", "State snapshots a service took (its log trimmed)", ["service"]
)


def new_trace() -> str:
    """A fresh W3C traceparent (sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_trace(parent: str) -> str:
    """A traceparent in the same trace as `parent`, with a new span id."""
    parts = parent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return new_trace()
    return f"00-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    """Logs to stderr: `fmt` json (one object a line) or text; `level` a logging level name in
    any case (the config's `logging` section, validated at load)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def start_metrics(port: int) -> None:
    if port:
        start_http_server(port, addr="127.0.0.1")


_tracer: Any = None
_tracing: bool | None = None


def tracing_enabled() -> bool:
    """Whether spans are exported (`OTEL_EXPORTER_OTLP_ENDPOINT` set); read once: a service
    asks per event, and its environment does not change."""
    global _tracing
    if _tracing is None:
        _tracing = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return _tracing


@contextlib.contextmanager
def span(name: str, traceparent: str, **attributes: Any) -> Iterator[None]:
    """An OTel span that continues the event's trace; free when no exporter is configured
    (callers on hot paths check `tracing_enabled()` first and skip even this call)."""
    if not tracing_enabled() or not traceparent:
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    with tracer().start_as_current_span(name, context=parent) as current:
        current.set_attribute("messaging.system", "nats")
        for key, value in attributes.items():
            current.set_attribute(key, value)
        yield


def tracer() -> Any:
    """The OTel tracer; spans are exported only when an OTLP endpoint is configured."""
    global _tracer
    if _tracer is None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME", "cumulus")}
            )
        )
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _tracer = trace.get_tracer("cumulus")
    return _tracer


def since(start: float) -> float:
    return max(0.0, time.time() - start)
