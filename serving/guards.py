"""Input and output guards: the policies of governance.guards, run as two request stages.

`GuardInput` runs before retrieval: prompt length, requested output length, denied topics and
personal data (refused with a 400 naming the policy, or redacted so that retrieval, the model,
the records and the logs only ever see placeholders), and the key's source allow-list (passages
from other sources are dropped before the prompt). `GuardOutput` runs on the answer: denied
topics replace it with the policy's refusal (finish_reason "content_filter"), personal data is
redacted. Streams are checked as they go with a hold-back window: text is sent
`hold_back_chars` behind the model, so a denied phrase or an email no longer than that is
caught before any of it leaves.

Several policies may apply to one request (governance.guards.default, the adapter's, the API
key's): each runs. Every decision (pass included) is a span event and counts in /metrics; an
answered request's decisions are also in its provenance record, a refused request's in the
refusal log. Feedback text (a comment, a correction) goes through the same PII policy as
the request it is about (`feedback_text`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from dataclasses import asdict, dataclass, field

from cluster.config import GuardPolicy, GuardsConfig
from serving import pii
from serving.protocol import APIError
from serving.refusals import RefusalLog, refusal_record
from serving.stages import Stage

POLICY_VIOLATION = "policy_violation"
CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class Decision:
    stage: str  # input | retrieval | output
    policy: str
    guard: str  # prompt_length | output_length | topic | pii | sources
    action: str  # pass | block | redact | filter | refuse
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


class Topics:
    """A policy's denied topics as one case-insensitive pattern each."""

    def __init__(self, topics: dict[str, list[str]]):
        self.patterns = {name: re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b", re.IGNORECASE)
                         for name, patterns in topics.items()}

    def match(self, text: str) -> str | None:
        """The first topic the text is on, or None."""
        return next((name for name, pattern in self.patterns.items() if pattern.search(text)), None)


@dataclass
class Guarded:
    """The policies one request runs under, and what they decided."""

    policies: list[tuple[str, GuardPolicy]]
    topics: dict[str, Topics]
    hold_back_chars: int
    decisions: list[Decision] = field(default_factory=list)

    @property
    def redacts_output(self) -> bool:
        return any(p.pii != "off" for _, p in self.policies)

    def decide(self, answer, decision: Decision) -> None:
        self.decisions.append(decision)
        answer.span.add_event("tunefetch.guard", {k: v for k, v in decision.to_json().items() if v})

    def allowed_hits(self, answer, hits: list) -> list:
        """The passages whose source every policy's allow-list admits (a decision per policy)."""
        for name, policy in self.policies:
            if policy.sources is None:
                continue
            kept = [h for h in hits if any(fnmatch.fnmatchcase(h.source, s) for s in policy.sources)]
            dropped = len(hits) - len(kept)
            self.decide(answer, Decision("retrieval", name, "sources", "filter" if dropped else "pass",
                                         f"dropped {dropped} of {len(hits)} passages" if dropped else ""))
            hits = kept
        return hits

    def scan(self, text: str) -> tuple[str, tuple[str, str] | None, dict[str, int]]:
        """An answer's text checked: (redacted text, (policy, topic) it is on or None, PII counts)."""
        counts: dict[str, int] = {}
        if self.redacts_output:
            text, counts = pii.redact(text)
        return text, self.on_topic(text), counts

    def on_topic(self, text: str) -> tuple[str, str] | None:
        """(policy, topic) of the first denied topic the text is on, or None."""
        for name, _ in self.policies:
            topic = self.topics[name].match(text)
            if topic:
                return name, topic
        return None

    def refusal(self, policy: str) -> str:
        return dict(self.policies)[policy].refusal


class GuardBook:
    """Which policies apply to a request: the default, the adapter's, the key's."""

    def __init__(self, config: GuardsConfig):
        self.config = config
        self.topics = {name: Topics(p.denied_topics) for name, p in config.policies.items()}

    def for_request(self, adapter: str | None, key) -> Guarded | None:
        names = [self.config.default, self.config.adapters.get(adapter or ""), getattr(key, "policy", None)]
        names = list(dict.fromkeys(n for n in names if n))
        missing = [n for n in names if n not in self.config.policies]
        if missing:  # a key names a policy this server does not have: fail closed
            raise APIError(403, f"key {key.key_id} is bound to guard policy {missing[0]!r}, which this server does "
                                "not configure (governance.guards.policies)", "permission_error", code="forbidden")
        if not names:
            return None
        return Guarded([(n, self.config.policies[n]) for n in names], self.topics, self.config.hold_back_chars)


def guard_names(policy: GuardPolicy) -> list[str]:
    """The guards a policy runs, as its decisions name them ("checks": the output pass)."""
    checks = {"prompt_length": policy.max_prompt_chars is not None, "output_length": policy.max_output_tokens is not None,
              "topic": bool(policy.denied_topics), "pii": policy.pii != "off", "sources": policy.sources is not None}
    return [guard for guard, on in checks.items() if on] + ["checks"]


def feedback_text(guarded: Guarded | None, fields: dict[str, str | None]) -> dict[str, str | None]:
    """Feedback's free text (comment, correction) under the PII policies of the request it is
    about: a 400 when one blocks personal data, else redacted when one redacts. Nothing else is
    checked: a correction may well name a denied topic, that is what it corrects."""
    modes = {name: policy.pii for name, policy in guarded.policies} if guarded else {}
    if set(modes.values()) <= {"off"}:
        return fields
    counts: dict[str, int] = {}
    clean = {}
    for field_name, text in fields.items():
        clean[field_name], found = pii.redact(text) if text else (text, {})
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
    blocking = next((name for name, mode in modes.items() if mode == "block"), None)
    if counts and blocking:
        raise blocked(blocking, "pii", f"the feedback contains personal data ({_counted(counts)})")
    return clean


def blocked(policy: str, guard: str, message: str) -> APIError:
    return APIError(400, f"refused by guard policy {policy!r} ({guard}): {message}", code=POLICY_VIOLATION)


def _prompt_texts(prompt: dict) -> list[str]:
    return [m["content"] for m in prompt["messages"]] if "messages" in prompt else [prompt["text"]]


def _redacted_prompt(prompt: dict) -> tuple[dict, dict[str, int]]:
    counts: dict[str, int] = {}

    def clean(text: str) -> str:
        text, found = pii.redact(text)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        return text

    if "messages" in prompt:
        return {"messages": [{**m, "content": clean(m["content"])} for m in prompt["messages"]]}, counts
    return {"text": clean(prompt["text"])}, counts


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


class GuardInput(Stage):
    """The input checks (a request stage; see the module docstring). A refusal goes into the
    refusal log (serving/refusals.py): it has no answer, hence no provenance record."""

    def __init__(self, book: GuardBook, default_max_tokens: int, refusals: RefusalLog):
        self.book, self.default_max_tokens, self.refusals = book, default_max_tokens, refusals

    async def before(self, answer) -> None:
        guarded = self.book.for_request(answer.adapter.name if answer.adapter else None, answer.key)
        answer.guarded = guarded
        if guarded is None:
            return
        asked = answer.request.max_tokens  # before any policy lowers the default
        for name, policy in guarded.policies:
            self._lengths(answer, guarded, name, policy, asked)
            self._topic(answer, guarded, name)
        self._pii(answer, guarded)  # last: every policy sees the prompt as sent

    async def failed(self, answer, error) -> None:
        decisions = answer.guarded.decisions if answer.guarded else []
        if getattr(error, "code", None) == POLICY_VIOLATION and decisions and decisions[-1].action == "block":
            await asyncio.to_thread(self.refusals.append, refusal_record(answer, decisions))

    def _lengths(self, answer, guarded: Guarded, name: str, policy: GuardPolicy, asked: int | None) -> None:
        request = answer.request
        if policy.max_prompt_chars is not None:
            size = sum(len(t) for t in _prompt_texts(answer.prompt))
            if size > policy.max_prompt_chars:
                self._block(answer, guarded, name, "prompt_length",
                            f"the prompt has {size} characters; the limit is {policy.max_prompt_chars}")
            guarded.decide(answer, Decision("input", name, "prompt_length", "pass"))
        if policy.max_output_tokens is not None:
            if asked is not None and asked > policy.max_output_tokens:
                self._block(answer, guarded, name, "output_length",
                            f"max_tokens {asked} exceeds the limit of {policy.max_output_tokens}")
            if asked is None:  # the server's default, capped
                request.max_tokens = min(request.max_tokens or self.default_max_tokens, policy.max_output_tokens)
            guarded.decide(answer, Decision("input", name, "output_length", "pass"))

    def _topic(self, answer, guarded: Guarded, name: str) -> None:
        if not guarded.topics[name].patterns:
            return
        topic = next(filter(None, map(guarded.topics[name].match, _prompt_texts(answer.prompt))), None)
        if topic:
            self._block(answer, guarded, name, "topic", f"the request is on the denied topic {topic!r}", topic)
        guarded.decide(answer, Decision("input", name, "topic", "pass"))

    def _pii(self, answer, guarded: Guarded) -> None:
        """Personal data: refused when any policy blocks it (before another could redact it),
        else redacted for retrieval, the model, the records and the logs."""
        modes = [(name, policy.pii) for name, policy in guarded.policies if policy.pii != "off"]
        if not modes:
            return
        prompt, counts = _redacted_prompt(answer.prompt)
        for name, mode in modes:
            if counts and mode == "block":
                self._block(answer, guarded, name, "pii", f"the request contains personal data ({_counted(counts)})",
                            _counted(counts))
        if counts:
            answer.prompt, answer.query = prompt, pii.redact(answer.query)[0]
        for name, _ in modes:
            guarded.decide(answer, Decision("input", name, "pii", "redact" if counts else "pass", _counted(counts)))

    @staticmethod
    def _block(answer, guarded: Guarded, name: str, guard: str, message: str, detail: str = "") -> None:
        guarded.decide(answer, Decision("input", name, guard, "block", detail or message))
        raise blocked(name, guard, message)


class GuardOutput(Stage):
    """The output checks: on the whole answer, or on a stream as it goes (see HoldBack)."""

    async def before(self, answer) -> None:
        guarded = answer.guarded
        if guarded is None:
            return
        if answer.chunks is not None:
            answer.chunks = HoldBack(guarded, answer).filter(answer.chunks)
            return
        generation = answer.generation
        for i, text in enumerate(generation.texts):
            clean, tripped, counts = guarded.scan(text)
            if tripped:
                clean = guarded.refusal(tripped[0])
                generation.finish_reasons[i] = CONTENT_FILTER
            generation.texts[i] = clean
            _decide_output(answer, guarded, tripped, counts)


def _decide_output(answer, guarded: Guarded, tripped, counts: dict[str, int]) -> None:
    if tripped:
        guarded.decide(answer, Decision("output", tripped[0], "topic", "refuse", tripped[1]))
    if counts:
        for name, policy in guarded.policies:
            if policy.pii != "off":
                guarded.decide(answer, Decision("output", name, "pii", "redact", _counted(counts)))
                break
    if not tripped and not counts:
        guarded.decide(answer, Decision("output", guarded.policies[0][0], "checks", "pass"))


class HoldBack:
    """A stream's output checks, in constant work per delta: each choice's text is sent
    `hold_back_chars` behind the model (and never cut inside personal data), the rest when the
    choice finishes. Topics are matched on the unsent text plus the last window of sent text, so
    a match no longer than the window is caught before any of it leaves. A denied topic ends the
    choice with the refusal and finish_reason "content_filter" (text sent before stays sent)."""

    def __init__(self, guarded: Guarded, answer):
        self.guarded, self.answer = guarded, answer
        self.window = guarded.hold_back_chars
        self.pending: dict[int, str] = {}  # model text not sent yet
        self.tail: dict[int, str] = {}  # the last `window` characters sent
        self.counts: dict[int, dict[str, int]] = {}
        self.done: set[int] = set()

    async def filter(self, chunks):
        async for item in chunks:
            if "usage" in item:
                yield item
                continue
            out = self._step(item)
            if out is not None:
                yield out
            if len(self.done) == self.answer.n and out and out["finish_reason"] == CONTENT_FILTER:
                _stop(chunks)  # every choice refused: the model need not go on (usage then stays unknown)
                return

    def _step(self, item: dict) -> dict | None:
        i = item["index"]
        if i in self.done:
            return None
        pending = self.pending.get(i, "") + item["text"]
        tail = self.tail.get(i, "")
        tripped = self.guarded.on_topic(tail + pending)
        if tripped:
            self.done.add(i)
            _decide_output(self.answer, self.guarded, tripped, {})
            return {"index": i, "text": ("\n" if tail else "") + self.guarded.refusal(tripped[0]),
                    "finish_reason": CONTENT_FILTER}
        finished = item["finish_reason"] is not None
        found = pii.find(pending) if self.guarded.redacts_output else []
        cut = len(pending) if finished else len(pending) - self.window
        for f in found:  # never send part of personal data: cut before it
            if f.start < cut < f.end:
                cut = f.start
        if cut <= 0 and not finished:
            self.pending[i] = pending
            return None
        text, counts = pii.redact(pending[:cut], [f for f in found if f.end <= cut])
        self.pending[i], self.tail[i] = pending[cut:], (tail + text)[-self.window:]
        total = self.counts.setdefault(i, {})
        for kind, n in counts.items():
            total[kind] = total.get(kind, 0) + n
        if finished:
            self.done.add(i)
            _decide_output(self.answer, self.guarded, None, total)
        return {"index": i, "text": text, "finish_reason": item["finish_reason"]}


def _stop(chunks) -> None:
    cancel = getattr(chunks, "cancel", None)  # a Serve response stream: the generator replica stops too
    if cancel is not None:
        cancel()
