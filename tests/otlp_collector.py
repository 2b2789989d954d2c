"""A small real OTLP trace receiver for the tests: OTLP/gRPC and OTLP/HTTP (protobuf) on 127.0.0.1.

It runs in the pytest process (a gRPC server and an http.server thread) and is shared with the
processes under test only through its two ports, the way a collector is shared with services.
Both endpoints decode the standard ExportTraceServiceRequest (opentelemetry-proto) and keep
every span as a `ReceivedSpan`; `wait_for` blocks until the spans a test expects have arrived
(exporters batch: spans come seconds after they end).

    with OTLPCollector() as collector:
        env = collector.otel_env("grpc")            # OTEL_* variables for a subprocess
        ...
        [span] = collector.wait_for(lambda s: s.name == "train")
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

GRPC, HTTP = "grpc", "http/protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # 16 hex digits, "" for a root span
    name: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]  # resource attributes: service.name, tunefetch.component, ...
    scope: str  # instrumentation scope (the tracer's name)
    start_ns: int
    end_ns: int
    status_code: int
    protocol: str  # GRPC or HTTP: how it reached the collector
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # of its export request, lower-case keys
    events: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, attributes) of each span event

    @property
    def component(self) -> str | None:
        return self.resource.get("tunefetch.component")


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as Python: arrays become tuples, key-value lists dicts."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


class OTLPCollector:
    """Receives OTLP traces over gRPC and HTTP/protobuf on free 127.0.0.1 ports."""

    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.requests = {GRPC: 0, HTTP: 0}  # export requests received per protocol
        self._grpc = self._http = None
        self.grpc_port = self.http_port = 0

    # -- endpoints ------------------------------------------------------------------------
    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """The base URL; exporters POST to its /v1/traces."""
        return f"http://127.0.0.1:{self.http_port}"

    def endpoint(self, protocol: str) -> str:
        return self.grpc_endpoint if protocol == GRPC else self.http_endpoint

    def otel_env(self, protocol: str) -> dict[str, str]:
        """The standard OpenTelemetry variables that send a process's spans here."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint(protocol)}

    def tunefetch_env(self, protocol: str) -> dict[str, str]:
        """tunefetch's own settings (they win over OTEL_*) that send its spans here."""
        return {"TUNEFETCH_TELEMETRY__EXPORTER": "otlp", "TUNEFETCH_TELEMETRY__PROTOCOL": protocol,
                "TUNEFETCH_TELEMETRY__ENDPOINT": self.endpoint(protocol)}

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> OTLPCollector:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc:
            self._grpc.stop(grace=1).wait()

    def __enter__(self) -> OTLPCollector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what arrived ---------------------------------------------------------------------
    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str,
                headers: dict[str, str]) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), name=span.name, kind=span.kind,
                        attributes=attributes(span.attributes), resource=resource, scope=scope_spans.scope.name,
                        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                        status_code=span.status.code, protocol=protocol, headers=headers,
                        events=tuple((e.name, attributes(e.attributes)) for e in span.events)))
        with self._changed:
            self.requests[protocol] += 1
            self._spans.extend(received)
            self._changed.notify_all()

    def spans(self, predicate: Callable[[ReceivedSpan], bool] | None = None) -> list[ReceivedSpan]:
        with self._changed:
            return [s for s in self._spans if predicate is None or predicate(s)]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return self.spans(lambda s: s.trace_id == trace_id)

    def wait_for(self, predicate: Callable[[ReceivedSpan], bool], timeout: float = 30,
                 count: int = 1) -> list[ReceivedSpan]:
        """The spans matching `predicate` once at least `count` have arrived; AssertionError
        listing what did arrive after `timeout` seconds."""
        matching = self._wait(lambda spans: [s for s in spans if predicate(s)],
                              lambda found: len(found) >= count, timeout)
        if len(matching) < count:
            raise AssertionError(f"{len(matching)} of {count} expected spans arrived in {timeout:.0f} s; "
                                 f"last received: {self._summary()}")
        return matching

    def wait_for_trace(self, trace_id: str, names: set[str], timeout: float = 30) -> dict[str, list[ReceivedSpan]]:
        """The spans of one trace by name, once at least one of every name in `names` has arrived."""
        def by_name(spans):
            found: dict[str, list[ReceivedSpan]] = {}
            for span in spans:
                if span.trace_id == trace_id:
                    found.setdefault(span.name, []).append(span)
            return found

        found = self._wait(by_name, lambda found: names <= set(found), timeout)
        if not names <= set(found):
            raise AssertionError(f"trace {trace_id}: no {sorted(names - set(found))} span in {timeout:.0f} s "
                                 f"(got {sorted(found)}); last received: {self._summary()}")
        return found

    def _wait(self, select, done, timeout: float):
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = select(self._spans)
                left = deadline - time.monotonic()
                if done(found) or left <= 0:
                    return found
                self._changed.wait(left)

    def _summary(self) -> str:
        return ", ".join(f"{s.name}[{s.component}/{s.trace_id[:8]}]" for s in self.spans()[-40:]) or "none"


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OTLPCollector):
        self.collector = collector

    def Export(self, request, context):  # noqa: N802 - the generated service's method name
        headers = {key.lower(): value for key, value in context.invocation_metadata() if isinstance(value, str)}
        self.collector.receive(request, GRPC, headers)
        return trace_service_pb2.ExportTraceServiceResponse()


def _handler(collector: OTLPCollector):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's method name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path.split("?")[0] != "/v1/traces":
                return self._answer(404, b"not found", "text/plain")
            if not (self.headers.get("content-type") or "").startswith("application/x-protobuf"):
                return self._answer(415, b"only application/x-protobuf", "text/plain")
            encoding = (self.headers.get("content-encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = trace_service_pb2.ExportTraceServiceRequest()
            try:
                request.ParseFromString(body)
            except Exception:  # noqa: BLE001 - a malformed body is the client's error
                return self._answer(400, b"not an ExportTraceServiceRequest", "text/plain")
            collector.receive(request, HTTP, {k.lower(): v for k, v in self.headers.items()})
            self._answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                         "application/x-protobuf")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet: pytest output stays readable
            pass

    return Handler
