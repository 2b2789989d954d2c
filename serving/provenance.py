"""Append-only provenance records: one JSON line per answer, fsynced before the response leaves.

Records go to ROOT/YYYY-MM-DD.jsonl. Each append is one `write` of a whole line to a file
opened with O_APPEND under an exclusive lock, then fsync, so concurrent writers (several
gateway replicas) never interleave and a crash after the response never loses the record.
Every line is a `ProvenanceRecord`; lines written before the schema had a version read as
schema 1 (the same fields, timings possibly missing).
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import NotFound
from cluster.files import append_line
from training.local_model import ModelIdentity

SCHEMA_VERSION = 6
PROVENANCE_ID = re.compile(r"^prov-[0-9a-f]{32}$")


def new_provenance_id() -> str:
    return f"prov-{uuid.uuid4().hex}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AdapterUsed(_Record):
    ref: str  # NAME@vN
    content_hash: str
    run_id: str | None = None


class ChunkUsed(_Record):
    chunk_id: str
    doc_id: str
    kb_version: int
    score: float


class RetrievalUsed(_Record):
    kb: str  # the alias the request named
    collection: str  # the physical collection it resolved to
    kb_version: int
    chunks: list[ChunkUsed]
    top_scores: list[float] = []  # every hit's score before the relevance cut (the drift monitor reads them)


class Usage(_Record):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GuardDecision(_Record):
    stage: str  # input | retrieval | output
    policy: str
    guard: str
    action: str  # pass | block | redact | filter | refuse
    detail: str = ""


class ProvenanceRecord(_Record):
    schema_version: int = 1
    provenance_id: str
    request_id: str
    trace_id: str | None = None
    time: float
    latency_ms: float | None = Field(None, description="In the gateway, of which retrieval_ms and generation_ms.")
    retrieval_ms: float | None = Field(None, description="The retrieval call; None without retrieval.")
    generation_ms: float | None = Field(None, description="In the generator replica; None when nothing was generated.")
    requested_model: str
    stream: bool = False
    base_model: ModelIdentity
    adapter: AdapterUsed | None = None
    canary_arm: str | None = None  # stable | canary | shadow | none
    canary_id: str | None = None  # the canary this answer counted towards
    approval_id: str | None = None  # the approval behind the adapter version, where one is valid
    tenant: str | None = None  # the API key's tenant (None while the server needs no keys)
    key_id: str | None = None  # which key asked (its id, never its token)
    card_hash: str | None = None  # the system card in force when it answered
    generator_replica: str | None = None
    retrieval: RetrievalUsed | None = None
    prompt_template: str | None = None
    abstained: bool = False
    retrieval_error: str | None = None  # retrieval was asked for but its backend was down: answered without context
    output_hash: str
    usage: Usage = Usage()
    question: str | None = None  # what retrieval searched for / the last user message (serving.record_text)
    answer: str | None = None  # the first choice's text (serving.record_text)
    guards: list[GuardDecision] = []  # every guard decision, pass included (schema 6)
    output_format: str | None = None  # json_object | json_schema | cite_strict: decoding was constrained
    schema_valid: list[bool] | None = None  # per choice: the output satisfies its schema
    attribution: list[dict] | None = None  # per choice under cite: strict: each quote checked against its passage

    @property
    def answered_by(self) -> str:
        """Exactly what answered: NAME@vN or the base model id."""
        return self.adapter.ref if self.adapter else self.base_model.id


class ProvenanceLog:
    def __init__(self, root: Path):
        self.root = Path(root)

    def append(self, record: ProvenanceRecord) -> None:
        path = self.root / time.strftime("%Y-%m-%d.jsonl", time.gmtime(record.time))
        append_line(path, record.model_dump_json(exclude={"base_model": {"path"}}), durable=True)

    def _files_newest_first(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl"), reverse=True) if self.root.is_dir() else []

    def recent(self, limit: int = 20) -> list[ProvenanceRecord]:
        records: list[ProvenanceRecord] = []
        for path in self._files_newest_first():
            lines = path.read_text().splitlines()
            records += [ProvenanceRecord.model_validate_json(line) for line in reversed(lines) if line.strip()]
            if len(records) >= limit:
                break
        return records[:limit]

    def get(self, provenance_id: str) -> ProvenanceRecord:
        return self._find(f'"provenance_id":"{provenance_id}"', f"no provenance record {provenance_id!r}")

    def by_trace(self, trace_id: str) -> ProvenanceRecord:
        """The answer of trace `trace_id` (32 hex digits, as in a traceparent)."""
        return self._find(f'"trace_id":"{trace_id}"', f"no provenance record for trace {trace_id!r}")

    def _find(self, needle: str, missing: str) -> ProvenanceRecord:
        for path in self._files_newest_first():
            for line in path.read_text().splitlines():
                if needle in line:
                    return ProvenanceRecord.model_validate_json(line)
        raise NotFound(missing)

    def all(self, since: float = 0.0):
        """Every record from `since` (epoch seconds) on, oldest first; unreadable lines skipped."""
        day = time.strftime("%Y-%m-%d", time.gmtime(since))
        for path in reversed(self._files_newest_first()):
            if path.stem < day:
                continue
            for line in path.read_text().splitlines():
                try:
                    record = ProvenanceRecord.model_validate_json(line)
                except ValueError:
                    continue
                if record.time >= since:
                    yield record
