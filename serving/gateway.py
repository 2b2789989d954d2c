"""The ingress deployment: an OpenAI-compatible API in front of the retriever and generator.

A request runs the stages of serving/stages.py (resolve model -> retrieve -> generate ->
record), the same for streaming and whole answers, inside one trace continued from the
caller's `traceparent` and returned in the response header.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.config import RegistryConfig, ServingConfig, TelemetryConfig
from cluster.telemetry import extract_context, setup_tracing, traceparent_of, tracer
from serving.answer import Answer, sse, usage
from serving.generator import Generation
from serving.prompts import last_user_message
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, now, parse_request
from serving.provenance import ProvenanceLog
from serving.stages import Generate, Record, ResolveModel, Retrieve, Stage
from training.local_model import ModelIdentity
from training.registry import open_registry

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
    def __init__(self, serving: ServingConfig, registry: RegistryConfig, telemetry: TelemetryConfig,
                 provenance_dir: str, base_model: ModelIdentity, retriever, generator):
        setup_tracing(telemetry, "gateway")
        self.base_model = base_model
        self.registry = open_registry(registry)
        self.max_request_bytes = serving.max_request_bytes
        self.tracer = tracer("tunefetch.gateway")
        self.stages: list[Stage] = [
            ResolveModel(self.registry),
            Retrieve(retriever, serving.rag),
            Generate(generator, serving.default_max_tokens),
            Record(ProvenanceLog(provenance_dir)),
        ]

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self):
        return await asyncio.to_thread(self._models)

    def _models(self) -> dict:
        created = now()
        base = self.base_model.id
        data = [{"id": base, "object": "model", "created": created, "owned_by": "tunefetch", "root": base,
                 "parent": None}]
        for version in self.registry.all():
            data.append({"id": version.ref, "object": "model", "created": int(version.record.created_at),
                         "owned_by": "tunefetch", "root": version.name, "parent": base})
        for name in self.registry.names():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "tunefetch",
                         "root": self.registry.get(name).ref, "parent": base})
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
        answer = Answer(body, chat, prompt, query, self.base_model, span, started)
        try:
            with trace.use_span(span, end_on_exit=False):
                for stage in self.stages:
                    await stage.before(answer)
                if body.stream:
                    chunks = await _primed(answer.chunks)
                    return StreamingResponse(self._stream(answer, chunks), media_type="text/event-stream",
                                             headers=_trace_header(span))
                await self._after(answer)
        except Exception as exc:  # noqa: BLE001 - every failure answers in the OpenAI shape
            span.end()
            return _error_response(exc, span)
        span.end()
        return JSONResponse(answer.body(), headers=_trace_header(span))

    async def _after(self, answer: Answer) -> None:
        for stage in reversed(self.stages):
            await stage.after(answer)

    async def _stream(self, answer: Answer, chunks):
        """SSE in the OpenAI chunk format; the stages' `after` hooks (provenance) run before `[DONE]`."""
        texts: dict[int, str] = {}
        reasons: dict[int, str | None] = {}
        counts = {"prompt_tokens": 0, "completion_tokens": 0}
        replica = elapsed_ms = None
        try:
            with trace.use_span(answer.span, end_on_exit=False):
                yield sse(answer.chunk([{"index": i, **answer.delta("", first=True)} for i in range(answer.n)]))
                async for item in chunks:
                    if "usage" in item:
                        counts, replica, elapsed_ms = item["usage"], item.get("replica"), item.get("elapsed_ms")
                        continue
                    texts[item["index"]] = texts.get(item["index"], "") + item["text"]
                    reasons[item["index"]] = item["finish_reason"]
                    yield sse(answer.chunk([{"index": item["index"], **answer.delta(item["text"]),
                                              "finish_reason": item["finish_reason"]}]))
                answer.generation = Generation([texts.get(i, "") for i in range(answer.n)],
                                               [reasons.get(i) for i in range(answer.n)],
                                               counts["prompt_tokens"], counts["completion_tokens"], replica,
                                               elapsed_ms)
                await self._after(answer)
            if answer.include_usage:
                yield sse(answer.chunk([], usage=usage(answer.generation)))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - mid-stream failures become an error event
            yield sse(_as_api_error(exc).body())
        finally:
            answer.span.end()
