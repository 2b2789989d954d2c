"""Structured output and strict citations, as two request stages around generation.

`Constrain` (before the engine) turns the request's `response_format` into vLLM's structured
output fields; with `retrieval.cite: "strict"` and passages retrieved it builds the answer's
schema itself:

    {"answer": <the caller's json_schema, or a string>,
     "citations": [{"id": <one of 1..k: the passages retrieved for THIS request>, "quote": "..."}]}

The grammar makes any other id impossible to generate, so an answer cannot cite a chunk it was
not given. `Verify` (once the answer is complete) checks the output against its schema and each
quote verbatim (whitespace-normalised, case-sensitive) against the passage it cites; the response
and the provenance record say which quotes were verified.
"""

from __future__ import annotations

import json
import re

from jsonschema import Draft202012Validator

from serving.stages import Stage

_SPACE = re.compile(r"\s+")


def cite_schema(passages: int, answer_schema: dict | None, answer_chars: int, quote_chars: int) -> dict:
    """The strict-citation answer shape for `passages` retrieved passages."""
    citation = {"type": "object", "additionalProperties": False, "required": ["id", "quote"],
                "properties": {"id": {"enum": list(range(1, passages + 1))},
                               "quote": {"type": "string", "maxLength": quote_chars}}}
    return {"type": "object", "additionalProperties": False, "required": ["answer", "citations"],
            "properties": {"answer": answer_schema or {"type": "string", "maxLength": answer_chars},
                           "citations": {"type": "array", "items": citation, "maxItems": passages}}}


def _normalised(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def verify_quotes(output: str, passages: list[str], chunk_ids: list[str]) -> dict:
    """Each citation of a strict answer checked against the passages retrieved: `verified`
    when its quote occurs verbatim in the passage it names; `found_in` names the passage that
    does hold an unverified quote, if another one does (a misattribution)."""
    try:
        data = json.loads(output)
        items = data["citations"]
    except (ValueError, TypeError, KeyError):
        return {"parsed": False, "citations": [], "verified": 0, "unverified": 0, "unknown": 0}
    texts = [_normalised(p) for p in passages]
    checked, unknown = [], 0
    for item in items:
        index, quote = item.get("id"), _normalised(str(item.get("quote", "")))
        if not isinstance(index, int) or not 1 <= index <= len(passages):
            unknown += 1
            continue
        verified = bool(quote) and quote in texts[index - 1]
        found_in = None if verified or not quote else next(
            (i for i, text in enumerate(texts, 1) if quote in text), None)
        checked.append({"index": index, "chunk_id": chunk_ids[index - 1], "quote": item.get("quote", ""),
                        "verified": verified, **({"found_in": found_in} if found_in else {})})
    verified = sum(c["verified"] for c in checked)
    return {"parsed": True, "citations": checked, "verified": verified, "unverified": len(checked) - verified,
            "unknown": unknown}


def schema_valid(output: str, schema: dict | None) -> bool:
    """A finished output is JSON (an object for json_object) that satisfies the schema."""
    try:
        data = json.loads(output)
    except ValueError:
        return False
    if schema is None:
        return isinstance(data, dict)
    return Draft202012Validator(schema).is_valid(data)


class Constrain(Stage):
    """The grammar the engine decodes this answer under (see the module docstring)."""

    def __init__(self, answer_chars: int, quote_chars: int):
        self.answer_chars, self.quote_chars = answer_chars, quote_chars

    async def before(self, answer) -> None:
        request = answer.request
        format_ = request.response_format
        user = format_.grammar() if format_ else None
        if request.retrieval and request.retrieval.cite == "strict" and answer.retrieved and answer.retrieved.hits:
            answer_schema = user["json"] if user and "json" in user else None
            schema = cite_schema(len(answer.retrieved.hits), answer_schema, self.answer_chars, self.quote_chars)
            answer.grammar, answer.output_format = {"json": schema}, "cite_strict"
        elif user is not None:
            answer.grammar, answer.output_format = user, format_.type


class Verify(Stage):
    """Checks a structured answer once it is complete: schema validity, and strict citations."""

    async def after(self, answer) -> None:
        if answer.grammar is None or answer.abstained:
            return
        texts = answer.generation.texts
        schema = answer.grammar.get("json")
        answer.schema_valid = [schema_valid(t, schema) for t in texts]
        answer.span.set_attribute("tunefetch.output.schema_valid", all(answer.schema_valid))
        if answer.output_format == "cite_strict":
            hits = answer.retrieved.hits
            answer.attribution = [verify_quotes(t, [h.text for h in hits], [h.chunk_id for h in hits]) for t in texts]
            answer.span.set_attribute("tunefetch.citations.verified", sum(a["verified"] for a in answer.attribution))
            answer.span.set_attribute("tunefetch.citations.unverified",
                                      sum(a["unverified"] for a in answer.attribution))
