"""OpenTelemetry set-up: one TracerProvider per process, W3C context across processes.

With no exporter, spans still get trace ids (provenance records and the `traceparent` response
header carry them) but nothing is exported. The standard variables work as every OpenTelemetry
user expects: OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG], OTEL_TRACES_EXPORTER,
OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,PROTOCOL,HEADERS}; a `telemetry` key set explicitly in the
config (file, TUNEFETCH_TELEMETRY__* or a flag) wins over its variable.
"""

from __future__ import annotations

import os
import threading
import time

from cluster.config import TelemetryConfig, secret_value

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

        explicit = config.model_fields_set
        attributes = {"tunefetch.component": component}
        if "service_name" in explicit or not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = config.service_name  # else the SDK reads OTEL_SERVICE_NAME
        # sampler=None: the SDK builds it from OTEL_TRACES_SAMPLER[_ARG].
        sampler = (ParentBased(TraceIdRatioBased(config.sampling_ratio))
                   if "sampling_ratio" in explicit or not os.environ.get("OTEL_TRACES_SAMPLER") else None)
        provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        exporter = exporter_kind(config)
        if exporter != "none":
            span_exporter = ConsoleSpanExporter() if exporter == "console" else _otlp_exporter(config)
            provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        _configured = True


def exporter_kind(config: TelemetryConfig) -> str:
    """none | console | otlp: the config's if set, else OTEL_TRACES_EXPORTER's first known value."""
    if "exporter" in config.model_fields_set:
        return config.exporter
    named = [v.strip() for v in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return next((v for v in named if v in ("none", "console", "otlp")), config.exporter)


def otlp_protocol(config: TelemetryConfig) -> str:
    if "protocol" in config.model_fields_set:
        return config.protocol
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or config.protocol)


def _otlp_exporter(config: TelemetryConfig):
    # Unset endpoint/headers: the exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT/HEADERS.
    kwargs: dict = {}
    headers = secret_value(config.headers)
    if headers:
        kwargs["headers"] = dict(pair.split("=", 1) for pair in headers.split(",") if "=" in pair)
    if otlp_protocol(config) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if config.endpoint:
            kwargs.update(endpoint=config.endpoint, insecure=not config.endpoint.startswith("https://"))
        return OTLPSpanExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if config.endpoint:
        endpoint = config.endpoint.rstrip("/")
        kwargs["endpoint"] = endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"
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
