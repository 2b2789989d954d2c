"""The audit trail of requests a guard refused: one JSON line per refusal, like provenance.

A refused request has no answer, hence no provenance record, yet an auditor asks "who was
refused what, under which policy, and how often?". Each refusal is appended to
ROOT/YYYY-MM-DD.jsonl (fsynced, concurrent writers never interleave) with who asked, what
they asked for, every guard decision up to the block, and the trace id the 400's
`traceparent` carries. The prompt itself is never stored: it may hold the very personal data
or denied content that was refused. Its length and sha256 are, so a repeated prompt can be
recognised without being readable.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cluster.files import append_line
from cluster.telemetry import trace_id_of
from serving.provenance import GuardDecision


class RefusalRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    time: float
    trace_id: str | None = None  # the refused response's traceparent
    requested_model: str
    model: str  # what would have answered: the base model id or NAME@vN
    tenant: str | None = None
    key_id: str | None = None
    stream: bool = False
    policy: str  # the policy that refused
    guard: str  # prompt_length | output_length | topic | pii
    detail: str = ""  # never the refused text: a count, a topic's name, a length
    prompt_chars: int
    prompt_sha256: str
    guards: list[GuardDecision] = []  # every decision up to and including the block


def refusal_record(answer, decisions: list) -> RefusalRecord:
    block = decisions[-1]
    prompt = json.dumps(answer.prompt, sort_keys=True)
    return RefusalRecord(
        time=time.time(), trace_id=trace_id_of(answer.span), requested_model=answer.request.model,
        model=answer.model, tenant=answer.key.tenant if answer.key else None,
        key_id=answer.key.key_id if answer.key else None, stream=answer.request.stream,
        policy=block.policy, guard=block.guard, detail=block.detail,
        prompt_chars=sum(len(m["content"]) for m in answer.prompt.get("messages", ())) + len(answer.prompt.get("text", "")),
        prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(), guards=[d.to_json() for d in decisions])


class RefusalLog:
    def __init__(self, root: Path):
        self.root = Path(root)

    def append(self, record: RefusalRecord) -> None:
        path = self.root / time.strftime("%Y-%m-%d.jsonl", time.gmtime(record.time))
        append_line(path, record.model_dump_json(), durable=True)

    def recent(self, limit: int = 20) -> list[RefusalRecord]:
        """The newest `limit` refusals, newest first; unreadable lines skipped."""
        records: list[RefusalRecord] = []
        for path in sorted(self.root.glob("*.jsonl"), reverse=True) if self.root.is_dir() else ():
            for line in reversed(path.read_text().splitlines()):
                try:
                    records.append(RefusalRecord.model_validate_json(line))
                except ValueError:
                    continue
            if len(records) >= limit:
                break
        return records[:limit]
