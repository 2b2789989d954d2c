"""One answer in the making: the request, what resolved and was retrieved, and its OpenAI
response shapes (a whole body, or SSE chunks)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from serving.generator import Generation
from serving.protocol import Citation, completion_id, now
from serving.provenance import new_provenance_id
from training.registry import AdapterVersion


@dataclass
class Answer:
    request: object  # ChatCompletionRequest | CompletionRequest
    chat: bool
    adapter: AdapterVersion | None
    retrieved: object | None  # retrieval.store.SearchResult
    base_model_id: str
    span: object
    started: float
    abstained: bool = False  # nothing relevant was retrieved and the policy is to abstain
    retrieval_ms: float | None = None  # the retrieval call, as the gateway saw it
    provenance_id: str = field(default_factory=new_provenance_id)
    id: str = ""
    created: int = field(default_factory=now)

    def __post_init__(self):
        self.id = completion_id("chatcmpl" if self.chat else "cmpl")

    @property
    def model(self) -> str:
        """Exactly what answered: the base model id or NAME@vN."""
        return self.adapter.ref if self.adapter else self.base_model_id

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)

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
        return extensions

    def body(self, generation: Generation) -> dict:
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


ABSTAIN_MESSAGE = "I could not find anything relevant to this question in the knowledge base {kb!r}."


def abstention(answer: Answer) -> Generation:
    """The fixed answer when nothing relevant was retrieved and the policy is to abstain."""
    text = ABSTAIN_MESSAGE.format(kb=answer.request.retrieval.kb)
    return Generation([text] * answer.n, ["stop"] * answer.n, 0, 0)


async def abstention_stream(answer: Answer):
    """The abstention in the generator's stream item shape."""
    generation = abstention(answer)
    for i, text in enumerate(generation.texts):
        yield {"index": i, "text": text, "finish_reason": "stop"}
    yield {"usage": {"prompt_tokens": 0, "completion_tokens": 0}}


def usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def sampling_params(request, default_max_tokens: int) -> dict:
    return {"max_tokens": request.max_tokens or default_max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "stop": request.stop, "seed": request.seed, "n": request.n}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
