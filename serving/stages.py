"""The request path as explicit stages, shared by streaming and non-streaming requests.

resolve model (stable or canary) -> retrieve -> generate -> record (provenance, metrics, the
canary's outcome log; a shadow copy). Each stage is a small object with three hooks:
`before(answer)` runs in order before the answer exists, `after(answer)` in reverse order once
it is complete (for a stream: after its last token, before `[DONE]`), `failed(answer, error)`
when the request fails. A stage decides by setting fields of the `Answer` or raising an
`APIError` (the request then fails with that status). Authentication, caching, guards and
feedback slot in as stages.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace

from opentelemetry import trace

from cluster.config import RagPolicy
from cluster.errors import UserError
from cluster.telemetry import inject_context, ms_since, trace_id_of, tracer
from serving.answer import Answer
from serving.canary import CANARY, SHADOW, Outcome
from serving.circuit import CircuitBreaker
from serving.generator import Generation
from serving.keys import Forbidden
from serving.prompts import CHAT_CONTEXT, CITE_CONTEXT, COMPLETION_CONTEXT
from serving.protocol import APIError, as_api_error
from serving.provenance import (SCHEMA_VERSION, AdapterUsed, ChunkUsed, ProvenanceLog, ProvenanceRecord,
                                RetrievalUsed, Usage, new_provenance_id)
from serving.releases import NotApproved, ReleaseBook

UNAVAILABLE = "retrieval_unavailable"  # the error code of a knowledge store backend that is down
ABSTAIN_MESSAGE = "I could not find anything relevant to this question in the knowledge base {kb!r}."


class Stage:
    async def before(self, answer: Answer) -> None:
        """Runs before the answer exists, in stage order."""

    async def after(self, answer: Answer) -> None:
        """Runs once the answer is complete, in reverse stage order."""

    async def failed(self, answer: Answer, error) -> None:
        """Runs when the request fails (`error` is the APIError it answers with)."""


class Authorize(Stage):
    """The API key's scope over what the request names (the adapter, NAME or NAME@vN, and the
    store), checked before either is looked up: a name outside the scope reveals nothing."""

    async def before(self, answer: Answer) -> None:
        key, request = answer.key, answer.request
        if key is None:
            return
        try:
            if request.model != answer.base_model.id:
                key.check_adapter(request.model.partition("@")[0])
            if request.retrieval is not None:
                key.check_kb(request.retrieval.kb)
        except Forbidden as exc:
            raise APIError(403, str(exc), "permission_error", code="forbidden") from None


class ResolveModel(Stage):
    """`model` -> None (the base model) or an immutable adapter version: NAME@vN exactly, or
    NAME: its stable version, or its canary for callers the split sends there."""

    def __init__(self, releases: ReleaseBook):
        self.releases = releases

    async def before(self, answer: Answer) -> None:
        model = answer.request.model
        if model == answer.base_model.id:
            return
        with tracer("tunefetch.gateway").start_as_current_span("resolve_model") as span:
            try:  # a registry may be remote (S3): look it up off the event loop
                route = await asyncio.to_thread(self.releases.route, model, answer.caller)
                version = await asyncio.to_thread(self.releases.registry.get, route.ref)
            except NotApproved as exc:
                raise APIError(403, str(exc), "permission_error", code="not_approved") from None
            except UserError as exc:
                raise APIError(404, f"model {model!r} does not exist ({exc})", code="model_not_found") from None
            span.set_attribute("tunefetch.adapter.name", version.name)
            span.set_attribute("tunefetch.adapter.version", version.ref)
            span.set_attribute("tunefetch.adapter.hash", version.content_hash)
            span.set_attribute("tunefetch.canary.arm", route.arm)
            if route.approval_id:
                span.set_attribute("tunefetch.approval.id", route.approval_id)
        answer.adapter, answer.arm, answer.approval_id = version, route.arm, route.approval_id
        answer.shadow, answer.canary_id = route.shadow, route.canary_id
        answer.span.set_attribute("tunefetch.canary.arm", route.arm)
        if route.approval_id:
            answer.span.set_attribute("tunefetch.approval.id", route.approval_id)


class Retrieve(Stage):
    """The request's `retrieval`: search, keep what the relevance policy allows, put the
    passages into the prompt with a versioned template (or abstain). Behind a circuit breaker:
    while the backend is down, requests fail at once (503, Retry-After) or, where the policy
    says so, are answered without context and say why."""

    def __init__(self, retriever, policy: RagPolicy):
        self.retriever = retriever
        self.policy = policy
        self.breaker = CircuitBreaker(policy.breaker_failures, policy.breaker_reset_s)

    async def before(self, answer: Answer) -> None:
        options = answer.request.retrieval
        if options is None:
            return
        policy = self.policy.merged(options)
        started = time.perf_counter()
        try:
            retrieved = await self.search(answer.query, options)
        except APIError as error:
            if error.code != UNAVAILABLE or policy.on_unavailable == "fail":
                raise
            answer.retrieval_error = error.message
            answer.span.set_attribute("tunefetch.retrieval.error", error.message)
            return  # answered without context: grounded false, with the reason
        finally:
            answer.retrieval_ms = ms_since(started)
        answer.top_scores = [round(h.score, 6) for h in retrieved.hits]
        answer.retrieved = replace(retrieved, hits=[h for h in retrieved.hits if h.score >= policy.min_score])
        if answer.guarded is not None:  # source allow-lists: other passages never reach the prompt
            answer.retrieved = replace(answer.retrieved, hits=answer.guarded.allowed_hits(answer, answer.retrieved.hits))
        answer.span.set_attribute("tunefetch.retrieval.relevant_hits", len(answer.retrieved.hits))
        if not answer.retrieved.hits:
            answer.abstained = policy.no_context == "abstain"
            answer.span.set_attribute("tunefetch.retrieval.abstained", answer.abstained)
            return  # "answer": generated without context, and the response says grounded: false
        texts = [hit.text for hit in answer.retrieved.hits]
        template = (CITE_CONTEXT if options.cite == "strict" else CHAT_CONTEXT if answer.chat
                    else COMPLETION_CONTEXT)
        answer.prompt = ({"messages": template.chat(answer.prompt["messages"], texts)} if answer.chat
                         else {"text": template.completion(answer.prompt["text"], texts)})
        answer.prompt_template = template.version


    async def search(self, query: str, options):
        """One search behind the breaker (also POST /v1/retrieve's): the backend's failures
        as 503 `retrieval_unavailable`, the caller's (unknown store, bad filter) as they are."""
        if not self.breaker.allow():
            wait = self.breaker.retry_after_s()
            raise APIError(503, f"the knowledge store backend is unavailable (circuit open: next try in {wait:.0f} s)",
                           "server_error", code=UNAVAILABLE, retry_after_s=wait)
        try:
            result = await self.retriever.retrieve.remote(options.kb, query, options.top_k, options.filters,
                                                          inject_context())
        except Exception as exc:  # noqa: BLE001 - classified: only an unavailable backend trips the breaker
            error = as_api_error(exc)
            if error.status == 503:
                self.breaker.failure()
                message = error.message if error.code == UNAVAILABLE else f"the retriever is unavailable ({error.message})"
                error = APIError(503, message, "server_error", code=UNAVAILABLE, retry_after_s=error.retry_after_s)
            else:
                self.breaker.success()  # e.g. an unknown store: the backend answered
            raise error from None
        self.breaker.success()
        return result


class Generate(Stage):
    """The generator replica for this answer: adapter requests carry NAME@vN as their Serve
    multiplexed model id, so Serve prefers a replica that already holds that adapter."""

    def __init__(self, generator, default_max_tokens: int):
        self.generator = generator
        self.default_max_tokens = default_max_tokens

    async def before(self, answer: Answer) -> None:
        if answer.generation is None and answer.abstained:
            answer.generation = abstention(answer)
        if answer.generation is not None:  # decided without the engine (abstained, or an earlier stage)
            if answer.request.stream:
                answer.chunks = _replay(answer.generation)
            return
        handle = self.generator.options(stream=answer.request.stream,
                                        multiplexed_model_id=answer.adapter.ref if answer.adapter else "")
        params = {**sampling_params(answer.request, self.default_max_tokens), "structured_outputs": answer.grammar}
        if answer.request.stream:
            answer.chunks = handle.generate_stream.remote(answer.prompt, params, inject_context())
        else:
            answer.generation = await handle.generate.remote(answer.prompt, params, inject_context())

    async def after(self, answer: Answer) -> None:
        answer.span.set_attribute("tunefetch.adapter.version", answer.adapter.ref if answer.adapter else "")
        answer.span.set_attribute("gen_ai.usage.input_tokens", answer.generation.prompt_tokens)
        answer.span.set_attribute("gen_ai.usage.output_tokens", answer.generation.completion_tokens)


class Record(Stage):
    """The provenance record, fsynced before the response goes out (off the event loop, so
    other requests go on). No answer leaves without its record: when the log cannot be written
    (disk full, read-only) the request fails with 503 and the answer is withheld (a stream,
    already sent, ends with the error event instead of [DONE])."""

    def __init__(self, log: ProvenanceLog, with_text: bool = True):
        self.log, self.with_text = log, with_text

    async def after(self, answer: Answer) -> None:
        try:
            await asyncio.to_thread(self.log.append, provenance_record(answer, self.with_text))
        except OSError as exc:
            raise APIError(503, f"the provenance log cannot be written ({exc.strerror or exc}): the answer is "
                                "withheld", "server_error", code="provenance_unavailable") from None


class CanaryOutcome(Stage):
    """Every answer and failure on a canary's arms goes into its outcome log, then the analysis
    looks again (and may roll back, step or promote: the next request sees the decision)."""

    def __init__(self, releases: ReleaseBook):
        self.releases = releases

    async def after(self, answer: Answer) -> None:
        await self._record(answer, ok=True)

    async def failed(self, answer: Answer, error) -> None:
        await self._record(answer, ok=False)

    async def _record(self, answer: Answer, ok: bool) -> None:
        if answer.canary_id is None:
            return
        has_retrieval = answer.request.retrieval is not None
        outcome = Outcome(arm=CANARY if answer.arm == SHADOW else answer.arm, ok=ok, latency_ms=ms_since(answer.started), time=time.time(),
                          abstained=answer.abstained if has_retrieval and ok else None,
                          cited=answer.cited() if ok else None, provenance_id=answer.provenance_id if ok else None)
        name = answer.adapter.name
        await asyncio.to_thread(self.releases.record, name, answer.canary_id, outcome)
        decision = await asyncio.to_thread(self.releases.decide, name)
        if decision is not None:
            answer.span.add_event("tunefetch.canary.decision", {"action": decision.action, "reason": decision.reason})


class Shadow(Stage):
    """In a shadow canary the candidate answers a copy of the request once the caller's answer
    is complete; the copy is recorded (provenance arm "shadow") and counts as the canary arm
    in the analysis, but never reaches the caller."""

    def __init__(self, releases: ReleaseBook, produce: list[Stage], record: list[Stage]):
        self.releases, self.produce, self.record = releases, produce, record
        self._tasks: set[asyncio.Task] = set()

    async def after(self, answer: Answer) -> None:
        if answer.shadow is None or answer.abstained:
            return
        task = asyncio.create_task(self._mirror(answer))
        self._tasks.add(task)  # held until done: the event loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, answer: Answer) -> None:
        version = await asyncio.to_thread(self.releases.registry.get, answer.shadow)
        span = tracer("tunefetch.gateway").start_span("shadow", context=trace.set_span_in_context(answer.span))
        copy = replace(answer, adapter=version, arm=SHADOW, approval_id=None, shadow=None, generation=None,
                       chunks=None, span=span, started=time.perf_counter(), provenance_id=new_provenance_id(),
                       request=answer.request.model_copy(update={"stream": False}), schema_valid=None,
                       attribution=None, guarded=replace(answer.guarded, decisions=[]) if answer.guarded else None)
        try:
            with trace.use_span(span, end_on_exit=False):
                for stage in self.produce:  # generation and its output guards
                    await stage.before(copy)
                for stage in self.record:
                    await stage.after(copy)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is an outcome, not the caller's error
            for stage in self.record:
                await stage.failed(copy, exc)
        finally:
            span.end()


_TEXT_LIMIT = 4000  # characters of question and answer a record keeps


def provenance_record(answer: Answer, with_text: bool = True) -> ProvenanceRecord:
    adapter, retrieved, generation = answer.adapter, answer.retrieved, answer.generation
    return ProvenanceRecord(
        schema_version=SCHEMA_VERSION,
        provenance_id=answer.provenance_id,
        request_id=answer.provenance_id.removeprefix("prov-"),
        trace_id=trace_id_of(answer.span),
        time=time.time(),
        latency_ms=ms_since(answer.started),
        retrieval_ms=answer.retrieval_ms,
        generation_ms=generation.elapsed_ms,
        requested_model=answer.request.model,
        stream=answer.request.stream,
        base_model=answer.base_model,
        adapter=AdapterUsed(ref=adapter.ref, content_hash=adapter.content_hash,
                            run_id=adapter.record.run_id) if adapter else None,
        canary_arm=answer.arm,
        canary_id=answer.canary_id,
        approval_id=answer.approval_id,
        tenant=answer.key.tenant if answer.key else None,
        key_id=answer.key.key_id if answer.key else None,
        card_hash=answer.card_hash,
        generator_replica=generation.replica,
        retrieval=None if retrieved is None else RetrievalUsed(
            kb=retrieved.kb, collection=retrieved.collection, kb_version=retrieved.kb_version,
            chunks=[ChunkUsed(chunk_id=h.chunk_id, doc_id=h.doc_id, kb_version=h.kb_version, score=round(h.score, 6))
                    for h in retrieved.hits], top_scores=answer.top_scores),
        prompt_template=answer.prompt_template,
        abstained=answer.abstained,
        retrieval_error=answer.retrieval_error,
        output_hash=hashlib.sha256("\x1e".join(generation.texts).encode()).hexdigest(),
        usage=Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
        question=answer.query[:_TEXT_LIMIT] if with_text else None,
        answer=generation.texts[0][:_TEXT_LIMIT] if with_text and generation.texts else None,
        guards=[d.to_json() for d in answer.guarded.decisions] if answer.guarded else [],
        output_format=answer.output_format,
        schema_valid=answer.schema_valid,
        attribution=answer.attribution,
    )


def abstention(answer: Answer) -> Generation:
    """The fixed answer when nothing relevant was retrieved and the policy is to abstain."""
    text = ABSTAIN_MESSAGE.format(kb=answer.request.retrieval.kb)
    return Generation([text] * answer.n, ["stop"] * answer.n, 0, 0)


async def _replay(generation: Generation):
    """A known generation in the generator's stream item shape."""
    for i, text in enumerate(generation.texts):
        yield {"index": i, "text": text, "finish_reason": generation.finish_reasons[i]}
    yield {"usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens}}


def sampling_params(request, default_max_tokens: int) -> dict:
    return {"max_tokens": request.max_tokens or default_max_tokens, "min_tokens": request.min_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "stop": request.stop, "seed": request.seed,
            "n": request.n, "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty}
