"""A real OTLP trace receiver for tests: what a collector sees, decoded from the wire.

It serves OTLP/gRPC (the `TraceService/Export` RPC, opentelemetry-proto's servicer on a grpcio
server) and OTLP/HTTP (`POST /v1/traces`, a protobuf `ExportTraceServiceRequest`, on the
standard library's http.server), each on a free port of loopback, and keeps every span it was
sent as a `Span`. Nothing is mocked: exporters talk to it as they talk to a collector.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    """"" for a root span."""
    name: str
    service: str
    """The `service.name` of the span's resource."""
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    """0 unset, 1 ok, 2 error."""
    protocol: str = ""
    """How it arrived: grpc or http/protobuf."""

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def decode(request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> list[Span]:
    """The spans of one export request."""
    out = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        service=str(resource.get("service.name", "")),
                        kind=KINDS.get(s.kind, str(s.kind)),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        status=s.status.code,
                        protocol=protocol,
                    )
                )
    return out


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, add: Callable[[list[Span]], None]) -> None:
        self.add = add

    def Export(  # noqa: N802  (the RPC's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.add(decode(request, "grpc"))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Start with `start()`, point exporters at `env(protocol)`, read `spans`; `stop()`."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Condition()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    def _add(self, spans: list[Span]) -> None:
        with self._lock:
            self.spans.extend(spans)
            self.requests += 1
            self._lock.notify_all()

    def start(self) -> OtlpReceiver:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self._add), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True, name="otlp-http").start()
        return self

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        add = self._add

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if self.headers.get("Content-Type", "") != "application/x-protobuf":
                    self.send_error(415, "only application/x-protobuf")
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                add(decode(request, "http/protobuf"))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def env(self, protocol: str = "grpc") -> dict[str, str]:
        """The standard OTEL_* variables that send spans here over `protocol`."""
        port = self.grpc_port if protocol == "grpc" else self.http_port
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }

    def wait(self, until: Callable[[list[Span]], bool], timeout: float = 15.0) -> list[Span]:
        """The spans once `until(spans)` holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not until(list(self.spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(s.service, s.name) for s in self.spans})
                    raise AssertionError(f"spans not there in {timeout} s; have {names}")
                self._lock.wait(left)
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait(5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
