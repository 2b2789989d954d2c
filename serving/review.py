"""The human review queue: answers a person should look at, and what they decided.

An answer is in the queue when it abstained, was answered without context (the store was
down, or nothing relevant came back and the policy said answer anyway), its best passage
scored below `review_below_score`, or feedback on it was negative or brought a correction.
The queue is computed from the provenance and feedback logs; only decisions are stored
(ROOT/decisions.jsonl, the latest per answer wins). A resolved review exports into retrieval
eval cases (question -> gold doc ids, the `eval retrieval --qrels` format) and training rows
(the question with the corrected answer), each line carrying its lineage back to the answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from cluster.config import MonitorConfig
from cluster.errors import NotFound, UserError
from cluster.files import append_line, replace_text
from serving.feedback import FeedbackEvent, FeedbackLog
from serving.provenance import ProvenanceLog, ProvenanceRecord

STATUSES = ("open", "resolved", "dismissed")


class Decision(BaseModel):
    provenance_id: str
    status: str  # resolved | dismissed
    by: str
    time: float
    correction: str | None = None  # the answer it should have been
    gold_doc_ids: list[str] = []  # the documents that answer the question
    note: str | None = None


@dataclass
class ReviewItem:
    record: ProvenanceRecord
    reasons: list[str]
    feedback: list[FeedbackEvent] = field(default_factory=list)
    decision: Decision | None = None

    @property
    def id(self) -> str:
        return self.record.provenance_id

    @property
    def status(self) -> str:
        return self.decision.status if self.decision else "open"

    def to_json(self) -> dict:
        return {"provenance_id": self.id, "status": self.status, "reasons": self.reasons,
                "time": self.record.time, "model": self.record.answered_by, "question": self.record.question,
                "answer": self.record.answer,
                "kb": f"{self.record.retrieval.kb}@v{self.record.retrieval.kb_version}" if self.record.retrieval else None,
                "feedback": [f.model_dump(mode="json", exclude={"feedback_id"}) for f in self.feedback],
                "decision": self.decision.model_dump(mode="json") if self.decision else None}


class ReviewQueue:
    def __init__(self, provenance: ProvenanceLog, feedback: FeedbackLog, root: Path, config: MonitorConfig):
        self.provenance, self.feedback, self.root, self.config = provenance, feedback, Path(root), config

    @property
    def _decisions_path(self) -> Path:
        return self.root / "decisions.jsonl"

    def items(self, status: str | None = "open") -> list[ReviewItem]:
        """The queue, oldest first; `status` None: every item ever queued."""
        feedback, decisions = self.feedback.for_answers(), self._decisions()
        queue = []
        for record in self.provenance.all():
            item = self._item(record, feedback.get(record.provenance_id, []), decisions.get(record.provenance_id))
            if item.reasons and status in (None, item.status):
                queue.append(item)
        return queue

    def get(self, provenance_id: str) -> ReviewItem:
        record = self.provenance.get(provenance_id)
        feedback = self.feedback.for_answers().get(provenance_id, [])
        return self._item(record, feedback, self._decisions().get(provenance_id))

    def _item(self, record: ProvenanceRecord, feedback: list[FeedbackEvent], decision: Decision | None) -> ReviewItem:
        return ReviewItem(record, self.reasons(record, feedback), feedback, decision)

    def reasons(self, record: ProvenanceRecord, feedback: list[FeedbackEvent]) -> list[str]:
        reasons = []
        retrieval = record.retrieval
        if record.abstained:
            reasons.append("abstained")
        elif record.retrieval_error or (retrieval is not None and not retrieval.chunks):
            reasons.append("ungrounded")
        elif retrieval is not None and retrieval.chunks[0].score < self.config.review_below_score:
            reasons.append("low_score")
        if any(f.negative(self.config.negative_feedback_below) for f in feedback):
            reasons.append("negative_feedback")
        if any(f.correction for f in feedback):
            reasons.append("correction")
        return reasons

    def resolve(self, provenance_id: str, by: str, correction: str | None = None, gold: list[str] | None = None,
                note: str | None = None, dismiss: bool = False) -> Decision:
        """Records a reviewer's decision (a later one replaces it). Resolving needs the corrected
        answer: given here, or the one correction posted as feedback."""
        item = self.get(provenance_id)
        if dismiss:
            decision = Decision(provenance_id=item.id, status="dismissed", by=by, time=time.time(), note=note)
        else:
            if correction is None:
                posted = {f.correction for f in item.feedback if f.correction}
                if len(posted) != 1:
                    raise UserError(f"{item.id}: give --correction (feedback brought {len(posted)} corrections)")
                correction = posted.pop()
            if not correction.strip():
                raise UserError("the correction is empty")
            decision = Decision(provenance_id=item.id, status="resolved", by=by, time=time.time(),
                                correction=correction, gold_doc_ids=gold or [], note=note)
        append_line(self._decisions_path, decision.model_dump_json(), durable=True)
        return decision

    def _decisions(self) -> dict[str, Decision]:
        path = self._decisions_path
        if not path.is_file():
            return {}
        decisions = {}
        for line in path.read_text().splitlines():
            try:
                decision = Decision.model_validate_json(line)
            except ValueError:
                continue  # a torn line from a crashed writer
            decisions[decision.provenance_id] = decision
        return decisions

    def export(self, out: Path) -> tuple[int, int]:
        """Resolved reviews -> OUT/eval_cases.jsonl (those with gold documents) and OUT/train.jsonl;
        returns how many lines each got."""
        decisions = self._decisions()
        cases, rows = [], []
        for provenance_id, decision in sorted(decisions.items(), key=lambda kv: kv[1].time):
            if decision.status != "resolved":
                continue
            try:
                record = self.provenance.get(provenance_id)
            except NotFound:
                continue
            if not record.question:
                raise UserError(f"{provenance_id}: the record has no question (serving.record_text was off)")
            lineage = _lineage(record, decision)
            if decision.gold_doc_ids:
                cases.append({"id": provenance_id, "question": record.question, "doc_ids": decision.gold_doc_ids,
                              "lineage": lineage})
            rows.append({"messages": [{"role": "user", "content": record.question},
                                      {"role": "assistant", "content": decision.correction}], "lineage": lineage})
        if not rows:
            raise UserError("no resolved reviews to export (resolve one with `tunefetch review resolve ID`)")
        out = Path(out)
        replace_text(out / "eval_cases.jsonl", "".join(json.dumps(c) + "\n" for c in cases))
        replace_text(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return len(cases), len(rows)


def _lineage(record: ProvenanceRecord, decision: Decision) -> dict:
    retrieval = record.retrieval
    return {"provenance_id": record.provenance_id, "answered_by": record.answered_by,
            "kb": f"{retrieval.kb}@v{retrieval.kb_version}" if retrieval else None,
            "retrieved": [c.doc_id for c in retrieval.chunks] if retrieval else [],
            "reviewed_by": decision.by, "reviewed_at": decision.time}
