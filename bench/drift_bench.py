"""Drift detection power, false alarms and cost of the monitor (serving/monitor.py), one run.

    .venv/bin/python bench/drift_bench.py [--trials 40] [--windows 50,100,200] [--shift 0.2] [--out FILE]

Streams of provenance records as the server writes them: in-domain questions are the sample
domain's (every phrasing of every fact, and the retrieval questions), out-of-domain ones are
generated (cooking, travel, sports, history...). Each question is embedded with the serving
embedder and scored against the sample domain's chunks exactly as retrieval scores them (cosine
of normalised MiniLM vectors), so top-1 score, gap and abstention (below the policy's min_score)
are what the store would have returned.
- power: the reference window is in-domain, the current window has `shift` out-of-domain;
  the fraction of trials the group is flagged, per window size;
- false alarms: both windows in-domain (A/A), the fraction flagged (bounded by alpha);
- cost: milliseconds per 1,000 answers for embedding and for the tests;
- the baseline: a Gaussian-kernel MMD on the same query windows (what the novelty test replaced).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import MonitorConfig  # noqa: E402
from serving.monitor import check_group  # noqa: E402
from retrieval.chunking import chunk_document  # noqa: E402
from retrieval.documents import load_documents  # noqa: E402
from retrieval.embedding import Embedder  # noqa: E402
from serving.provenance import ChunkUsed, ProvenanceRecord, RetrievalUsed  # noqa: E402
from training.local_model import ModelIdentity  # noqa: E402
from tunefetch import sample_domain  # noqa: E402

MIN_SCORE = 0.25  # the stream's relevance policy: below it the answer abstains
TOP_K = 3
_TOPICS = {
    "cook": ["risotto", "sourdough bread", "a soft-boiled egg", "ramen broth", "banana pancakes", "paella",
             "a lemon tart", "falafel", "beef stew", "pad thai", "gnocchi", "apple crumble"],
    "visit": ["Lisbon", "Kyoto", "the Grand Canyon", "Patagonia", "Reykjavik", "the Amalfi coast", "Marrakesh",
              "Vancouver", "Cappadocia", "the Scottish Highlands", "Hanoi", "Tasmania"],
    "sport": ["the offside rule in football", "a tie-break in tennis", "the designated hitter in baseball",
              "a hat-trick in cricket", "the shot clock in basketball", "a birdie in golf", "a scrum in rugby",
              "the photo finish in sprinting", "a power play in ice hockey", "a let in squash"],
    "history": ["the fall of the Roman Empire", "the printing press", "the Silk Road", "the Meiji restoration",
                "the French Revolution", "the Apollo programme", "the invention of the telephone",
                "the Hanseatic League", "the Ottoman Empire", "the Industrial Revolution"],
}
_TEMPLATES = {
    "cook": ["How do I cook {}?", "What is a simple recipe for {}?", "How long should I bake {}?",
             "Which spices go well with {}?"],
    "visit": ["What is the best time of year to visit {}?", "What should I pack for a trip to {}?",
              "How many days do I need in {}?", "Is {} expensive for tourists?"],
    "sport": ["Can you explain {}?", "How does {} work?", "Who came up with {}?"],
    "history": ["What caused {}?", "When did {} happen?", "Why was {} important?", "Summarise {} in a sentence."],
}


def in_domain_questions() -> list[str]:
    questions = [q for fact in sample_domain.facts() for q in fact.questions]
    lines = sample_domain.QUESTIONS.read_text().splitlines()
    return sorted(set(questions + [json.loads(line)["question"] for line in lines if line.strip()]))


def out_of_domain_questions() -> list[str]:
    return sorted({t.format(subject) for kind, subjects in _TOPICS.items() for subject in subjects
                   for t in _TEMPLATES[kind]})


class Scorer:
    """Questions -> vectors and top-k retrieval scores against the sample domain's chunks."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        docs = load_documents([str(sample_domain.DOCS)]).documents
        chunks = [c.text for d in docs for c in chunk_document(d, embedder.tokenizer, sample_domain.CHUNK_TOKENS,
                                                                 sample_domain.CHUNK_OVERLAP)]
        self.passages = embedder.encode(chunks)
        self.vectors: dict[str, np.ndarray] = {}

    def embed(self, questions: list[str]) -> np.ndarray:
        missing = [q for q in dict.fromkeys(questions) if q not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.embedder.encode(missing)))
        return np.stack([self.vectors[q] for q in questions])

    def top_scores(self, question: str) -> list[float]:
        scores = self.passages @ self.embed([question])[0]
        return [float(s) for s in np.sort(scores)[::-1][:TOP_K]]


def stream(rng: random.Random, n: int, shift: float, inside: list[str], outside: list[str]) -> list[str]:
    return [rng.choice(outside) if rng.random() < shift else rng.choice(inside) for _ in range(n)]


def records(questions: list[str], scorer: Scorer, kb: str = "kestrel", start: float = 0.0) -> list[ProvenanceRecord]:
    scorer.embed(questions)  # one batch: scoring them one by one below then only looks vectors up
    out = []
    for i, question in enumerate(questions):
        scores = scorer.top_scores(question)
        relevant = [s for s in scores if s >= MIN_SCORE]
        chunks = [ChunkUsed(chunk_id=f"c{j}", doc_id=f"d{j}", kb_version=1, score=s) for j, s in enumerate(relevant)]
        out.append(ProvenanceRecord(
            schema_version=5, provenance_id=f"prov-{i:032x}", request_id=f"{i:032x}", time=start + i,
            requested_model="tiny-llama", base_model=ModelIdentity(id="tiny-llama", sha256="0" * 64),
            retrieval=RetrievalUsed(kb=kb, collection=f"{kb}__v1", kb_version=1, chunks=chunks, top_scores=scores),
            abstained=not relevant, output_hash="0" * 64, question=question))
    return out


def mmd_p_value(x: np.ndarray, y: np.ndarray, permutations: int, seed: int = 0) -> float:
    """The baseline: Gaussian-kernel MMD (median-distance bandwidth) with a permutation test."""
    pooled = np.concatenate([x, y]).astype(np.float64)
    squares = np.sum(pooled * pooled, axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * pooled @ pooled.T, 0.0)
    kernel = np.exp(-distances / np.median(distances[np.triu_indices(len(pooled), k=1)]))
    weights = np.concatenate([np.full(len(x), 1 / len(x)), np.full(len(y), -1 / len(y))])
    observed = weights @ kernel @ weights
    shuffled = np.stack([np.random.default_rng(seed + i).permutation(weights) for i in range(permutations)])
    null = np.einsum("pi,ij,pj->p", shuffled, kernel, shuffled)
    return (1 + int(np.sum(null >= observed - 1e-12))) / (1 + permutations)


def flagged(scorer: Scorer, rng: random.Random, window: int, shift: float, config: MonitorConfig,
            inside: list[str], outside: list[str]):
    """The monitor's verdict on one reference + current pair of windows, and the seconds it took
    (vectors are already cached: embedding is priced separately)."""
    questions = stream(rng, window, 0.0, inside, outside) + stream(rng, window, shift, inside, outside)
    stream_records = records(questions, scorer)
    started = time.perf_counter()
    group = check_group("kb:kestrel", stream_records, scorer.embed, config)
    seconds = time.perf_counter() - started
    vectors = scorer.embed(questions)
    mmd = mmd_p_value(vectors[:window], vectors[window:], config.permutations) <= group.level
    return group, seconds, mmd


def main() -> None:
    from report import emit  # bench/report.py, beside this script (tests import the functions above)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--windows", default="50,100,200")
    parser.add_argument("--shift", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    scorer, inside, outside = Scorer(Embedder()), in_domain_questions(), out_of_domain_questions()
    started = time.perf_counter()
    scorer.embed(inside + outside)
    embed_ms_per_1k = (time.perf_counter() - started) * 1000 / len(inside + outside) * 1000
    report = {"shift": args.shift, "trials": args.trials, "in_domain_questions": len(inside),
              "out_of_domain_questions": len(outside), "embed_ms_per_1k_questions": round(embed_ms_per_1k),
              "windows": []}
    for window in (int(w) for w in args.windows.split(",")):
        config = MonitorConfig(window=window)
        rng, tests_s = random.Random(window), 0.0
        detected = {"shifted": 0, "unshifted": 0}
        by_test: dict[str, int] = {}
        for _ in range(args.trials):
            for kind, shift in (("shifted", args.shift), ("unshifted", 0.0)):
                group, seconds, mmd = flagged(scorer, rng, window, shift, config, inside, outside)
                tests_s += seconds
                detected[kind] += group.drifted
                if kind == "shifted":
                    for test in group.tests:
                        by_test[test.name] = by_test.get(test.name, 0) + (test.p_value <= group.level)
                    by_test["baseline_mmd"] = by_test.get("baseline_mmd", 0) + mmd
        report["windows"].append({
            "window": window, "power": detected["shifted"] / args.trials,
            "false_alarm_rate": detected["unshifted"] / args.trials,
            "power_by_test": {k: v / args.trials for k, v in sorted(by_test.items())},
            "tests_ms_per_1k_answers": round(tests_s * 1000 / (2 * args.trials * 2 * window) * 1000, 1)})
    emit(report, args.out)


if __name__ == "__main__":
    main()
