"""Versioned prompt templates: how retrieved passages enter a chat or a completion prompt.

Every answer's provenance record names the template (and version) that built its prompt, so a
change of wording is as traceable as a change of adapter or store version. The local model is
pretrained on `CHAT_CONTEXT`'s exact rendering (the demo wires it in), so reading passages in
that layout is a skill it has.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextTemplate:
    version: str  # recorded in provenance; change it with any change of wording or layout
    instruction: str

    def passages(self, texts: list[str]) -> str:
        """Numbered passages, as citations refer to them: [1] ..., [2] ..."""
        return "\n\n".join(f"[{i}] {text}" for i, text in enumerate(texts, 1))

    def chat(self, messages: list[dict], texts: list[str]) -> list[dict]:
        """The conversation with a system message carrying the passages (an existing system
        message keeps its text, first)."""
        system = f"{self.instruction}\n\nContext:\n{self.passages(texts)}"
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{system}"}, *messages[1:]]
        return [{"role": "system", "content": system}, *messages]

    def completion(self, prompt: str, texts: list[str]) -> str:
        return f"{self.instruction}\n\nContext:\n{self.passages(texts)}\n\n{prompt}"


_INSTRUCTION = ("Answer the question using only the numbered context passages below. "
                "Cite passages as [n]. If the context does not contain the answer, say so.")

CHAT_CONTEXT = ContextTemplate("rag-context-v1", _INSTRUCTION)  # the chat wording since the first release
COMPLETION_CONTEXT = ContextTemplate("rag-completion-v1", _INSTRUCTION)


def last_user_message(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return ""

_CITE_INSTRUCTION = ("Answer the question using only the numbered context passages below, in JSON: \"answer\", "
                     "and \"citations\": for each passage used, its number as \"id\" and the exact words it "
                     "says as \"quote\". If the context does not contain the answer, say so.")
CITE_CONTEXT = ContextTemplate("rag-cite-strict-v1", _CITE_INSTRUCTION)  # retrieval.cite: strict, chat and completion
