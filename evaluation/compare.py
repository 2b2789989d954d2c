"""Tune or fetch, measured: the same held-out questions answered four ways through the HTTP API.

  base    the base model alone          rag     the base model + retrieval
  ft      the fine-tuned adapter alone  hybrid  the adapter + retrieval

Generation track: exact match and token F1 against the reference answers, citation
correctness (a cited passage really contains the reference), abstain rate, latency, tokens.
Retrieval track: recall@k, MRR and nDCG@10 of the store on the same questions. Freshness: the
store gets a new version with some facts changed, every mode is asked again (retrieval follows
at once, the adapter alone cannot), then a retrained adapter is asked; the store is rolled back
and the trial version dropped, so the user's state is as before.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from evaluation import metrics
from evaluation.facts import Fact, write_updated_documents

MODES = ("base", "rag", "ft", "hybrid")
PAIRS = (("base", "rag"), ("base", "ft"), ("base", "hybrid"), ("ft", "rag"), ("rag", "hybrid"), ("ft", "hybrid"))
RETRIEVAL_KS = (1, 3, 5, 10)


class ChatClient(Protocol):
    """What the comparison needs of an HTTP client (tunefetch.Client fits)."""

    def chat(self, question: str, model: str, kb: str | None = None, top_k: int | None = None,
             filters: dict | None = None, max_tokens: int | None = None, temperature: float = 0.0): ...


@dataclass
class Setup:
    kb: str
    base: str  # the base model id
    adapter: str  # exact NAME@vN, resolved once so the whole run uses one version
    top_k: int = 3
    max_tokens: int = 24

    def model_and_kb(self, mode: str, adapter: str | None = None) -> tuple[str, str | None]:
        tuned = mode in ("ft", "hybrid")
        return (adapter or self.adapter) if tuned else self.base, self.kb if mode in ("rag", "hybrid") else None


@dataclass
class Row:
    """One question answered by one mode."""

    fact: str
    mode: str
    question: str
    reference: str
    reply: str
    model: str  # what answered (NAME@vN or the base id)
    exact_match: float
    f1: float
    citation_correct: float | None  # None: no retrieval
    declined: bool
    latency_ms: float
    completion_tokens: int
    provenance_id: str
    trace_id: str | None
    cited_docs: list[str] = field(default_factory=list)


class Comparison:
    def __init__(self, client: ChatClient, setup: Setup, passage_text: Callable[[dict], str],
                 progress: Callable[[str], None] = lambda _: None, on_answer: Callable[[int, int], None] = lambda d, t: None):
        self.client, self.setup = client, setup
        self.passage_text = passage_text  # a citation -> the text of the chunk it names
        self.progress, self.on_answer = progress, on_answer

    def ask(self, facts: list[Fact], modes=MODES, adapter: str | None = None) -> list[Row]:
        rows, total = [], len(facts) * len(modes)
        for mode in modes:
            model, kb = self.setup.model_and_kb(mode, adapter)
            for fact in facts:
                rows.append(self._ask(fact, mode, model, kb))
                self.on_answer(len(rows), total)
        return rows

    def _ask(self, fact: Fact, mode: str, model: str, kb: str | None) -> Row:
        started = time.perf_counter()
        answer = self.client.chat(fact.eval_question, model, kb=kb, top_k=self.setup.top_k if kb else None,
                                  max_tokens=self.setup.max_tokens)
        latency_ms = (time.perf_counter() - started) * 1000
        passages = [self.passage_text(c) for c in answer.citations] if kb else []
        return Row(
            fact=fact.id, mode=mode, question=fact.eval_question, reference=fact.answer, reply=answer.text,
            model=answer.model, exact_match=metrics.exact_match(answer.text, fact.answer),
            f1=metrics.token_f1(answer.text, fact.answer),
            citation_correct=metrics.citation_correct(answer.text, passages, fact.answer) if kb else None,
            declined=answer.abstained or metrics.declined(answer.text), latency_ms=latency_ms,
            completion_tokens=int(answer.usage.get("completion_tokens", 0)), provenance_id=answer.provenance_id,
            trace_id=answer.trace_id, cited_docs=[c["doc_id"] for c in answer.citations])


def summarize(rows: list[Row]) -> dict[str, dict]:
    """Per mode: the means of each metric, the p50 latency and the number of answers."""
    summary = {}
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        cited = [r.citation_correct for r in mine if r.citation_correct is not None]
        summary[mode] = {
            "n": len(mine),
            "exact_match": _mean([r.exact_match for r in mine]),
            "f1": _mean([r.f1 for r in mine]),
            "citation_correct": _mean(cited) if cited else None,
            "abstain_rate": _mean([float(r.declined) for r in mine]),
            "latency_p50_ms": metrics.percentile([r.latency_ms for r in mine], 50),
            "completion_tokens": _mean([float(r.completion_tokens) for r in mine]),
        }
    return summary


def differences(rows: list[Row], seed: int = 0) -> dict[str, dict]:
    """Paired bootstrap intervals of every mode pair's difference, EM and F1 (b - a)."""
    out = {}
    by_mode = {mode: {r.fact: r for r in rows if r.mode == mode} for mode in MODES}
    for a, b in PAIRS:
        facts = sorted(set(by_mode[a]) & set(by_mode[b]))
        if not facts:
            continue
        out[f"{b} - {a}"] = {
            metric: metrics.paired_bootstrap([getattr(by_mode[a][f], metric) for f in facts],
                                             [getattr(by_mode[b][f], metric) for f in facts], seed=seed).to_json()
            for metric in ("exact_match", "f1")}
    return out


@dataclass
class StoreOps:
    """What the freshness test does to the store (the caller owns the stores and the embedder)."""

    ingest: Callable[[Path], int]  # documents -> the new current version
    rollback: Callable[[int], None]  # point the store back at this version
    drop: Callable[[int], None]  # remove a (non-current) version
    current: Callable[[], int]


def freshness(comparison: Comparison, facts: list[Fact], change: list[Fact], before: list[Row], docs: Path,
              store: StoreOps, retrain: Callable[[list[Fact], Path], str] | None,
              progress: Callable[[str], None]) -> dict:
    """Changes the facts `change` (a subset of `facts`) in a new store version, asks every mode
    again, has `retrain(facts as they now read, their documents)` train an adapter and asks
    again; always restores the store. Returns the three phases."""
    ids = {f.id for f in change}
    result: dict = {"facts": sorted(ids), "before": summarize([r for r in before if r.fact in ids])}
    original = store.current()
    with tempfile.TemporaryDirectory(prefix="tunefetch-freshness-") as tmp:
        changed = write_updated_documents(change, docs, Path(tmp) / "docs")
        now = {f.id: f for f in changed}
        trial = None
        try:
            trial = store.ingest(Path(tmp) / "docs")
            result["store_versions"] = {"original": original, "updated": trial}
            progress(f"store updated: {len(changed)} facts changed (v{original} -> v{trial})")
            after = comparison.ask(changed)
            result["after_update"] = summarize(after)
            rows = after
            if retrain is not None:
                retrained = retrain([now.get(f.id, f) for f in facts], Path(tmp) / "docs")
                result["retrained_adapter"] = retrained
                progress(f"retrained on the changed facts: {retrained}")
                again = comparison.ask(changed, adapter=retrained)
                result["after_retrain"] = summarize(again)
                rows = after + [replace_mode(r, f"{r.mode}@retrained") for r in again]
            result["answers"] = [asdict(r) for r in rows]
        finally:
            store.rollback(original)
            if trial is not None and trial != original:
                store.drop(trial)
    result["store_restored"] = store.current() == original
    return result


def replace_mode(row: Row, mode: str) -> Row:
    return Row(**{**asdict(row), "mode": mode})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
