"""One answer in the making: the request, what each stage decided (model, passages, generation),
and its OpenAI response shapes (a whole body, or SSE chunks)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import AsyncIterator

from serving.generator import Generation
from serving.protocol import Citation, completion_id, now
from serving.provenance import new_provenance_id
from training.local_model import ModelIdentity
from training.registry import AdapterVersion

_MARKER = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    request: object  # ChatCompletionRequest | CompletionRequest
    chat: bool
    prompt: dict  # {"messages": [...]} or {"text": "..."}: what the generator will see
    query: str  # what retrieval searches for (the last user message, or the prompt)
    base_model: ModelIdentity
    span: object
    started: float
    adapter: AdapterVersion | None = None  # None: the base model answers
    retrieved: object | None = None  # retrieval.store.SearchResult, relevant hits only
    top_scores: list[float] = field(default_factory=list)  # every hit's score, before the relevance cut
    prompt_template: str | None = None  # version of the template that put passages in the prompt
    retrieval_error: str | None = None  # the backend was down and the policy said: answer without context
    abstained: bool = False  # nothing relevant was retrieved and the policy is to abstain
    retrieval_ms: float | None = None  # the retrieval call, as the gateway saw it
    generation: Generation | None = None  # set once known (a stream: after its last token)
    chunks: AsyncIterator[dict] | None = None  # a stream's generator items, while streaming
    key: object | None = None  # serving.keys.ApiKey of the caller; None while the server needs no keys
    caller: str = ""  # the sticky key: the request's `user`, else its API key, else the client address
    arm: str = "none"  # canary arm: stable | canary | none
    canary_id: str | None = None  # the canary this answer counts towards
    shadow: str | None = None  # a shadow candidate (NAME@vN) that answers a copy after this answer
    approval_id: str | None = None  # the approval behind the version that answered
    card_hash: str | None = None  # the system card in force
    guarded: object | None = None  # serving.guards.Guarded: the guard policies in force and their decisions
    grammar: dict | None = None  # vLLM structured-output fields (json schema, json_object) decoding is held to
    output_format: str | None = None  # json_object | json_schema | cite_strict
    schema_valid: list[bool] | None = None  # per choice, once complete
    attribution: list[dict] | None = None  # per choice under cite: strict (serving/attribution.py)
    provenance_id: str = field(default_factory=new_provenance_id)
    id: str = ""
    created: int = field(default_factory=now)

    def __post_init__(self):
        self.id = completion_id("chatcmpl" if self.chat else "cmpl")

    @property
    def model(self) -> str:
        """Exactly what answered: the base model id or NAME@vN."""
        return self.adapter.ref if self.adapter else self.base_model.id

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)

    def cited(self) -> bool | None:
        """A retrieval answer names at least one of its passages ([1], [2] ...); None otherwise."""
        if self.retrieved is None or not self.retrieved.hits or self.generation is None:
            return None
        numbers = {int(n) for text in self.generation.texts for n in _MARKER.findall(text)}
        return any(1 <= n <= len(self.retrieved.hits) for n in numbers)

    def citations(self) -> list[dict] | None:
        if self.retrieved is None:
            return None
        r = self.retrieved
        return [Citation(index=i, doc_id=h.doc_id, chunk_id=h.chunk_id, source=h.source, section=h.section,
                         kb=r.kb, kb_version=h.kb_version, collection=h.collection, score=round(h.score, 6)).model_dump()
                for i, h in enumerate(r.hits, 1)]

    def _extensions(self) -> dict:
        extensions: dict = {"provenance_id": self.provenance_id}
        if self.retrieved is not None:
            extensions["citations"] = self.citations()
            extensions["grounded"] = bool(self.retrieved.hits)  # False: answered without context
            extensions["abstained"] = self.abstained
        elif self.retrieval_error:
            extensions.update(citations=[], grounded=False, abstained=False, retrieval_error=self.retrieval_error)
        if self.attribution is not None:
            extensions["attribution"] = self.attribution
        if self.guarded is not None:  # what the guards changed or refused (every decision: the provenance record)
            extensions["guards"] = [d.to_json() for d in self.guarded.decisions if d.action != "pass"]
        return extensions

    def body(self) -> dict:
        generation = self.generation
        pairs = enumerate(zip(generation.texts, generation.finish_reasons))
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                       for i, (text, reason) in pairs]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None} for i, (text, reason) in pairs]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage(generation), **self._extensions()}

    def delta(self, text: str, first: bool = False) -> dict:
        if not self.chat:
            return {"text": text, "logprobs": None}
        return {"delta": {"role": "assistant", "content": text} if first else {"content": text}}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model,
                 "choices": [{"finish_reason": None, **c} for c in choices], **self._extensions()}
        if usage is not None:
            chunk["usage"] = usage
        return chunk


def usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
