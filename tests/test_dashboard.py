"""The Grafana dashboard shipped in the chart (helm/tunefetch/dashboards/tunefetch.json): a valid
dashboard model whose every query names metrics, and labels, that the session server's
GET /metrics really exports after representative traffic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from conftest import KB

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "tunefetch" / "dashboards" / "tunefetch.json"
METRIC = re.compile(r"\b(tunefetch_[a-z_]+|vllm:[a-z_]+|ray_serve_[a-z_]+)")
BY = re.compile(r"\bby \(([^)]*)\) \(\w+\((\w[\w:]*)")  # sum by (labels) (rate(metric ...


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def _traffic(server: str) -> None:
    """One answer of each kind the panels chart: base, retrieval, an abstention, an error, a
    structured output (guard decisions are counted from zero for the configured policies),
    feedback with a KPI, and a drift check over enough answers to fill the config's windows."""
    def chat(model: str, **extra) -> httpx.Response:
        body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "K-40 payload?"}], **extra}
        return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)

    assert chat("tiny-llama").status_code == 200
    assert chat("tiny-llama", retrieval={"kb": KB}).status_code == 200
    abstained = chat("tiny-llama", retrieval={"kb": KB, "min_score": 0.99, "no_context": "abstain"}).json()
    assert abstained["abstained"] is True
    assert chat("no-such-model").status_code == 404
    structured = chat("tiny-llama", response_format={"type": "json_object"})
    assert structured.status_code == 200, structured.text
    for _ in range(40):  # the session config's drift window is 20 answers
        answered = chat("tiny-llama", max_tokens=1, retrieval={"kb": KB})
    posted = httpx.post(f"{server}/v1/feedback", timeout=60, json={
        "provenance_id": answered.json()["provenance_id"], "score": 0.2, "kpis": {"resolved": 1}})
    assert posted.status_code == 200, posted.text
    assert httpx.get(f"{server}/v1/admin/monitor", timeout=120).status_code == 200


def test_the_dashboard_charts_only_what_the_server_exports(server, ingested):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36 and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    _traffic(server)
    samples: dict[str, set[str]] = {}  # sample name -> label names seen on it
    for line in httpx.get(f"{server}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels = set(re.findall(r'(\w+)="', rest)) if rest else set()
            samples.setdefault(name.split(" ")[0], set()).update(labels)
    for expr in _queries(dashboard):
        names = METRIC.findall(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in samples, f"{name} (in {expr!r}) is not exported"
        for labels, name in BY.findall(expr):
            missing = {label.strip() for label in labels.split(",")} - {"le"} - samples[name]
            assert not missing, f"{name} has no label {missing} (in {expr!r})"
