"""An evaluation set of facts: each one a statement in one document of a knowledge base, the
questions that ask for it, its answer, and an update (the same fact, changed).

Facts file (JSONL), one object a line:
  {"id": "f01", "doc_id": "returns-policy", "subject": "return window for unused hardware",
   "answer": "45 days", "update": "60 days",
   "questions": ["What is the return window for unused hardware?", ...], "held_out": 2}
The document states it verbatim as "The {subject} is {answer}." `questions[held_out]` is the
evaluation phrasing; the others are the adapter's training phrasings (knowledge injection
needs several paraphrases of a fact; the held-out one tests that it generalises).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.errors import UserError


class Fact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    doc_id: str = Field(description="The document (file stem) that states the fact.")
    subject: str
    answer: str
    update: str | None = Field(None, description="The changed answer the freshness test writes into a copy.")
    questions: list[str] = Field(min_length=2)
    held_out: int = Field(ge=0, description="Index of the evaluation phrasing in `questions`.")

    @model_validator(mode="after")
    def _held_out_in_range(self) -> "Fact":
        if self.held_out >= len(self.questions):
            raise ValueError(f"held_out {self.held_out} is not an index of questions")
        return self

    @property
    def statement(self) -> str:
        return f"The {self.subject} is {self.answer}."

    @property
    def updated_statement(self) -> str:
        return f"The {self.subject} is {self.update}."

    @property
    def eval_question(self) -> str:
        return self.questions[self.held_out]

    @property
    def train_questions(self) -> list[str]:
        return [q for i, q in enumerate(self.questions) if i != self.held_out]

    def updated(self) -> "Fact":
        """This fact after the update: the changed answer."""
        return self.model_copy(update={"answer": self.update, "update": self.answer})


def load_facts(path: Path) -> list[Fact]:
    facts: list[Fact] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read facts file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            facts.append(Fact.model_validate_json(line))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UserError(f"{path}:{number}: {'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}") from None
    if not facts:
        raise UserError(f"{path}: no facts")
    if len({f.id for f in facts}) != len(facts):
        raise UserError(f"{path}: fact ids must be unique")
    return facts


def check_documents(facts: list[Fact], docs: Path) -> None:
    """Every fact's statement appears exactly once in its document."""
    for fact in facts:
        text = _document(docs, fact.doc_id).read_text(encoding="utf-8")
        count = text.count(fact.statement)
        if count != 1:
            raise UserError(f"{fact.id}: {docs}/{fact.doc_id}.md states {fact.statement!r} {count} times (expected once)")


def write_updated_documents(facts: list[Fact], docs: Path, out: Path) -> list[Fact]:
    """A copy of `docs` in `out` with each fact's statement changed to its update; the facts as
    they now read. Only facts with an update can change."""
    changed = [f for f in facts if f.update is not None]
    check_documents(changed, docs)
    shutil.copytree(docs, out, dirs_exist_ok=True)
    for fact in changed:
        path = _document(out, fact.doc_id)
        path.write_text(path.read_text(encoding="utf-8").replace(fact.statement, fact.updated_statement),
                        encoding="utf-8")
    return [f.updated() for f in changed]


def adapter_rows(facts: list[Fact], docs: Path, render_context, seed: int = 0) -> list[dict]:
    """The adapter's training rows, in the chat dataset form (the held-out phrasing never
    appears). Per fact: every training phrasing -> the answer, from memory; one phrasing with
    passages (the fact's among two others, first two times in three, as a retriever ranks) ->
    the answer citing its passage; and once with the fact's passage stating another value ->
    that value. The last two keep the adapter reading: with retrieval, the passage wins over
    what the weights remember (a store update reaches hybrid answers without retraining).
    `render_context(messages, passages)` is how the serving template shows passages."""
    rng = random.Random(seed)
    passages = {f.id: _passage(f, docs) for f in facts}
    rows = [_chat([{"role": "user", "content": q}], f.answer) for f in facts for q in f.train_questions]
    for fact in facts:
        others = rng.sample([f for f in facts if f.id != fact.id], 2)
        other_value = rng.choice([f.answer for f in facts if f.answer != fact.answer])
        for stated in (fact.answer, other_value):
            right = passages[fact.id].replace(fact.statement, f"The {fact.subject} is {stated}.")
            shown = [passages[o.id] for o in others]
            at = 0 if rng.random() < 2 / 3 else rng.randint(1, 2)
            shown.insert(at, right)
            question = rng.choice(fact.train_questions)
            rows.append(_chat(render_context([{"role": "user", "content": question}], shown), f"{stated} [{at + 1}]"))
    return rows


def _chat(messages: list[dict], answer: str) -> dict:
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}


def _passage(fact: Fact, docs: Path) -> str:
    """The fact's statement as a sentence-window chunk shows it: the section path, then the text."""
    from retrieval.chunking import sections

    for path, body in sections(_document(docs, fact.doc_id).read_text(encoding="utf-8")):
        if fact.statement in body:
            return f"{path}\n{fact.statement}"
    raise UserError(f"{fact.id}: {fact.statement!r} is in no section of {fact.doc_id}")


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _document(docs: Path, doc_id: str) -> Path:
    if not re.fullmatch(r"[\w.-]+", doc_id):
        raise UserError(f"doc_id {doc_id!r} is not a file name")
    path = Path(docs) / f"{doc_id}.md"
    if not path.is_file():
        raise UserError(f"no document {path} for doc_id {doc_id!r}")
    return path
