"""The ingress deployment: an OpenAI-compatible API in front of the retriever and generator.

A request is a fixed sequence of explicit steps: resolve the model (base, adapter, exact
version) -> retrieve (if asked) -> generate -> write provenance -> respond. Each step is a span
of one trace, continued from the caller's `traceparent` and returned in the response header.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from cluster.telemetry import (extract_context, inject_context, ms_since, setup_tracing, trace_id_of,
                               traceparent_of, tracer)
from serving.answer import Answer, abstention, abstention_stream, sampling_params, sse, usage
from serving.generator import Generation
from serving.prompts import TEMPLATE_VERSION, last_user_message, with_context
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, now, parse_request
from serving.provenance import ProvenanceLog
from training.registry import AdapterVersion, open_registry

api = FastAPI(title="tunefetch", description="OpenAI-compatible API with retrieval, citations and provenance.")


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


def _as_api_error(exc: Exception) -> APIError:
    """Errors raised in other replicas arrive wrapped; keep their status and message. Overload
    is 429 and a missing or dying replica 503: both are worth a retry (Retry-After)."""
    if isinstance(exc, APIError) or hasattr(exc, "status") and hasattr(exc, "message"):
        return APIError(exc.status, exc.message, getattr(exc, "type", "invalid_request_error"), getattr(exc, "code", None))
    if isinstance(exc, BackPressureError):
        return APIError(429, "the server is at capacity: retry shortly", "rate_limit_error", code="server_overloaded")
    if isinstance(exc, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        return APIError(503, "the model server is unavailable: retry shortly", "server_error", code="service_unavailable")
    return APIError(500, f"internal error: {exc.__class__.__name__}", "server_error")


def _trace_header(span) -> dict:
    value = traceparent_of(span)
    return {"traceparent": value} if value else {}


def _error_response(exc: Exception, span) -> JSONResponse:
    error = _as_api_error(exc)
    span.set_attribute("error.type", error.type)
    headers = _trace_header(span)
    if error.status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _primed(chunks):
    """A stream whose first item is already here: failures before the first token (overload,
    context length) still answer with their own status instead of a 200 and an error event."""
    first = await chunks.__anext__()

    async def items():
        yield first
        async for item in chunks:
            yield item

    return items()


# Module helpers stay above: serve.ingress captures the class (and what it references) here.
@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(self, config: TunefetchConfig, retriever, generator, base_model: dict):
        setup_tracing(config.telemetry, "gateway")
        self.retriever = retriever
        self.generator = generator
        self.base_model = base_model  # {"id", "sha256"}
        self.registry = open_registry(config)
        self.provenance = ProvenanceLog(config.paths.provenance)
        self.default_max_tokens = config.serving.default_max_tokens
        self.rag_policy = config.serving.rag
        self.max_request_bytes = config.serving.max_request_bytes
        self.tracer = tracer("tunefetch.gateway")

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self):
        return await asyncio.to_thread(self._models)

    def _models(self) -> dict:
        created = now()
        data = [{"id": self.base_model["id"], "object": "model", "created": created, "owned_by": "tunefetch",
                 "root": self.base_model["id"], "parent": None}]
        for version in self.registry.all():
            data.append({"id": version.ref, "object": "model", "created": int(version.metadata.get("created_at", created)),
                         "owned_by": "tunefetch", "root": version.name, "parent": self.base_model["id"]})
        for name in self.registry.names():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "tunefetch",
                         "root": self.registry.get(name).ref, "parent": self.base_model["id"]})
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._body(request, ChatCompletionRequest)
        messages = [m.model_dump() for m in body.messages]
        return await self._complete(body, request, {"messages": messages}, last_user_message(messages), chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request, CompletionRequest)
        return await self._complete(body, request, {"text": body.prompt}, body.prompt, chat=False)

    async def _body(self, request: Request, model):
        """The request body, size-checked (413) before it is parsed and validated (400)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {self.max_request_bytes} "
                                f"bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > self.max_request_bytes:
            raise APIError(413, f"request body exceeds the limit of {self.max_request_bytes} bytes",
                           code="request_too_large")
        return parse_request(raw, model)

    # -- the request pipeline ---------------------------------------------------------------
    async def _complete(self, body, request: Request, prompt: dict, query: str, chat: bool):
        started = time.perf_counter()
        operation = "chat" if chat else "text_completion"
        # Ended by hand: a streamed answer outlives this function.
        span = self.tracer.start_span(operation, context=extract_context(dict(request.headers)))
        span.set_attribute("gen_ai.operation.name", operation)
        span.set_attribute("gen_ai.request.model", body.model)
        try:
            with trace.use_span(span, end_on_exit=False):
                adapter = await self._resolve_model(body.model)
                answer = Answer(body, chat, adapter, None, self.base_model["id"], span, started)
                if body.retrieval:
                    prompt = await self._ground(answer, prompt, query)
                if body.stream:
                    chunks = await _primed(self._chunks(answer, prompt))
                    return StreamingResponse(self._stream(answer, chunks), media_type="text/event-stream",
                                             headers=_trace_header(span))
                generation = abstention(answer) if answer.abstained else await self._generator(answer).generate.remote(
                    prompt, sampling_params(body, self.default_max_tokens), inject_context())
        except Exception as exc:  # noqa: BLE001 - every failure answers in the OpenAI shape
            span.end()
            return _error_response(exc, span)
        with trace.use_span(span, end_on_exit=True):
            await self._finish(answer, generation)
            return JSONResponse(answer.body(generation), headers=_trace_header(span))

    async def _ground(self, answer: Answer, prompt: dict, query: str) -> dict:
        """Retrieves, applies the relevance policy, and puts the passages into the prompt."""
        options = answer.request.retrieval
        started = time.perf_counter()
        retrieved = await self.retriever.retrieve.remote(options.kb, query, options.top_k, options.filters,
                                                         inject_context())
        answer.retrieval_ms = ms_since(started)
        policy = self.rag_policy.merged(options)
        answer.retrieved = replace(retrieved, hits=[h for h in retrieved.hits if h.score >= policy.min_score])
        answer.span.set_attribute("tunefetch.retrieval.relevant_hits", len(answer.retrieved.hits))
        if answer.retrieved.hits:
            return self._with_context(prompt, answer.retrieved, answer.chat)
        answer.abstained = policy.no_context == "abstain"
        answer.span.set_attribute("tunefetch.retrieval.abstained", answer.abstained)
        return prompt  # "answer": ungrounded, and the response says so

    def _generator(self, answer: Answer, stream: bool = False):
        """The generator handle for this answer: adapter requests carry NAME@vN as their
        multiplexed model id, so Serve prefers a replica that already holds that adapter."""
        return self.generator.options(stream=stream, multiplexed_model_id=answer.adapter.ref if answer.adapter else "")

    def _chunks(self, answer: Answer, prompt: dict):
        if answer.abstained:
            return abstention_stream(answer)
        return self._generator(answer, stream=True).generate_stream.remote(
            prompt, sampling_params(answer.request, self.default_max_tokens), inject_context())

    async def _stream(self, answer: Answer, chunks):
        """SSE in the OpenAI chunk format; provenance is written before `[DONE]`."""
        texts: dict[int, str] = {}
        reasons: dict[int, str | None] = {}
        counts = {"prompt_tokens": 0, "completion_tokens": 0}
        replica = elapsed_ms = None
        try:
            yield sse(answer.chunk([{"index": i, **answer.delta("", first=True)} for i in range(answer.n)]))
            async for item in chunks:
                if "usage" in item:
                    counts, replica, elapsed_ms = item["usage"], item.get("replica"), item.get("elapsed_ms")
                    continue
                texts[item["index"]] = texts.get(item["index"], "") + item["text"]
                reasons[item["index"]] = item["finish_reason"]
                yield sse(answer.chunk([{"index": item["index"], **answer.delta(item["text"]),
                                          "finish_reason": item["finish_reason"]}]))
            generation = Generation([texts.get(i, "") for i in range(answer.n)],
                                    [reasons.get(i) for i in range(answer.n)],
                                    counts["prompt_tokens"], counts["completion_tokens"], replica, elapsed_ms)
            await self._finish(answer, generation)
            if answer.include_usage:
                yield sse(answer.chunk([], usage=usage(generation)))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - mid-stream failures become an error event
            yield sse(_as_api_error(exc).body())
        finally:
            answer.span.end()

    async def _finish(self, answer: Answer, generation: Generation) -> None:
        span = answer.span
        span.set_attribute("tunefetch.adapter.version", answer.adapter.ref if answer.adapter else "")
        span.set_attribute("gen_ai.usage.input_tokens", generation.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", generation.completion_tokens)
        # fsynced before the response goes out, off the event loop so other requests go on
        await asyncio.to_thread(self.provenance.append, self._record(answer, generation))

    async def _resolve_model(self, model: str) -> AdapterVersion | None:
        if model == self.base_model["id"]:
            return None
        with self.tracer.start_as_current_span("resolve_model") as span:
            try:  # a registry may be remote (S3): look it up off the event loop
                version = await asyncio.to_thread(self.registry.get, model)
            except UserError as exc:
                raise APIError(404, f"model {model!r} does not exist ({exc})", code="model_not_found") from None
            span.set_attribute("tunefetch.adapter.name", version.name)
            span.set_attribute("tunefetch.adapter.version", version.ref)
            span.set_attribute("tunefetch.adapter.hash", version.content_hash)
            return version

    def _with_context(self, prompt: dict, retrieved, chat: bool) -> dict:
        passages = [hit.text for hit in retrieved.hits]
        if chat:
            return {"messages": with_context(prompt["messages"], passages)}
        context = "\n\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
        return {"text": f"Context:\n{context}\n\n{prompt['text']}"}

    def _record(self, answer: Answer, generation: Generation) -> dict:
        adapter, retrieved = answer.adapter, answer.retrieved
        return {
            "provenance_id": answer.provenance_id,
            "request_id": answer.provenance_id.removeprefix("prov-"),
            "trace_id": trace_id_of(answer.span),
            "time": time.time(),
            "latency_ms": ms_since(answer.started),  # in the gateway, of which:
            "retrieval_ms": answer.retrieval_ms,  # the retrieval call (None: no retrieval)
            "generation_ms": generation.elapsed_ms,  # in the generator replica (None: abstained)
            "requested_model": answer.request.model,
            "stream": answer.request.stream,
            "base_model": self.base_model,
            "adapter": {"ref": adapter.ref, "content_hash": adapter.content_hash,
                        "run_id": adapter.metadata.get("run_id")} if adapter else None,
            "canary_arm": None,
            "generator_replica": generation.replica,
            "retrieval": None if retrieved is None else {
                "kb": retrieved.kb, "collection": retrieved.collection, "kb_version": retrieved.kb_version,
                "chunks": [{"chunk_id": h.chunk_id, "doc_id": h.doc_id, "kb_version": h.kb_version,
                            "score": round(h.score, 6)} for h in retrieved.hits],
            },
            "prompt_template": TEMPLATE_VERSION if retrieved is not None and retrieved.hits else None,
            "abstained": answer.abstained,
            "output_hash": hashlib.sha256("\x1e".join(generation.texts).encode()).hexdigest(),
            "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens},
        }
