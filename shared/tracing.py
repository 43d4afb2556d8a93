"""Tracing: one OpenTelemetry trace per job, its W3C context carried in every event about it.

The SDK starts the trace at submit (or continues the caller's span) and sends its traceparent;
the gateway's `accept` span is the job's span of record: every event about the job carries its
context (`child_trace`), so each service's span is a child of it. Spans are exported over OTLP
(gRPC or HTTP/protobuf, `OTEL_EXPORTER_OTLP_PROTOCOL`) only when an endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). Off, tracing costs a
random id per job and nothing more: callers check `enabled()` first, no span object is made and
the OTel SDK is never imported.

Work that spans events (a queue wait, a job's run) is recorded afterwards with explicit start
and end times (`record`), and only where a service decides or acts, never when it replays.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOLS = ("grpc", "http/protobuf")
JOB_SERVICE = "cumulus-job"
"""`service.name` of the spans a job's own process makes (job_image/tracing.py)."""
JOB_OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)
"""The exporter's settings a job gets (when it can reach the collector: `job_env`)."""
FLUSH_S = 1.0
"""How long a stopping service waits for its last spans to be exported."""
_KINDS = ("internal", "server", "client", "producer", "consumer")

_enabled: bool | None = None
_service = "cumulus"
_tracer: Any = None
_provider: Any = None
_ids: Any = None


def configured(env: Mapping[str, str]) -> bool:
    """Whether `env` asks for spans: an OTLP endpoint, and the SDK and exporter not turned off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(env.get(name) for name in ENDPOINT_VARS)


def enabled() -> bool:
    """Whether this process exports spans; read once (a service asks per event, and its
    environment does not change)."""
    global _enabled
    if _enabled is None:
        _enabled = configured(os.environ)
    return _enabled


def setup(service: str) -> None:
    """Name this process's spans: `service.name` is $OTEL_SERVICE_NAME, else `service`."""
    global _service
    _service = service


def protocol(env: Mapping[str, str]) -> str:
    """The OTLP protocol `env` asks for (`grpc`, the default, or `http/protobuf`)."""
    name = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    return name.strip().lower() or "grpc"


# -- trace context ------------------------------------------------------------------------------


def new_trace() -> str:
    """A fresh W3C traceparent (sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def parse(traceparent: str) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) of a valid W3C traceparent, else None."""
    parts = traceparent.split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    trace_id, span_id, flags = parts[1], parts[2], parts[3]
    if len(flags) != 2 or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    try:
        int(trace_id, 16), int(span_id, 16), int(flags, 16)
    except ValueError:
        return None
    return trace_id.lower(), span_id.lower(), flags.lower()


def valid(traceparent: str) -> bool:
    return parse(traceparent) is not None


def child_trace(parent: str) -> str:
    """The context an event about a job carries: the job's own (its gateway `accept` span), so
    a span any service makes from the event is that span's child; a fresh one if `parent` is
    not a valid traceparent."""
    return parent if valid(parent) else new_trace()


def with_span(traceparent: str, span_id: str) -> str:
    """`traceparent` naming another span of its trace."""
    parsed = parse(traceparent)
    if parsed is None:
        return ""
    return f"00-{parsed[0]}-{span_id}-{parsed[2]}"


def new_span_id() -> str:
    return secrets.token_hex(8)


def new_root(name: str) -> str:
    """A traceparent for a new trace's root span `name`, sampled as this process's sampler
    (`OTEL_TRACES_SAMPLER`) decides, so that every service's span of it follows that decision."""
    if not enabled():
        return new_trace()
    _get_tracer()
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    result = _provider.sampler.should_sample(None, int(trace_id, 16), name)
    return f"00-{trace_id}-{span_id}-{'01' if result.decision.is_sampled() else '00'}"


def derived_span_id(traceparent: str, *parts: object) -> str:
    """A span id fixed by the trace and `parts` (a job's `run` span: the runner knows it again
    after a restart, and the job's process is its child from the start)."""
    seed = "/".join([traceparent.split("-")[1] if valid(traceparent) else "", *map(str, parts)])
    span_id = hashlib.sha256(seed.encode()).hexdigest()[:16]
    return span_id if span_id != "0" * 16 else "1" * 16


def now() -> int:
    """Wall-clock time in ns (what span times are)."""
    return time.time_ns()


def ns(seconds: float) -> int:
    """An event's `ts` (seconds) in ns."""
    return int(seconds * 1e9)


# -- spans --------------------------------------------------------------------------------------


def record(
    name: str,
    parent: str,
    start_ns: int,
    end_ns: int | None = None,
    *,
    own: str = "",
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
) -> str:
    """Export a finished span, child of `parent` (a traceparent; none valid: a root) and return
    its own traceparent. `own` fixes its trace and span id (chosen before the span is made, e.g.
    carried in an event or a job's environment). Nothing when tracing is off."""
    if not enabled():
        return ""
    parsed_parent = parse(parent)
    parsed_own = parse(own)
    if parsed_parent is None and parsed_own is None:
        return ""  # nothing to tie it to: a span of no job
    tracer = _get_tracer()
    from opentelemetry import trace

    context = None
    if parsed_parent is not None:
        trace_id, span_id, flags = parsed_parent
        remote = trace.SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(flags, 16)),
        )
        context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    if parsed_own is not None:
        _ids.span_id = int(parsed_own[1], 16)
        if parsed_parent is None:
            _ids.trace_id = int(parsed_own[0], 16)
    try:
        span = tracer.start_span(
            name,
            context=context,
            kind=trace.SpanKind[kind.upper() if kind in _KINDS else "INTERNAL"],
            attributes=_clean(attributes or {}),
            start_time=start_ns,
        )
    finally:
        _ids.span_id = _ids.trace_id = 0
    span.end(end_time=max(start_ns, end_ns if end_ns is not None else now()))
    made = span.get_span_context()
    return f"00-{made.trace_id:032x}-{made.span_id:016x}-{int(made.trace_flags):02x}"


@contextlib.contextmanager
def span(name: str, traceparent: str, **attributes: Any) -> Iterator[str]:
    """A span around a block, child of `traceparent`; yields its own traceparent ("" when
    tracing is off: callers on hot paths check `enabled()` first and skip even this)."""
    if not enabled() or not valid(traceparent):
        yield ""
        return
    own = with_span(traceparent, new_span_id())
    started = now()
    try:
        yield own
    finally:
        record(name, traceparent, started, own=own, attributes=attributes)


def messaging(subject: str, event_id: str, operation: str = "process") -> dict[str, str]:
    """The OTel messaging attributes of work on one NATS message."""
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.message.id": event_id,
        "messaging.operation.type": operation,
    }


def job_attributes(event: Any) -> dict[str, Any]:
    """`cumulus.*` attributes of a job event (its id, user, worker, attempt)."""
    out: dict[str, Any] = {
        "cumulus.job_id": getattr(event, "job_id", ""),
        "cumulus.user": getattr(event, "user", ""),
    }
    if worker := getattr(event, "worker_id", ""):
        out["cumulus.worker_id"] = worker
    if attempt := getattr(event, "attempt", 0):
        out["cumulus.attempt"] = attempt
    return out


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes OTel takes: scalars and lists of scalars, None dropped."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            out[key] = [v if isinstance(v, str | int | float | bool) else str(v) for v in value]
        else:
            out[key] = value if isinstance(value, str | int | float | bool) else str(value)
    return out


def _get_tracer() -> Any:
    global _tracer, _provider, _ids
    if _tracer is None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        class ChosenIds(RandomIdGenerator):
            """Random ids, except the one `record` has chosen for the span it makes next."""

            span_id = 0
            trace_id = 0

            def generate_span_id(self) -> int:
                return self.span_id or super().generate_span_id()

            def generate_trace_id(self) -> int:
                return self.trace_id or super().generate_trace_id()

        _ids = ChosenIds()
        name = os.environ.get("OTEL_SERVICE_NAME") or _service
        # No shutdown at exit: it could wait on an unreachable collector; `flush` is bounded.
        _provider = TracerProvider(
            resource=Resource.create({"service.name": name}),
            id_generator=_ids,
            shutdown_on_exit=False,
        )
        _provider.add_span_processor(BatchSpanProcessor(exporter(os.environ)))
        _tracer = _provider.get_tracer("cumulus")
    return _tracer


def exporter(env: Mapping[str, str]) -> Any:
    """The OTLP span exporter `env` asks for; it reads its endpoint, headers and timeout from
    the standard OTEL_EXPORTER_OTLP_* variables itself."""
    wanted = protocol(env)
    if wanted == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    if wanted != "grpc":
        log.warning(
            "unsupported OTLP protocol; exporting over grpc",
            extra={"fields": {"protocol": wanted, "supported": list(PROTOCOLS)}},
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def flush(timeout_s: float = FLUSH_S) -> None:
    """Export what is buffered (a service that stops), waiting at most `timeout_s`. The SDK's
    flush waits for the exporter (up to its own timeout, 10 s, against a collector that does
    not answer), so it runs in a daemon thread, which does not hold the process's exit up."""
    provider = _provider
    if provider is None:
        return
    exporting = threading.Thread(target=provider.force_flush, daemon=True, name="otel-flush")
    exporting.start()
    exporting.join(timeout_s)
    if exporting.is_alive():
        log.warning("the last spans were not exported in time")


# -- the SDK ------------------------------------------------------------------------------------


@contextlib.contextmanager
def caller_span(name: str, attributes: Mapping[str, Any]) -> Iterator[str]:
    """The SDK's span of a submit, in the caller's own OTel set-up: a child of the caller's
    current span, exported by the caller's provider if it has one (else not recorded). Yields
    the traceparent the job's trace continues, "" when the caller has no trace at all."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - a dependency of the SDK
        yield ""
        return
    tracer_ = trace.get_tracer("cumulus.sdk")
    with tracer_.start_as_current_span(
        name, kind=trace.SpanKind.PRODUCER, attributes=_clean(attributes)
    ) as current:
        made = current.get_span_context()
        if not made.is_valid:
            yield ""
            return
        yield f"00-{made.trace_id:032x}-{made.span_id:016x}-{int(made.trace_flags):02x}"


# -- a job's process ----------------------------------------------------------------------------


def job_env(run_span: str, network: bool, env: Mapping[str, str]) -> dict[str, str]:
    """What a job's process gets to continue the trace: TRACEPARENT (the runner's `run` span,
    so the job's spans are its children), and, when it can reach the collector (`network`),
    the exporter's OTEL_* settings with `OTEL_SERVICE_NAME=cumulus-job`."""
    if not run_span:
        return {}
    out = {"TRACEPARENT": run_span}
    if network and configured(env):
        out.update({k: env[k] for k in JOB_OTEL_VARS if env.get(k)})
        out["OTEL_SERVICE_NAME"] = JOB_SERVICE
    return out
