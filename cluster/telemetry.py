"""OpenTelemetry set-up: one TracerProvider per process, W3C context across processes.

With `telemetry.exporter: none` spans still get trace ids (provenance records and the
`traceparent` response header carry them) but no processor exports anything. The OTLP
exporter reads the standard OTEL_EXPORTER_OTLP_* variables when the config leaves the endpoint
empty, as every OpenTelemetry user expects.
"""

from __future__ import annotations

import threading
import time

from cluster.config import TelemetryConfig

_lock = threading.Lock()
_configured = False


def setup_tracing(config: TelemetryConfig, component: str) -> None:
    """Installs the global TracerProvider once per process (idempotent)."""
    global _configured
    with _lock:
        if _configured:
            return
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name, "tunefetch.component": component}),
            sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)),
        )
        if config.exporter != "none":
            exporter = ConsoleSpanExporter() if config.exporter == "console" else _otlp_exporter(config)
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _configured = True


def _otlp_exporter(config: TelemetryConfig):
    kwargs = {"endpoint": config.endpoint} if config.endpoint else {}
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(insecure=True, **kwargs) if config.endpoint else OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if config.endpoint and not config.endpoint.rstrip("/").endswith("/v1/traces"):
        kwargs["endpoint"] = config.endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(**kwargs)


def shutdown_tracing() -> None:
    """Flushes pending spans (call before a short-lived process exits)."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def ms_since(started: float) -> float:
    """Milliseconds since a `time.perf_counter()` reading, for records that carry timings."""
    return round((time.perf_counter() - started) * 1000, 2)


def tracer(name: str = "tunefetch"):
    from opentelemetry import trace

    return trace.get_tracer(name)


def inject_context() -> dict:
    """The current span context as W3C headers, to pass to another process."""
    from opentelemetry.propagate import inject

    carrier: dict = {}
    inject(carrier)
    return carrier


def extract_context(carrier: dict | None):
    from opentelemetry.propagate import extract

    return extract(carrier or {})


def trace_id_of(span) -> str | None:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def traceparent_of(span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
