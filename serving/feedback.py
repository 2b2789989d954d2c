"""Feedback on answers: a score, a label, a correction, business KPIs, tied to one answer.

The id a client holds (the response's `provenance_id`, or the trace id of its `traceparent`)
IS the answer's record id, so feedback cannot attach to the wrong answer. Events are appended
to ROOT/YYYY-MM-DD.jsonl; the latest event per (answer, key) wins, so a repeat is an upsert and
a client retrying a post changes nothing. Feedback may arrive while the answer's record is not
written yet (a stream still running): it is kept under the answer's id and joins the record
when that lands.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.files import append_line, locked
from serving.provenance import PROVENANCE_ID

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


class FeedbackRequest(BaseModel):
    """The body of POST /v1/feedback."""

    model_config = ConfigDict(extra="forbid")
    provenance_id: str | None = Field(None, description="The answer's provenance_id (or give trace_id).")
    trace_id: str | None = Field(None, description="The trace id of the answer's traceparent.")
    score: float | None = Field(None, ge=0, le=1, description="0 (bad) .. 1 (good).")
    label: str | None = Field(None, max_length=64, description="e.g. correct, wrong, unhelpful, outdated.")
    correction: str | None = Field(None, max_length=8000, description="What the answer should have been.")
    comment: str | None = Field(None, max_length=4000)
    kpis: dict[str, float] = Field(default_factory=dict, description="Configured KPI name -> value in [0, 1].")

    @model_validator(mode="after")
    def _one_answer_and_something_to_say(self):
        if (self.provenance_id is None) == (self.trace_id is None):
            raise ValueError("give exactly one of provenance_id and trace_id")
        if self.provenance_id is not None and not PROVENANCE_ID.match(self.provenance_id):
            raise ValueError("provenance_id must look like prov-<32 hex digits>")
        if self.trace_id is not None and not TRACE_ID.match(self.trace_id):
            raise ValueError("trace_id must be 32 lower-case hex digits")
        if self.score is None and not self.label and not self.correction and not self.kpis:
            raise ValueError("feedback needs a score, a label, a correction or a KPI")
        if any(not 0 <= v <= 1 for v in self.kpis.values()):
            raise ValueError("KPI values lie in [0, 1]")
        return self


class FeedbackEvent(BaseModel):
    """One (answer, key)'s feedback as last posted."""

    model_config = ConfigDict(extra="ignore")
    feedback_id: str  # the same for every post by one key about one answer
    provenance_id: str
    key_id: str | None = None
    tenant: str | None = None
    time: float
    score: float | None = None
    label: str | None = None
    correction: str | None = None
    comment: str | None = None
    kpis: dict[str, float] = {}

    def negative(self, below: float) -> bool:
        return self.score is not None and self.score < below

    def same_content(self, other: "FeedbackEvent") -> bool:
        skip = {"time"}
        return self.model_dump(exclude=skip) == other.model_dump(exclude=skip)


def feedback_id(provenance_id: str, key_id: str | None) -> str:
    return "fb-" + hashlib.sha256(f"{provenance_id}\x00{key_id or '-'}".encode()).hexdigest()[:24]


class FeedbackLog:
    def __init__(self, root: Path):
        self.root = Path(root)

    def upsert(self, event: FeedbackEvent) -> FeedbackEvent | None:
        """Stores `event` unless the same content is already the latest; returns the one it
        replaces (None when it is the first)."""
        with locked(self.root / ".lock"):  # read-then-append: concurrent repeats must see each other
            previous = self.get(event.feedback_id)
            if previous is None or not previous.same_content(event):
                path = self.root / time.strftime("%Y-%m-%d.jsonl", time.gmtime(event.time))
                append_line(path, event.model_dump_json(), durable=True)
        return previous

    def get(self, feedback_id: str) -> FeedbackEvent | None:
        needle = f'"feedback_id":"{feedback_id}"'
        latest = None
        for event in self._events(lambda line: needle in line):
            latest = event
        return latest

    def latest(self) -> dict[str, FeedbackEvent]:
        """feedback_id -> its latest event."""
        return {e.feedback_id: e for e in self._events()}

    def for_answers(self) -> dict[str, list[FeedbackEvent]]:
        """provenance_id -> the latest feedback of each key about it."""
        by_answer: dict[str, list[FeedbackEvent]] = {}
        for event in self.latest().values():
            by_answer.setdefault(event.provenance_id, []).append(event)
        return by_answer

    def _events(self, keep=lambda line: True):
        files = sorted(self.root.glob("*.jsonl")) if self.root.is_dir() else []
        for path in files:
            for line in path.read_text().splitlines():
                if line.strip() and keep(line):
                    try:
                        yield FeedbackEvent.model_validate_json(line)
                    except ValueError:
                        continue  # a torn line from a crashed writer
