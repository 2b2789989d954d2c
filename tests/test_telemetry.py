"""Tracing end to end, into a real OTLP receiver (tests/otlp_collector.py, the session's `collector`).

The session's training run exports over OTLP/gRPC (OTEL_* variables), the session server over
OTLP/HTTP with protobuf (TUNEFETCH_TELEMETRY__* settings), both to the same collector (conftest).
Each process names itself in its resource (`tunefetch.component`, set once per process by
cluster.telemetry.setup_tracing), so spans of three different components come from three
different processes: here the gateway, retriever and generator replicas of Ray Serve.
"""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from conftest import KB, SECRET
from otlp_collector import GRPC, HTTP

BASE = "tiny-llama"
RAG_SPANS = {"chat", "resolve_model", "retrieve", "embed", "search", "generate"}


@pytest.fixture(scope="module")
def rag_trace(server, collector):
    """One chat request with an adapter and retrieval: (response body, traceparent, spans by name)."""
    response = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": "support", "messages": [{"role": "user", "content": "How long is the K-200 warranty?"}],
        "max_tokens": 8, "temperature": 0, "retrieval": {"kb": KB, "top_k": 1}})
    assert response.status_code == 200, response.text
    traceparent = response.headers["traceparent"]
    spans = collector.wait_for_trace(traceparent.split("-")[1], RAG_SPANS, timeout=30)
    return response.json(), traceparent, spans


def test_one_request_is_one_trace_across_the_gateway_retriever_and_generator_processes(rag_trace):
    body, traceparent, spans = rag_trace
    for name in RAG_SPANS:
        assert len(spans[name]) == 1, (name, spans[name])
    one = {name: found[0] for name, found in spans.items()}
    root = one["chat"]
    _, trace_id, span_id, _ = traceparent.split("-")
    assert root.trace_id == trace_id and root.span_id == span_id and root.parent_span_id == ""
    parents = {"resolve_model": "chat", "retrieve": "chat", "generate": "chat", "embed": "retrieve",
               "search": "retrieve"}
    for child, parent in parents.items():
        assert one[child].parent_span_id == one[parent].span_id, (child, parent)
        assert one[parent].start_ns <= one[child].start_ns <= one[child].end_ns <= one[parent].end_ns, (child, parent)
    components = {name: span.component for name, span in one.items()}
    assert components == {"chat": "gateway", "resolve_model": "gateway", "retrieve": "retriever",
                          "embed": "retriever", "search": "retriever", "generate": "generator"}
    assert len({(s.resource.get("service.instance.id"), s.component) for s in one.values()}) == 3
    assert {s.resource["service.name"] for s in one.values()} == {"tunefetch"}
    # The server's OTLP/HTTP exporter, with the credentials of its telemetry.headers setting.
    assert {s.protocol for s in one.values()} == {HTTP}
    assert {s.headers.get("x-api-key") for s in one.values()} == {SECRET}


def test_spans_carry_the_gen_ai_attributes_of_the_request(rag_trace):
    body, _, spans = rag_trace
    one = {name: found[0].attributes for name, found in spans.items()}
    usage = body["usage"]
    assert body["model"] == "support@v1"
    root = one["chat"]
    assert root["gen_ai.operation.name"] == "chat" and root["gen_ai.request.model"] == "support"
    assert root["tunefetch.adapter.version"] == body["model"]
    assert root["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
    assert root["gen_ai.usage.output_tokens"] == usage["completion_tokens"] > 0
    assert one["resolve_model"]["tunefetch.adapter.version"] == body["model"]
    assert one["resolve_model"]["tunefetch.adapter.name"] == "support"
    retrieve = one["retrieve"]
    assert retrieve["gen_ai.operation.name"] == "retrieval"
    assert retrieve["gen_ai.data_source.id"] == KB and retrieve["gen_ai.retrieval.top_k"] == 1
    assert one["search"]["tunefetch.retrieval.hits"] == 1
    assert one["search"]["tunefetch.kb.collection"] == body["citations"][0]["collection"]
    generate = one["generate"]
    assert generate["gen_ai.operation.name"] == "chat" and generate["gen_ai.request.model"] == body["model"]
    assert generate["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert generate["gen_ai.usage.output_tokens"] == usage["completion_tokens"]


def test_the_gateway_span_describes_the_response(rag_trace, cli):
    body, _, spans = rag_trace
    root = spans["chat"][0].attributes
    assert root.get("gen_ai.provider.name") == "vllm"
    assert root.get("gen_ai.response.model") == body["model"]
    reasons = root.get("gen_ai.response.finish_reasons")
    assert isinstance(reasons, (list, tuple)) and body["choices"][0]["finish_reason"] in reasons
    card_hash = root.get("tunefetch.card.hash")
    assert isinstance(card_hash, str) and card_hash
    assert root.get("tunefetch.canary.arm") == "none"  # `support` has no canary
    record = json.loads(cli("provenance", "show", body["provenance_id"], "--json").stdout)
    assert record["card_hash"] == card_hash and record["trace_id"] == spans["chat"][0].trace_id


def test_the_training_span_arrived_over_grpc_with_the_adapters_trace_id(adapter, cli, collector):
    [train] = collector.wait_for(lambda s: s.name == "train" and s.attributes.get("tunefetch.adapter.version") == adapter,
                                 timeout=30)
    record = json.loads(cli("adapters", "show", adapter, "--json").stdout)
    assert record["trace_id"] == train.trace_id and train.parent_span_id == ""
    assert train.protocol == GRPC and train.component == "training"
    assert train.attributes["tunefetch.training.run_id"] == record["run_id"]
    assert train.attributes["tunefetch.adapter.name"] == record["name"]
    assert train.end_ns - train.start_ns > 0


def test_the_callers_traceparent_is_continued(server, collector):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(f"{server}/v1/completions", timeout=60,
                          headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
                          json={"model": BASE, "prompt": "The K-200", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    _, answered_trace, answered_span, _ = response.headers["traceparent"].split("-")
    assert answered_trace == trace_id
    spans = collector.wait_for_trace(trace_id, {"text_completion", "generate"}, timeout=30)
    [root], [generate] = spans["text_completion"], spans["generate"]
    assert root.parent_span_id == parent_id and root.span_id == answered_span
    assert root.attributes["gen_ai.operation.name"] == "text_completion" and root.component == "gateway"
    assert generate.parent_span_id == root.span_id and generate.component == "generator"
    assert generate.attributes["gen_ai.operation.name"] == "text_completion"
    assert "resolve_model" not in spans and "retrieve" not in spans  # the base model, no retrieval
