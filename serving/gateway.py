"""The ingress deployment: an OpenAI-compatible API in front of the retriever and generator.

A request runs the stages of serving/stages.py (resolve model -> retrieve -> generate ->
record), the same for streaming and whole answers, inside one trace continued from the
caller's `traceparent` and returned in the response header.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import GovernanceConfig, RegistryConfig, ServingConfig, TelemetryConfig
from cluster.errors import NotFound, UserError
from cluster.telemetry import extract_context, setup_tracing, trace_id_of, traceparent_of, tracer
from retrieval.cache import LRU
from serving import card, card_facts
from serving import monitor as drift_monitor
from serving.answer import Answer, sse, usage
from serving.attribution import Constrain, Verify
from serving.canary import Outcome
from serving.feedback import FeedbackEvent, FeedbackLog, FeedbackRequest, feedback_id
from serving.generator import Generation
from serving.guards import GuardBook, GuardInput, GuardOutput, feedback_text
from serving.keys import ApiKey, Forbidden, KeyRing, KeysUnavailable
from serving.metrics import Measure, only_series
from serving.prompts import last_user_message
from serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, RetrieveRequest, as_api_error, now,
                              openapi,
                              parse_request)
from serving.provenance import PROVENANCE_ID, ProvenanceLog
from serving.refusals import RefusalLog
from serving.releases import ReleaseBook
from serving.stages import Authorize, CanaryOutcome, Generate, Record, ResolveModel, Retrieve, Shadow, Stage
from training.approvals import ApprovalStore
from training.local_model import ModelIdentity
from training.registry import open_registry

MONITOR_REUSE_S = 5.0  # GET /v1/admin/monitor answers with a report at most this old
CARD_REFRESH_S = 10.0  # the card hash stamped on answers is at most this old (and fresh after a release change)

api = FastAPI(title="tunefetch", description="OpenAI-compatible API with retrieval, citations and provenance.")
api.openapi = lambda: openapi(api)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):
    """FastAPI's own errors (an unknown path, a wrong method) in the OpenAI shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)


def sticky_key(body, request: Request, key: ApiKey | None) -> str:
    """Who the caller is, for canary assignment: the OpenAI `user` field, else the API key's
    id, else the client address."""
    if getattr(body, "user", None):
        return f"user:{body.user}"
    if key is not None:
        return f"key:{key.key_id}"
    return f"addr:{request.client.host if request.client else 'unknown'}"


def _access_error(exc: UserError) -> APIError:
    if isinstance(exc, Forbidden):
        return APIError(403, str(exc), "permission_error", code="forbidden")
    if isinstance(exc, KeysUnavailable):
        return APIError(503, str(exc), "server_error", code="keys_unavailable")
    return APIError(401, str(exc), code="invalid_api_key")


def _trace_header(span) -> dict:
    value = traceparent_of(span)
    return {"traceparent": value} if value else {}


def _error_response(exc: Exception, span) -> JSONResponse:
    error = as_api_error(exc)
    span.set_attribute("error.type", error.type)
    headers = _trace_header(span)
    if error.status in (429, 503):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s or 1)))
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


def _ray_serve_series() -> str:
    """Ray Serve's own series (ray_serve_*), from this node's Ray metrics agent."""
    import httpx
    import ray

    try:
        node = next(n for n in ray.nodes() if n.get("Alive") and n.get("NodeID") == ray.get_runtime_context().get_node_id())
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=2).text
    except Exception:  # noqa: BLE001 - no agent (yet): ours and vLLM's still answer
        return ""
    return only_series(text, "ray_serve_")


# Module helpers stay above: serve.ingress captures the class (and what it references) here.
@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(self, serving: ServingConfig, registry: RegistryConfig, telemetry: TelemetryConfig,
                 governance: GovernanceConfig, home: dict[str, str], base_model: ModelIdentity, retriever, generator):
        setup_tracing(telemetry, "gateway")
        self.base_model = base_model
        self.registry = open_registry(registry)
        self.releases = ReleaseBook(home["releases"], self.registry, ApprovalStore(home["approvals"], governance),
                                    governance)
        self.max_request_bytes = serving.max_request_bytes
        self.keys, self.public_metrics = KeyRing(home["keys"]), serving.public_metrics
        self.provenance = ProvenanceLog(home["provenance"])
        self.feedback = FeedbackLog(home["feedback"])
        self.guards = GuardBook(governance.guards)
        self.monitor = governance.monitor
        self._in_flight: dict[str, Answer] = {}  # provenance id and trace id -> an answer whose record is not written yet
        self.tracer = tracer("tunefetch.gateway")
        self.retriever, self.generator = retriever, generator
        self.settings = (serving, telemetry, governance)
        self.measure = Measure(cache_on=serving.cache.retrieval)
        self.measure.known_guards(governance.guards)
        generate, guard_output, verify = Generate(generator, serving.default_max_tokens), GuardOutput(), Verify()
        # `after` hooks run in reverse: verify, record, measure, count for the canary, then the shadow copy.
        recording: list[Stage] = [Record(self.provenance, serving.record_text), self.measure, CanaryOutcome(self.releases)]
        self.retrieval = Retrieve(retriever, serving.rag)
        self.stages: list[Stage] = [
            Authorize(),
            ResolveModel(self.releases),
            GuardInput(self.guards, serving.default_max_tokens, RefusalLog(home["refusals"])),
            Shadow(self.releases, [generate, guard_output], [verify, *recording]),
            self.retrieval,
            Constrain(serving.rag.cite_answer_chars, serving.rag.cite_quote_chars),
            generate,
            guard_output,
            *reversed(recording),
            verify,
        ]
        self._drift_task: asyncio.Task | None = None
        self._drift_lock = asyncio.Lock()
        self._drift_report = None
        self._vectors = LRU(8192)  # question -> vector, across drift checks
        self.card_hash: str | None = None
        self._card_at, self._card_changes = 0.0, ()
        self._card_lock = asyncio.Lock()
        self._card_task: asyncio.Task | None = None

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    def _key(self, request: Request, admin: str | None = None) -> ApiKey | None:
        """The caller's API key (None while no key exists): 401 without a valid one, 403 when
        `admin` names an action and the key lacks the admin scope."""
        try:
            key = self.keys.authenticate(request.headers.get("authorization"))
            if key is not None and admin:
                key.check_admin(admin)
        except UserError as exc:
            raise _access_error(exc) from None
        return key

    @api.get("/metrics")
    async def metrics(self, request: Request):
        """tunefetch_* series, then the generator replicas' vllm:* and Ray Serve's ray_serve_*."""
        from fastapi.responses import PlainTextResponse

        if not self.public_metrics:
            self._key(request, admin="metrics")
        parts = [self.measure.text()]
        try:
            parts.append(only_series(await self.generator.metrics_text.remote(), "vllm:"))
        except Exception:  # noqa: BLE001 - the engine's series are extra; ours must always answer
            pass
        parts.append(await asyncio.to_thread(_ray_serve_series))
        return PlainTextResponse("".join(parts), media_type="text/plain; version=0.0.4")

    # -- governance (admin) ----------------------------------------------------------------------
    @api.get("/v1/admin/card")
    async def system_card(self, request: Request):
        self._key(request, admin="system card")
        try:
            facts = await self._card_facts()
        except TimeoutError:
            raise APIError(503, "the knowledge store backend did not answer: the card cannot describe the stores",
                           "server_error", code="retrieval_unavailable") from None
        return {"card_hash": card.card_hash(facts), "facts": facts}

    @api.get("/v1/admin/monitor")
    async def monitor_report(self, request: Request):
        """Drift and freshness now (what /metrics shows after the next periodic check)."""
        self._key(request, admin="monitor")
        try:
            report = await self.check_drift(reuse_s=MONITOR_REUSE_S)
        except Exception as exc:  # noqa: BLE001 - the store backend or the retriever is down
            raise APIError(503, f"the drift check failed: {as_api_error(exc).message}", "server_error",
                           code="monitor_unavailable") from None
        return report.to_json()

    @api.get("/v1/admin/canary")
    async def canaries(self, request: Request):
        self._key(request, admin="canary status")
        return {"data": [await asyncio.to_thread(self._canary_status, n) for n in self.releases.names()]}

    @api.get("/v1/admin/canary/{name}")
    async def canary(self, name: str, request: Request):
        self._key(request, admin="canary status")
        return await asyncio.to_thread(self._canary_status, name)

    @api.post("/v1/admin/canary/{name}/{action}")
    async def canary_action(self, name: str, action: str, request: Request):
        self._key(request, admin=f"canary {action[:20]}")
        raw = await request.body()
        try:
            args = json.loads(raw) if raw.strip() else {}
            by = str(args.get("by") or "admin-api")
            if action == "start":
                await asyncio.to_thread(self.releases.start, name, str(args.get("to", "")),
                                        float(args.get("weight", 0)), by, args.get("steps"),
                                        not args.get("manual", False), args.get("promote_after"),
                                        bool(args.get("shadow", False)))
            elif action == "promote":
                await asyncio.to_thread(self.releases.promote, name, by)
            elif action == "rollback":
                await asyncio.to_thread(self.releases.rollback, name, by, "rolled back by hand", None, args.get("to"))
            else:
                raise APIError(404, f"no canary action {action!r} (start, promote, rollback)", code="not_found")
        except (UserError, ValueError, TypeError, AttributeError) as exc:
            raise APIError(400, str(exc), code="invalid_canary") from None
        await self._refresh_card(force=True)
        return await asyncio.to_thread(self._canary_status, name)

    def _canary_status(self, name: str) -> dict:
        try:
            known = bool(self.releases.get(name) and self.registry.versions(name))
        except UserError:
            known = False
        if not known:
            raise APIError(404, f"unknown adapter {name!r}", code="model_not_found")
        release = self.releases.get(name)
        verdict = self.releases.analysis(name)
        return {**release.model_dump(mode="json"), "analysis": None if verdict is None else {
            "action": verdict.action, "reason": verdict.reason,
            "metrics": [c.to_json() for c in verdict.comparisons]}}

    async def _card_facts(self) -> dict:
        # Bounded: with the store backend down the card keeps its last hash instead of hanging requests.
        stores = await asyncio.wait_for(self.retriever.describe.remote(), CARD_REFRESH_S)
        serving, telemetry, governance = self.settings
        return await asyncio.to_thread(card_facts.gather, self.base_model, self.releases, stores, serving,
                                       telemetry, governance)

    async def _refresh_card(self, force: bool = False) -> None:
        """Keeps the hash of the card in force current (stamped on every answer and span). A
        release or approval change is waited for by the request that first sees it; a card
        that is merely older than CARD_REFRESH_S is refreshed in the background. Requests
        never queue behind a refresh already running."""
        changes = self._governance_changes()
        changed = force or not self.card_hash or changes != self._card_changes
        if not changed and time.monotonic() - self._card_at < CARD_REFRESH_S:
            return
        if self._card_lock.locked() and self.card_hash:
            return
        if changed:
            await self._compute_card(changes)
        else:
            self._card_at = time.monotonic()  # one background refresh per interval
            self._card_task = asyncio.create_task(self._compute_card(changes))  # held: the loop keeps weak refs

    async def _compute_card(self, changes: tuple) -> None:
        async with self._card_lock:
            try:
                self.card_hash = card.card_hash(await self._card_facts())
                self._card_at, self._card_changes = time.monotonic(), changes
            except Exception:  # noqa: BLE001 - a stale hash is better than no answer
                pass

    # -- drift and freshness --------------------------------------------------------------------
    def _watch_drift(self) -> None:
        """Starts the periodic drift and freshness check (once; on the first request)."""
        if self.monitor.interval_s and self._drift_task is None:
            self._drift_task = asyncio.create_task(self._drift_loop())

    async def _drift_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitor.interval_s)
            try:
                await self.check_drift()
            except Exception:  # noqa: BLE001 - a failed check leaves the last numbers; the next one retries
                pass

    async def check_drift(self, reuse_s: float = 0.0):
        """One look: the report of serving/monitor.py over the last `lookback_days`, into
        /metrics. Looks run one at a time; a report younger than `reuse_s` is returned as is
        (callers hammering the admin endpoint share one)."""
        async with self._drift_lock:
            last = self._drift_report
            if last is not None and time.time() - last.time < reuse_s:
                return last
            self._drift_report = await self._look()
            return self._drift_report

    async def _look(self):
        freshness = await self.retriever.freshness.remote()
        since = time.time() - self.monitor.lookback_days * 86400
        records = await asyncio.to_thread(lambda: list(self.provenance.all(since)))
        report = await asyncio.to_thread(drift_monitor.run, records, self._embed, self.monitor, freshness)
        self.measure.monitor(report)
        return report

    def _embed(self, texts: list[str]):
        """Query vectors from the retriever replicas (called from a worker thread), cached by text."""
        import numpy as np

        found = {t: self._vectors.get(t) for t in dict.fromkeys(texts)}
        missing = [t for t, vector in found.items() if vector is None]
        if missing:
            for text, vector in zip(missing, self.retriever.embed.remote(missing).result()):
                found[text] = vector
                self._vectors.put(text, vector)
        return np.stack([found[t] for t in texts])

    def _governance_changes(self) -> tuple:
        """Directory mtimes that move whenever a release or an approval is written."""
        stamps = []
        for root in (self.releases.root, self.releases.approvals.root):
            try:
                stamps.append(root.stat().st_mtime_ns)
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    @api.get("/v1/models")
    async def models(self, request: Request):
        key = self._key(request)
        return await asyncio.to_thread(self._models, key)

    def _models(self, key: ApiKey | None) -> dict:
        """The base model and what `key` may use: every version, and NAME for its stable one."""
        created = now()
        base = self.base_model.id
        data = [{"id": base, "object": "model", "created": created, "owned_by": "tunefetch", "root": base,
                 "parent": None}]
        allowed = (lambda name: True) if key is None or key.adapters is None else set(key.adapters).__contains__
        readable = set()
        for version in self.registry.all():
            if not allowed(version.name):
                continue
            readable.add(version.ref)
            data.append({"id": version.ref, "object": "model", "created": int(version.record.created_at),
                         "owned_by": "tunefetch", "root": version.name, "parent": base})
        for name in filter(allowed, self.registry.names()):
            try:  # the version NAME answers with now (its stable one); unlisted while none may serve
                root = self.releases.stable(name)[0]
            except UserError:
                continue
            if root not in readable:  # its stable version's record is damaged: nothing to answer with
                continue
            data.append({"id": name, "object": "model", "created": created, "owned_by": "tunefetch", "root": root,
                         "parent": base})
        return {"object": "list", "data": data}

    @api.get("/v1/provenance/{provenance_id}")
    async def provenance_record(self, provenance_id: str, request: Request):
        """One answer's provenance record: a key sees its own tenant's answers (admin: all);
        anything else is indistinguishable from an id that does not exist."""
        key = self._key(request)
        missing = APIError(404, f"no provenance record {provenance_id[:80]!r}", code="not_found")
        if not PROVENANCE_ID.match(provenance_id):
            raise missing
        try:
            record = await asyncio.to_thread(self.provenance.get, provenance_id)
        except NotFound:
            raise missing from None
        if key is not None and not key.admin and record.tenant != key.tenant:
            raise missing
        return record.model_dump(mode="json", exclude={"base_model": {"path"}})

    @api.post("/v1/retrieve")
    async def retrieve(self, request: Request):
        """Retrieval only: the passages a chat request with this `retrieval` would get, each with
        its text and whether it passes the relevance policy (min_score)."""
        key = self._key(request)
        body = await self._body(request, RetrieveRequest)
        options = body.retrieval
        if key is not None:
            try:
                key.check_kb(options.kb)
            except Forbidden as exc:
                raise APIError(403, str(exc), "permission_error", code="forbidden") from None
        with self.tracer.start_as_current_span("retrieve", context=extract_context(dict(request.headers))) as span:
            span.set_attribute("gen_ai.operation.name", "retrieval")
            try:
                result = await self.retrieval.search(body.query, options)
            except Exception as exc:  # noqa: BLE001 - in the OpenAI shape, like every other failure
                return _error_response(exc, span)
            min_score = self.retrieval.policy.merged(options).min_score
            data = [{"index": i, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "section": h.section, "source": h.source,
                     "kb_version": h.kb_version, "score": round(h.score, 6), "relevant": h.score >= min_score,
                     "text": h.text} for i, h in enumerate(result.hits, 1)]
            return JSONResponse({"object": "retrieval", "kb": result.kb, "collection": result.collection,
                                 "kb_version": result.kb_version, "cached": result.cached, "data": data},
                                headers=_trace_header(span))

    @api.post("/v1/feedback")
    async def post_feedback(self, request: Request):
        """Feedback on one answer; a repeat by the same key replaces it (upsert). An answer the
        caller's key may not read is a 404, like one that does not exist."""
        key = self._key(request)
        body = await self._body(request, FeedbackRequest)
        unknown = sorted(set(body.kpis) - set(self.monitor.kpis))
        if unknown:
            raise APIError(400, f"kpis: {unknown[0]!r} is not a configured KPI (governance.monitor.kpis: "
                                f"{self.monitor.kpis})", code="unknown_kpi")
        answer = await self._answered(body, key)
        text = feedback_text(self.guards.for_request(answer["adapter"], key),
                             {"correction": body.correction, "comment": body.comment})
        event = FeedbackEvent(feedback_id=feedback_id(answer["provenance_id"], key.key_id if key else None),
                              provenance_id=answer["provenance_id"], key_id=key.key_id if key else None,
                              tenant=key.tenant if key else None, time=time.time(),
                              **body.model_dump(include={"score", "label", "kpis"}), **text)
        previous = await asyncio.to_thread(self.feedback.upsert, event)
        if previous is None:  # counted once per (answer, key): retries and edits do not inflate the numbers
            self.measure.feedback(answer["model"], answer["arm"], event, self.monitor.negative_feedback_below)
            await self._canary_feedback(answer, event)
        return {"object": "feedback", "feedback_id": event.feedback_id, "provenance_id": event.provenance_id,
                "model": answer["model"], "recorded": answer["recorded"], "replaced": previous is not None}

    async def _answered(self, body: FeedbackRequest, key: ApiKey | None) -> dict:
        """What the feedback is about: the answer's record, or the answer still in flight here."""
        wanted = body.provenance_id or body.trace_id
        missing = APIError(404, f"no answer {wanted!r}", code="not_found")
        live = self._in_flight.get(wanted)
        if live is not None:
            tenant, found = (live.key.tenant if live.key else None), {
                "provenance_id": live.provenance_id, "model": live.model, "arm": live.arm,
                "canary_id": live.canary_id, "adapter": live.adapter.name if live.adapter else None, "recorded": False}
        else:
            lookup = self.provenance.get if body.provenance_id else self.provenance.by_trace
            try:
                record = await asyncio.to_thread(lookup, wanted)
            except NotFound:
                raise missing from None
            tenant, found = record.tenant, {
                "provenance_id": record.provenance_id, "model": record.answered_by, "arm": record.canary_arm or "none",
                "canary_id": record.canary_id, "adapter": record.adapter.ref.partition("@")[0] if record.adapter else None,
                "recorded": True}
        if key is not None and not key.admin and tenant != key.tenant:
            raise missing
        return found

    async def _canary_feedback(self, answer: dict, event: FeedbackEvent) -> None:
        """Feedback about an answer of a running canary counts in its analysis (score, KPIs)."""
        name, canary_id = answer["adapter"], answer["canary_id"]
        if not name or not canary_id:
            return
        release = await asyncio.to_thread(self.releases.get, name)
        if release.canary is None or release.canary.id != canary_id:
            return  # that canary has ended: its verdict stands
        arm = "canary" if answer["arm"] == "shadow" else answer["arm"]
        outcome = Outcome(arm=arm, kind="feedback", feedback=event.score, kpis=event.kpis, time=event.time,
                          provenance_id=event.provenance_id)
        await asyncio.to_thread(self.releases.record, name, canary_id, outcome)
        await asyncio.to_thread(self.releases.decide, name)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        key = self._key(request)
        body = await self._body(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return await self._complete(body, request, key, {"messages": messages}, last_user_message(messages), chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        key = self._key(request)
        body = await self._body(request, CompletionRequest)
        return await self._complete(body, request, key, {"text": body.prompt}, body.prompt, chat=False)

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
    async def _complete(self, body, request: Request, key: ApiKey | None, prompt: dict, query: str, chat: bool):
        started = time.perf_counter()
        operation = "chat" if chat else "text_completion"
        # Ended by hand: a streamed answer outlives this function.
        span = self.tracer.start_span(operation, context=extract_context(dict(request.headers)))
        span.set_attribute("gen_ai.operation.name", operation)
        span.set_attribute("gen_ai.request.model", body.model)
        answer = Answer(body, chat, prompt, query, self.base_model, span, started, key=key,
                        caller=sticky_key(body, request, key))
        ids = (answer.provenance_id, trace_id_of(span))
        self._in_flight.update((i, answer) for i in ids if i)
        try:
            response = await self._answer(answer, span)
        except BaseException:
            self._forget(ids)
            raise
        if not isinstance(response, StreamingResponse):  # a stream stays in flight until its record is written
            self._forget(ids)
        return response

    def _forget(self, ids) -> None:
        for i in ids:
            self._in_flight.pop(i, None)

    async def _answer(self, answer: Answer, span):
        body, key = answer.request, answer.key
        if key is not None:
            span.set_attribute("tunefetch.tenant", key.tenant)
            span.set_attribute("tunefetch.key.id", key.key_id)
        await self._refresh_card()
        self._watch_drift()
        answer.card_hash = self.card_hash
        span.set_attribute("gen_ai.provider.name", "vllm")
        if self.card_hash:
            span.set_attribute("tunefetch.card.hash", self.card_hash)
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
            await self._failed(answer, exc)
            span.end()
            return _error_response(exc, span)
        span.end()
        return JSONResponse(answer.body(), headers=_trace_header(span))

    async def _after(self, answer: Answer) -> None:
        for stage in reversed(self.stages):
            await stage.after(answer)
        answer.span.set_attribute("gen_ai.response.model", answer.model)
        answer.span.set_attribute("gen_ai.response.finish_reasons",
                                  [r or "" for r in answer.generation.finish_reasons])

    async def _failed(self, answer: Answer, exc: Exception) -> None:
        error = as_api_error(exc)
        for stage in self.stages:
            try:
                await stage.failed(answer, error)
            except Exception:  # noqa: BLE001 - bookkeeping of a failure must not hide the failure
                pass

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
            if answer.include_usage or answer.attribution is not None:  # what is known only at the end
                yield sse(answer.chunk([], usage=usage(answer.generation) if answer.include_usage else None))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - mid-stream failures become an error event
            await self._failed(answer, exc)
            yield sse(as_api_error(exc).body())
        finally:
            answer.span.end()
            self._forget((answer.provenance_id, trace_id_of(answer.span)))
