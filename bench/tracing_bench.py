"""Tracing benchmark: what tunefetch's spans cost per request, tracing on vs off, one run, one process.

    .venv/bin/python bench/tracing_bench.py [--rounds 3] [--requests 2000] [--out FILE]

Each "request" is the span work of one chat request with an adapter and retrieval, as the
gateway, retriever and generator do it (serving/gateway.py, stages.py, retriever.py,
generator.py): extract the caller's context from the HTTP headers, the root span with its
attributes, resolve_model, W3C context injected for the retriever and extracted there,
retrieve/embed/search, injected again for the generator, generate, the response attributes
on the root span, its `traceparent` header. 6 spans, 25 attributes, no model work: the cost
of tracing alone, in one process (the real request spreads it over three).

Modes, each with its own TracerProvider built as cluster.telemetry.setup_tracing builds it:
  api_noop     no SDK at all (OpenTelemetry's no-op API): the floor, not a tunefetch setting
  off          tunefetch's default (telemetry.exporter none): SDK spans with ids, no exporter
  otlp_http    exporter otlp, http/protobuf: BatchSpanProcessor + the OTLP/HTTP exporter
  otlp_grpc    exporter otlp, grpc: BatchSpanProcessor + the OTLP/gRPC exporter
The exporters send to a real OTLP receiver (tests/otlp_collector.py) in a child process, so its
decoding is not counted, and the benchmark checks that every span arrived. Per mode: wall
microseconds per request on the request path, and process CPU microseconds per request,
including the exporter thread's batching, encoding and sending (flushed before the clock stops).
The batch queue is sized for the whole measurement: a loop with no model in it makes spans
~1,000x faster than the server does, and the SDK's default 2,048-span queue would drop them
(spans not exported are spans not paid for). Modes rotate each round; the report gives every
round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)

MODES = ("api_noop", "off", "otlp_http", "otlp_grpc")
SPANS_PER_REQUEST = 6
WARMUP = 200
HEADERS = {"host": "127.0.0.1:8000", "user-agent": "python-httpx/0.28", "accept": "*/*",
           "content-type": "application/json", "content-length": "212"}


def receiver() -> None:
    """Child process: the test suite's OTLP receiver; prints its ports, then answers each
    line on stdin with the spans received so far per protocol."""
    sys.path.insert(0, str(ROOT / "tests"))
    from otlp_collector import GRPC, HTTP, OTLPCollector

    with OTLPCollector() as collector:
        print(json.dumps({"grpc": collector.endpoint(GRPC), "http": collector.endpoint(HTTP)}), flush=True)
        for _ in sys.stdin:
            spans = collector.spans()
            print(json.dumps({p: sum(s.protocol == p for s in spans) for p in (GRPC, HTTP)}), flush=True)


def provider(mode: str, endpoints: dict, queue: int):
    """A TracerProvider as setup_tracing builds one for `mode` (None: the no-op API)."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from cluster.config import TelemetryConfig
    from cluster.telemetry import _otlp_exporter

    if mode == "api_noop":
        return trace.NoOpTracerProvider()
    made = TracerProvider(resource=Resource.create({"tunefetch.component": "bench", "service.name": "tunefetch"}),
                          sampler=ParentBased(TraceIdRatioBased(1.0)))
    if mode != "off":
        protocol = "grpc" if mode == "otlp_grpc" else "http/protobuf"
        exporter = _otlp_exporter(TelemetryConfig(exporter="otlp", protocol=protocol,
                                                  endpoint=endpoints["grpc" if protocol == "grpc" else "http"]))
        made.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=queue))
    return made


def one_request(gateway, retriever, generator) -> str | None:
    """The span work of one chat request with an adapter and retrieval (see the module doc)."""
    from opentelemetry import trace

    from cluster.telemetry import extract_context, inject_context, traceparent_of

    span = gateway.start_span("chat", context=extract_context(dict(HEADERS)))
    span.set_attribute("gen_ai.operation.name", "chat")
    span.set_attribute("gen_ai.request.model", "support")
    span.set_attribute("gen_ai.provider.name", "vllm")
    span.set_attribute("tunefetch.card.hash", "9f2c" * 16)
    with trace.use_span(span, end_on_exit=False):
        with gateway.start_as_current_span("resolve_model") as resolve:
            resolve.set_attribute("tunefetch.adapter.name", "support")
            resolve.set_attribute("tunefetch.adapter.version", "support@v1")
            resolve.set_attribute("tunefetch.adapter.hash", "ab12" * 16)
        carrier = inject_context()
        with retriever.start_as_current_span("retrieve", context=extract_context(carrier)) as retrieve:
            retrieve.set_attribute("gen_ai.operation.name", "retrieval")
            retrieve.set_attribute("gen_ai.data_source.id", "kestrel")
            retrieve.set_attribute("gen_ai.retrieval.top_k", 3)
            with retriever.start_as_current_span("embed"):
                pass
            with retriever.start_as_current_span("search") as search:
                search.set_attribute("tunefetch.kb.collection", "kestrel__v1")
                search.set_attribute("tunefetch.kb.version", 1)
                search.set_attribute("tunefetch.retrieval.hits", 3)
        span.set_attribute("tunefetch.retrieval.relevant_hits", 3)
        carrier = inject_context()
        with generator.start_as_current_span("generate", context=extract_context(carrier)) as generate:
            generate.set_attribute("gen_ai.operation.name", "chat")
            generate.set_attribute("gen_ai.request.model", "support@v1")
            generate.set_attribute("tunefetch.generator.replica", "abc123")
            generate.set_attribute("gen_ai.request.max_tokens", 64)
            generate.set_attribute("gen_ai.usage.input_tokens", 180)
            generate.set_attribute("gen_ai.usage.output_tokens", 64)
        span.set_attribute("tunefetch.adapter.version", "support@v1")
        span.set_attribute("gen_ai.usage.input_tokens", 180)
        span.set_attribute("gen_ai.usage.output_tokens", 64)
        span.set_attribute("gen_ai.response.model", "support@v1")
        span.set_attribute("gen_ai.response.finish_reasons", ["length"])
    header = traceparent_of(span)
    span.end()
    return header


def measure(tracer_provider, requests: int) -> dict:
    tracers = [tracer_provider.get_tracer(f"tunefetch.{c}") for c in ("gateway", "retriever", "generator")]
    for _ in range(WARMUP):
        one_request(*tracers)
    if hasattr(tracer_provider, "force_flush"):
        tracer_provider.force_flush()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        one_request(*tracers)
    loop_s = time.perf_counter() - wall
    if hasattr(tracer_provider, "force_flush"):
        tracer_provider.force_flush()
    return {"request_us": loop_s / requests * 1e6, "cpu_us": (time.process_time() - cpu) / requests * 1e6,
            "flush_ms": (time.perf_counter() - wall - loop_s) * 1000}


def summarize(rounds: list[dict]) -> dict:
    def median(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in rounds)

    summary = {mode: {key: round(median(mode, key), 1) for key in ("request_us", "cpu_us")} for mode in MODES}
    for mode in ("otlp_http", "otlp_grpc"):
        summary[mode]["cpu_ratio_vs_off"] = round(statistics.median(r[mode]["cpu_us"] / r["off"]["cpu_us"]
                                                                    for r in rounds), 2)
        summary[mode]["extra_cpu_us_vs_off"] = round(statistics.median(r[mode]["cpu_us"] - r["off"]["cpu_us"]
                                                                       for r in rounds), 1)
        summary[mode]["extra_request_us_vs_off"] = round(statistics.median(
            r[mode]["request_us"] - r["off"]["request_us"] for r in rounds), 1)
    summary["off"]["extra_cpu_us_vs_api_noop"] = round(statistics.median(
        r["off"]["cpu_us"] - r["api_noop"]["cpu_us"] for r in rounds), 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        return receiver()
    child = subprocess.Popen([sys.executable, __file__, "--receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    try:
        endpoints = json.loads(child.stdout.readline())
        queue = (WARMUP + args.requests) * SPANS_PER_REQUEST
        providers = {mode: provider(mode, endpoints, queue) for mode in MODES}
        expected = {"grpc": 0, "http/protobuf": 0}
        rounds = []
        for index in range(args.rounds):
            order = MODES[index % len(MODES):] + MODES[:index % len(MODES)]
            rounds.append({mode: measure(providers[mode], args.requests) for mode in order})
            for mode, protocol in (("otlp_grpc", "grpc"), ("otlp_http", "http/protobuf")):
                expected[protocol] += (WARMUP + args.requests) * SPANS_PER_REQUEST
            child.stdin.write("count\n")
            child.stdin.flush()
            received = json.loads(child.stdout.readline())
            rounds[-1]["spans_received"] = received
            if received != expected:
                raise SystemExit(f"spans lost: expected {expected}, the receiver got {received}")
        for made in providers.values():
            if hasattr(made, "shutdown"):
                made.shutdown()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    emit({"machine": {"cpus": os.cpu_count()}, "requests_per_measurement": args.requests,
          "spans_per_request": SPANS_PER_REQUEST, "summary": summarize(rounds), "rounds": rounds}, args.out)


if __name__ == "__main__":
    main()
