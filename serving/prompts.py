"""Versioned prompt templates: how retrieved context enters the conversation.

The template version is recorded in every provenance record, so a change of wording is as
traceable as a change of adapter or store version.
"""

from __future__ import annotations

TEMPLATE_VERSION = "rag-context-v1"

_SYSTEM = (
    "Answer the question using only the numbered context passages below. "
    "Cite passages as [n]. If the context does not contain the answer, say so.\n\nContext:\n{context}"
)


def with_context(messages: list[dict], passages: list[str]) -> list[dict]:
    """Prepends (or extends) the system message with numbered passages."""
    context = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(passages, 1))
    system = _SYSTEM.format(context=context)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{system}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def last_user_message(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return ""
