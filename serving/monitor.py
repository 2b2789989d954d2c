"""Drift and freshness of what is served, from the provenance log and the stores' records.

Answers are grouped per knowledge store (`kb:NAME`, answers that retrieved from it) and per
adapter (`adapter:NAME`, answers any of its versions gave). A group's reference window is its
first `window` answers in the span looked at, compared with its latest `window`: query
embeddings (nearest-neighbour novelty), and for stores the top-1 score, the top-1 minus top-2 gap (KS) and the
abstain rate (Fisher). A group has drifted when any test's p-value is at or under alpha split
over its tests. Shadow copies are left out (they repeat a caller's question).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cluster.config import MonitorConfig
from serving.drift import TestResult, ks_test, novelty_test, rate_test
from retrieval.freshness import Freshness
from serving.provenance import ProvenanceRecord

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class GroupReport:
    id: str  # kb:NAME | adapter:NAME
    answers: int
    tests: list[TestResult] = field(default_factory=list)
    level: float = 0.0  # the per-test p-value threshold
    note: str = ""  # why a group is not (fully) tested

    @property
    def drifted(self) -> bool:
        return any(t.p_value <= self.level for t in self.tests)

    def to_json(self) -> dict:
        return {"group": self.id, "answers": self.answers, "drifted": self.drifted, "level": round(self.level, 6),
                "note": self.note, "tests": [t.to_json() for t in self.tests]}


@dataclass
class MonitorReport:
    time: float
    window: int
    alpha: float
    groups: list[GroupReport]
    stores: list[Freshness]
    embedded: int  # questions embedded for this report
    seconds: float

    def to_json(self) -> dict:
        return {"time": self.time, "window": self.window, "alpha": self.alpha, "embedded": self.embedded,
                "seconds": round(self.seconds, 3), "groups": [g.to_json() for g in self.groups],
                "stores": [s.to_json() for s in self.stores]}


def group_records(records) -> dict[str, list[ProvenanceRecord]]:
    groups: dict[str, list[ProvenanceRecord]] = {}
    for record in records:
        if record.canary_arm == "shadow":
            continue
        if record.retrieval is not None:
            groups.setdefault(f"kb:{record.retrieval.kb}", []).append(record)
        if record.adapter is not None:
            groups.setdefault(f"adapter:{record.adapter.ref.partition('@')[0]}", []).append(record)
    return groups


def check_group(group: str, records: list[ProvenanceRecord], embed: Embed, config: MonitorConfig) -> GroupReport:
    """Each test compares the first and the latest `window` answers that carry what it reads
    (records from before a field existed, or without text, sit out that test)."""
    window = config.window
    report = GroupReport(group, len(records))
    if len(records) < 2 * window:
        report.note = f"collecting: {len(records)} of {2 * window} answers"
        return report
    asked = [r for r in records if r.question]
    if len(asked) >= 2 * window:
        vectors = embed([r.question for r in asked[:window] + asked[-window:]])
        report.tests.append(novelty_test(vectors[:window], vectors[window:], config.permutations))
    else:
        report.note = f"{len(asked)} answers with their question recorded (serving.record_text): no query test yet"
    if group.startswith("kb:"):
        scored = [r for r in records if r.retrieval.top_scores]
        for name, pick in (("top1_score", lambda r: r.retrieval.top_scores[0]), ("top_gap", _gap)):
            values = [v for v in map(pick, scored) if v is not None]
            if len(values) >= 2 * window:
                report.tests.append(ks_test(name, np.array(values[:window]), np.array(values[-window:])))
        flags = np.array([r.abstained for r in records], dtype=float)
        report.tests.append(rate_test("abstain_rate", flags[:window], flags[-window:]))
    report.level = config.alpha / max(len(report.tests), 1)
    return report


def _gap(record: ProvenanceRecord) -> float | None:
    scores = record.retrieval.top_scores
    return scores[0] - scores[1] if len(scores) > 1 else None


def run(records, embed: Embed, config: MonitorConfig, stores: list[Freshness], only: str | None = None) -> MonitorReport:
    """The report over `records` (oldest first); `only` keeps one group (e.g. kb:kestrel)."""
    started = time.perf_counter()
    counting = _Counting(embed)
    groups = group_records(records)
    reports = [check_group(g, rs, counting, config) for g, rs in sorted(groups.items()) if only in (None, g)]
    return MonitorReport(time.time(), config.window, config.alpha, reports, stores, counting.count,
                         time.perf_counter() - started)


class _Counting:
    """An embedder that counts what it embedded and embeds each distinct question once."""

    def __init__(self, embed: Embed):
        self.embed, self.count = embed, 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        unique = list(dict.fromkeys(texts))
        vectors = dict(zip(unique, self.embed(unique)))
        self.count += len(unique)
        return np.stack([vectors[t] for t in texts])

