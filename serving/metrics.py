"""Prometheus series per answered model and canary arm: what vLLM cannot label.

vLLM's own metrics know the engine, not which adapter version or canary arm answered; these
`tunefetch_*` series do (`model` is the base model id or NAME@vN, `arm` stable/canary/none).
`GET /metrics` serves them with the generator replicas' vLLM series (`vllm:*`) and Ray
Serve's (`ray_serve_*`) appended.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.answer import Answer
from serving.guards import guard_names
from serving.stages import Stage

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Measure(Stage):
    """Counts every request, its latency, tokens, retrieval hits and abstentions."""

    def __init__(self, cache_on: bool = False):
        self.cache_on = cache_on
        self.registry = CollectorRegistry()
        labels = ("model", "arm")
        self.requests = Counter("tunefetch_requests", "Answered requests.", labels, registry=self.registry)
        self.errors = Counter("tunefetch_request_errors", "Failed requests, by HTTP status.", (*labels, "status"),
                              registry=self.registry)
        self.latency = Histogram("tunefetch_request_latency_seconds", "Gateway latency of answered requests.",
                                 labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("tunefetch_tokens", "Tokens, by kind (prompt, completion).", (*labels, "kind"),
                              registry=self.registry)
        self.hits = Counter("tunefetch_retrieval_hits", "Relevant passages retrieved.", ("kb",), registry=self.registry)
        self.retrieval_latency = Histogram("tunefetch_retrieval_latency_seconds", "Retrieval calls as the gateway "
                                           "saw them (embed, resolve, search).", ("kb",), buckets=_LATENCY_BUCKETS,
                                           registry=self.registry)
        self.abstentions = Counter("tunefetch_abstentions", "Answers declined for lack of relevant passages.",
                                   (*labels, "kb"), registry=self.registry)
        self.cache = Counter("tunefetch_retrieval_cache_lookups", "Retrievals with the cache on, by result "
                             "(hit, miss).", ("kb", "result"), registry=self.registry)
        self.feedback_count = Counter("tunefetch_feedback", "Answers that got feedback (once per answer and key), "
                                      "by sentiment (negative, positive, unscored).", (*labels, "sentiment"),
                                      registry=self.registry)
        self.feedback_score = Histogram("tunefetch_feedback_score", "Feedback scores (0 bad .. 1 good).", labels,
                                        buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=self.registry)
        self.kpi_reports = Counter("tunefetch_kpi_reports", "Answers a KPI was reported for.", (*labels, "kpi"),
                                   registry=self.registry)
        self.kpi_value = Counter("tunefetch_kpi_value", "Sum of reported KPI values (0..1 each): divided by "
                                 "tunefetch_kpi_reports_total, the KPI's rate.", (*labels, "kpi"), registry=self.registry)
        self.guard_decisions = Counter("tunefetch_guard_decisions", "Guard decisions, by policy, guard and action "
                                       "(pass, block, redact, filter, refuse).", ("policy", "guard", "action"),
                                       registry=self.registry)
        self.structured = Counter("tunefetch_structured_outputs", "Answers decoded under a schema, by format and "
                                  "whether every choice satisfied it.", (*labels, "format", "valid"),
                                  registry=self.registry)
        self.drift_p = Gauge("tunefetch_drift_p_value", "Latest drift test p-value per monitored group (kb:NAME, "
                             "adapter:NAME) and test.", ("group", "test"), registry=self.registry)
        self.drift = Gauge("tunefetch_drift_detected", "1 while the group's latest window differs from its reference "
                           "at the configured alpha.", ("group",), registry=self.registry)
        self.store_age = Gauge("tunefetch_store_version_age_seconds", "Age of the store version an alias serves.",
                               ("kb",), registry=self.registry)
        self.stale_sources = Gauge("tunefetch_store_sources_changed", "Sources of the serving version changed or "
                                   "gone since it was ingested (as the retriever's node sees them).", ("kb",),
                                   registry=self.registry)

    async def after(self, answer: Answer) -> None:
        model, arm = answer.model, answer.arm
        self.requests.labels(model, arm).inc()
        self.latency.labels(model, arm).observe(_seconds_since(answer.started))
        self.tokens.labels(model, arm, "prompt").inc(answer.generation.prompt_tokens)
        self.tokens.labels(model, arm, "completion").inc(answer.generation.completion_tokens)
        if answer.retrieved is not None:
            self.hits.labels(answer.retrieved.kb).inc(len(answer.retrieved.hits))
            if answer.retrieval_ms is not None:
                self.retrieval_latency.labels(answer.retrieved.kb).observe(answer.retrieval_ms / 1000)
            if self.cache_on:
                self.cache.labels(answer.retrieved.kb, "hit" if answer.retrieved.cached else "miss").inc()
            if answer.abstained:
                self.abstentions.labels(model, arm, answer.retrieved.kb).inc()
        if answer.schema_valid is not None:
            self.structured.labels(model, arm, answer.output_format, str(all(answer.schema_valid)).lower()).inc()
        self._guards(answer)

    async def failed(self, answer: Answer, error) -> None:
        self.errors.labels(answer.model, answer.arm, str(getattr(error, "status", 500))).inc()
        self._guards(answer)

    def known_guards(self, config) -> None:
        """Series from zero for every guard each configured policy runs (cluster.config.GuardsConfig),
        so rates and dashboards exist before the first decision."""
        for name, policy in config.policies.items():
            for guard in guard_names(policy):
                self.guard_decisions.labels(name, guard, "pass")

    def _guards(self, answer: Answer) -> None:
        for d in answer.guarded.decisions if answer.guarded else ():
            self.guard_decisions.labels(d.policy, d.guard, d.action).inc()

    def feedback(self, model: str, arm: str, event, negative_below: float) -> None:
        sentiment = "unscored" if event.score is None else "negative" if event.score < negative_below else "positive"
        self.feedback_count.labels(model, arm, sentiment).inc()
        if event.score is not None:
            self.feedback_score.labels(model, arm).observe(event.score)
        for kpi, value in event.kpis.items():
            self.kpi_reports.labels(model, arm, kpi).inc()
            self.kpi_value.labels(model, arm, kpi).inc(value)

    def monitor(self, report) -> None:
        """The latest drift and freshness report (serving.monitor.MonitorReport)."""
        for group in report.groups:
            for test in group.tests:
                self.drift_p.labels(group.id, test.name).set(test.p_value)
            self.drift.labels(group.id).set(float(group.drifted))
        for store in report.stores:
            self.store_age.labels(store.kb).set(store.age_s)
            self.stale_sources.labels(store.kb).set(store.stale)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def _seconds_since(started: float) -> float:
    return time.perf_counter() - started


def only_series(text: str, prefix: str) -> str:
    """The lines of a Prometheus exposition about metrics named `prefix`* (with their HELP/TYPE)."""
    keep = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") and len(line.split(" ", 3)) > 2 else line
        if name.startswith(prefix):
            keep.append(line)
    return "\n".join(keep) + ("\n" if keep else "")
