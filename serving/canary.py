"""Canary analysis between two versions of one adapter: who goes where, and what the answers say.

Assignment: a caller's sticky key hashes to a point u in [0, 1); u < weight goes to the
candidate. The point never changes, so raising the weight only moves callers from stable to
canary, never back, and a caller sees one arm for as long as the weight holds.

Analysis: vLLM has no per-adapter metrics, so the evidence is tunefetch's own record of every
answer on either arm (`Outcome`: error, latency, abstained, cited its passages), and of the
feedback and KPIs clients post about those answers later (negative feedback rate, and per KPI
the rate of answers that missed it). Each metric is
a one-sided question "is the canary worse?" answered by a mixture sequential probability ratio
test (mSPRT; Johari et al., "Always valid inference", 2017): its p-value stays valid however
often it is looked at, so the analysis runs after every answer and still rolls back a
candidate as good as stable with probability at most alpha (split over the metrics,
Bonferroni). After `promote_after` canary answers with no harm the step passes: the next
weight of `steps`, or promotion.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from pydantic import BaseModel

from cluster.config import CanaryPolicy

STABLE, CANARY, NONE = "stable", "canary", "none"
SHADOW = "shadow"  # a copy answered by the candidate that the caller never saw


def bucket(name: str, key: str) -> float:
    """A caller's fixed point in [0, 1) for adapter `name`."""
    digest = hashlib.sha256(f"{name}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(name: str, key: str, weight: float) -> str:
    return CANARY if bucket(name, key) < weight else STABLE


class Outcome(BaseModel):
    """One answer (or failure) on one arm of a canary, or feedback posted later about one."""

    arm: str
    ok: bool = True
    kind: str = "answer"  # "answer" | "feedback" (a score or KPIs about an earlier answer of this arm)
    feedback: float | None = None  # the feedback score in [0, 1]
    kpis: dict[str, float] = {}  # KPI name -> value in [0, 1] (1: achieved)
    latency_ms: float | None = None
    abstained: bool | None = None  # None: no retrieval in the request
    cited: bool | None = None  # a retrieval answer citing at least one passage; None otherwise
    provenance_id: str | None = None
    time: float = 0.0


@dataclass(frozen=True)
class Metric:
    name: str
    margin: float  # how much worse the canary may be before it counts as harm
    tau: float  # mixture width: the size of difference the test is tuned to
    threshold: float = 0.5  # negative_feedback_rate: scores below this are negative

    def value(self, outcome: Outcome) -> float | None:
        if outcome.kind == "feedback":
            return self._feedback_value(outcome)
        if self.name == "negative_feedback_rate" or self.name.startswith(KPI_PREFIX):
            return None
        if self.name == "error_rate":
            return 0.0 if outcome.ok else 1.0
        if not outcome.ok:
            return None
        if self.name == "log_latency":
            return math.log(max(outcome.latency_ms or 0.0, 1e-3))
        if self.name == "abstain_rate":
            return None if outcome.abstained is None else float(outcome.abstained)
        if self.name == "uncited_rate":
            return None if outcome.cited is None or outcome.abstained else float(not outcome.cited)
        raise ValueError(self.name)

    def _feedback_value(self, outcome: Outcome) -> float | None:
        if self.name == "negative_feedback_rate":
            return None if outcome.feedback is None else float(outcome.feedback < self.threshold)
        kpi = self.name.removeprefix(KPI_PREFIX)
        if self.name.startswith(KPI_PREFIX) and kpi in outcome.kpis:
            return 1.0 - min(max(outcome.kpis[kpi], 0.0), 1.0)
        return None


KPI_PREFIX = "kpi_missed:"  # a KPI metric: the rate of answers that did not achieve it


def metrics(policy: CanaryPolicy, kpis: tuple[str, ...] = (), negative_below: float = 0.5) -> list[Metric]:
    latency_margin = math.log1p(policy.latency_margin)
    return [Metric("error_rate", 0.0, policy.effect_size), Metric("abstain_rate", 0.0, policy.effect_size),
            Metric("uncited_rate", 0.0, policy.effect_size),
            Metric("log_latency", latency_margin, max(latency_margin, policy.effect_size)),
            Metric("negative_feedback_rate", 0.0, policy.effect_size, negative_below),
            *(Metric(KPI_PREFIX + kpi, 0.0, policy.effect_size) for kpi in kpis)]


@dataclass
class Comparison:
    metric: str
    n_stable: int
    n_canary: int
    stable: float | None
    canary: float | None
    p_value: float  # always-valid p-value of "the canary is worse"

    def to_json(self) -> dict:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"metric": self.metric, "n_stable": self.n_stable, "n_canary": self.n_canary, "stable": r(self.stable),
                "canary": r(self.canary), "p_value": r(self.p_value)}


@dataclass
class Moments:
    """Count, sum and sum of squares: what the test needs of one metric on one arm."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, value: float) -> None:
        self.n, self.total, self.squares = self.n + 1, self.total + value, self.squares + value * value

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float:
        return max(self.squares - self.total * self.total / self.n, 0.0) / (self.n - 1) if self.n > 1 else 0.0


class Tally:
    """Running moments of every metric on both arms, so a look costs the same at any length."""

    def __init__(self, policy: CanaryPolicy, outcomes=(), kpis: tuple[str, ...] = (), negative_below: float = 0.5):
        self.policy = policy
        self.metrics = metrics(policy, kpis, negative_below)
        self.moments = {(m.name, arm): Moments() for m in self.metrics for arm in (STABLE, CANARY)}
        self.answers = {STABLE: 0, CANARY: 0}
        for outcome in outcomes:
            self.add(outcome)

    def add(self, outcome: Outcome) -> None:
        if outcome.arm not in self.answers:
            return
        self.answers[outcome.arm] += outcome.kind == "answer"
        for metric in self.metrics:
            value = metric.value(outcome)
            if value is not None:
                self.moments[metric.name, outcome.arm].add(value)

    def compare(self) -> list[Comparison]:
        results = []
        for metric in self.metrics:
            s, c = self.moments[metric.name, STABLE], self.moments[metric.name, CANARY]
            p = msprt_p_value(s, c, metric.margin, metric.tau, binary=metric.name != "log_latency")
            if metric.name.startswith(KPI_PREFIX) and not (s.n or c.n):
                continue  # a KPI nobody has posted yet is not shown
            results.append(Comparison(metric.name, s.n, c.n, s.mean, c.mean, p))
        return results


def msprt_p_value(stable: Moments, canary: Moments, margin: float, tau: float, binary: bool) -> float:
    """Always-valid one-sided p-value for mean(canary) - mean(stable) > margin (normal mixture
    over the difference with variance tau^2; 1.0 while the canary looks no worse)."""
    if stable.n < 2 or canary.n < 2:
        return 1.0
    v_s, v_c = stable.variance, canary.variance
    if binary:  # pooled, smoothed: all-zero arms must not make the variance zero
        pooled = (stable.total + canary.total + 1) / (stable.n + canary.n + 2)
        v_s = v_c = pooled * (1 - pooled)
    theta = canary.mean - stable.mean - margin
    if theta <= 0:
        return 1.0
    variance = max(v_s / stable.n + v_c / canary.n, 1e-12)
    t2 = tau * tau
    log_lr = 0.5 * math.log(variance / (variance + t2)) + t2 * theta * theta / (2 * variance * (variance + t2))
    return min(1.0, math.exp(-log_lr))


@dataclass
class Verdict:
    action: str  # "continue" | "rollback" | "pass" (the step passed: next weight, or promote)
    reason: str
    comparisons: list[Comparison]


def analyse(tally: Tally, step_canary_answers: int) -> Verdict:
    """The analysis of one look: harm on any metric rolls back; enough canary answers in this
    step without harm pass it; otherwise keep collecting."""
    policy = tally.policy
    comparisons = tally.compare()
    n_stable, n_canary = tally.answers[STABLE], tally.answers[CANARY]
    if min(n_stable, n_canary) < policy.min_samples:
        return Verdict("continue", f"collecting: {n_canary} canary / {n_stable} stable answers "
                                   f"(a decision needs {policy.min_samples} each)", comparisons)
    level = policy.alpha / len(tally.metrics)
    harmed = [c for c in comparisons if c.p_value <= level]
    if harmed:
        worst = min(harmed, key=lambda c: c.p_value)
        return Verdict("rollback", f"canary worse on {worst.metric}: {worst.canary:.3f} vs {worst.stable:.3f} "
                                   f"(always-valid p={worst.p_value:.2g} <= {level:.2g})", comparisons)
    if step_canary_answers >= policy.promote_after:
        return Verdict("pass", f"{step_canary_answers} canary answers, no metric worse at level {level:.2g}",
                       comparisons)
    return Verdict("continue", f"no harm so far ({step_canary_answers}/{policy.promote_after} canary answers "
                               "in this step)", comparisons)
