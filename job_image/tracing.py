"""The job's own span, so that the job's trace reaches into its code.

The worker's runner gives the job `TRACEPARENT` (its `run` span) and, when the job can reach
the collector, the OTLP exporter's `OTEL_*` settings (`OTEL_SERVICE_NAME=cumulus-job`). With
both, the in-job runner watches for the user's code importing OpenTelemetry
(`opentelemetry.trace`). When it does, the in-job runner installs a tracer provider (the OTel
SDK, exporting as `OTEL_*` say) as the global one and makes the span `job <entry>`, a child of
`run`, starting when the job's code started, and current: the user's spans are its children,
in the job's trace.

Nothing is imported otherwise: the SDK and an OTLP exporter take 0.1-0.2 s to import, which a
job that does not use OpenTelemetry should not pay.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

FLUSH_MS = 2000
"""How long the job's end waits, at most, for its spans to be exported."""
WATCHED = "opentelemetry.trace"


def wanted(env: Mapping[str, str]) -> bool:
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return bool(env.get("TRACEPARENT") and endpoint)


class _Then(importlib.abc.Loader):
    """A module's own loader, and `then()` once the module is executed."""

    def __init__(self, loader: Any, then: Callable[[], None]) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _WhenImported(importlib.abc.MetaPathFinder):
    """Runs `then()` right after the first import of `WATCHED`, once."""

    def __init__(self, then: Callable[[], None]) -> None:
        self.then = then

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != WATCHED:
            return None
        self.remove()
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Then(spec.loader, self.then)
        return spec

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


class _JobSpan:
    """The job's span and provider, made at the user's first import of OpenTelemetry."""

    def __init__(self, name: str, started_ns: int) -> None:
        self.name = name
        self.started_ns = started_ns
        self.provider: Any = None
        self.span: Any = None
        self.token: Any = None

    def start(self) -> None:
        try:
            from opentelemetry import context, trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            provider = TracerProvider(
                resource=Resource.create(
                    {"service.name": os.environ.get("OTEL_SERVICE_NAME") or "cumulus-job"}
                ),
                shutdown_on_exit=False,
            )
            provider.add_span_processor(BatchSpanProcessor(_exporter()))
        except ImportError:  # the OTel API without the SDK: the job runs untraced, quietly
            return
        except Exception as exc:  # a setting the SDK refuses
            print(f"[cumulus] tracing off in the job: {exc}", file=sys.stderr)
            return
        trace.set_tracer_provider(provider)
        carrier = {"traceparent": os.environ["TRACEPARENT"]}
        parent = TraceContextTextMapPropagator().extract(carrier)
        self.span = provider.get_tracer("cumulus.job").start_span(
            self.name,
            context=parent,
            start_time=self.started_ns,
            attributes={"cumulus.job_id": os.environ.get("CUMULUS_JOB_ID", "")},
        )
        self.token = context.attach(trace.set_span_in_context(self.span, parent))
        self.provider = provider

    def end(self, error: BaseException | None) -> None:
        if self.span is None:
            return
        from opentelemetry import context, trace

        if error is not None and not _clean_exit(error):
            self.span.record_exception(error)
            self.span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
        self.span.end()
        with contextlib.suppress(Exception):  # user code may have left its own context
            context.detach(self.token)
        # The SDK's flush waits for the exporter (10 s against a collector that does not
        # answer): a daemon thread does it, and the job's end waits FLUSH_MS at most.
        exporting = threading.Thread(target=self.provider.force_flush, daemon=True)
        exporting.start()
        exporting.join(FLUSH_MS / 1000)


def _clean_exit(error: BaseException) -> bool:
    return isinstance(error, SystemExit) and error.code in (None, 0)


def _exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.strip().lower() == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


@contextlib.contextmanager
def job_span(name: str) -> Iterator[None]:
    """Around the user's code: the span `name` if the code uses OpenTelemetry (see above)."""
    if not wanted(os.environ) or WATCHED in sys.modules:
        yield
        return
    job = _JobSpan(name, time.time_ns())
    hook = _WhenImported(job.start)
    sys.meta_path.insert(0, hook)
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        hook.remove()
        job.end(error)
