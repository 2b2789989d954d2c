"""Drift and freshness monitoring: the tests flag a stream where out-of-domain questions
arrive and stay quiet on one where nothing changed (real embedder, real retrieval scores of
the sample domain); `tunefetch monitor` reports stores whose sources changed on disk; the
server's periodic check lands in /metrics."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from cluster.config import MonitorConfig
from conftest import KB, bench_module
from serving.monitor import check_group, run


@pytest.fixture(scope="module")
def streams():
    bench = bench_module("drift_bench")
    from retrieval.embedding import Embedder

    return bench, bench.Scorer(Embedder()), bench.in_domain_questions(), bench.out_of_domain_questions()


def _group(streams, seed: int, shift: float, window: int = 200):
    bench, scorer, inside, outside = streams
    rng = random.Random(seed)
    questions = bench.stream(rng, window, 0.0, inside, outside) + bench.stream(rng, window, shift, inside, outside)
    return check_group("kb:kestrel", bench.records(questions, scorer), scorer.embed, MonitorConfig(window=window))


def test_a_stream_with_out_of_domain_questions_is_flagged_and_an_unchanged_one_is_not(streams):
    for seed in (1, 2, 3):
        quiet = _group(streams, seed, shift=0.0)
        assert not quiet.drifted, [t.to_json() for t in quiet.tests]
        shifted = _group(streams, seed, shift=0.3)
        assert shifted.drifted
        tests = {t.name: t for t in shifted.tests}
        assert set(tests) == {"query_embedding", "top1_score", "top_gap", "abstain_rate"}
        # the new questions sit further from the reference, retrieve worse and abstain more
        assert tests["query_embedding"].p_value <= shifted.level
        assert tests["top1_score"].current < tests["top1_score"].reference
        assert tests["abstain_rate"].current > tests["abstain_rate"].reference


def test_groups_wait_for_two_windows_and_leave_shadow_copies_out(streams):
    bench, scorer, inside, outside = streams
    records = bench.records(inside[:50], scorer)
    records += [r.model_copy(update={"canary_arm": "shadow"}) for r in bench.records(inside[:50], scorer)]
    report = run(records, scorer.embed, MonitorConfig(window=30), [])
    assert [(g.id, g.answers, g.drifted) for g in report.groups] == [("kb:kestrel", 50, False)]
    assert report.groups[0].note == "collecting: 50 of 60 answers" and not report.groups[0].tests


def test_monitor_cli_reports_sources_changed_or_gone_since_the_ingest(cli, tmp_path):
    docs = tmp_path / "fresh-docs"
    docs.mkdir()
    for name in ("a", "b", "c"):
        (docs / f"{name}.md").write_text(f"# Part {name}\n\nPart {name} ships in a blue box.\n")
    cli("ingest", str(docs), "--kb", "freshness")

    def store() -> dict:
        return json.loads(cli("monitor", "--kb", "freshness", "--json").stdout)["stores"][0]

    assert (store()["checked"], store()["changed"], store()["missing"]) == (3, [], [])
    (docs / "a.md").write_text("# Part a\n\nPart a now ships in a red box.\n")
    (docs / "b.md").unlink()
    now = store()
    assert [s.rsplit("/", 1)[1] for s in now["changed"]] == ["a.md"]
    assert [s.rsplit("/", 1)[1] for s in now["missing"]] == ["b.md"]
    text = cli("monitor", "--kb", "freshness").stdout
    assert "1 changed, 1 missing" in text and "changed: file://" in text
    assert cli("monitor", "--kb", "nosuchstore", check=False).returncode == 2


def test_the_server_checks_drift_and_exports_it(server):
    # enough answers on the store for the session config's window (serve.yaml: window 20)
    for i in range(45):
        body = {"model": "tiny-llama", "max_tokens": 1, "temperature": 0, "retrieval": {"kb": KB, "top_k": 2},
                "messages": [{"role": "user", "content": f"What is the warranty on part {i}?"}]}
        assert httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).status_code == 200
    report = httpx.get(f"{server}/v1/admin/monitor", timeout=120).json()
    group = next(g for g in report["groups"] if g["group"] == f"kb:{KB}")
    assert {t["test"] for t in group["tests"]} == {"query_embedding", "top1_score", "top_gap", "abstain_rate"}
    assert all(0 <= t["p_value"] <= 1 for t in group["tests"]) and group["level"] > 0
    assert any(s["kb"] == KB and s["checked"] > 0 for s in report["stores"])
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    assert f'tunefetch_drift_p_value{{group="kb:{KB}",test="query_embedding"}}' in metrics
    assert f'tunefetch_store_version_age_seconds{{kb="{KB}"}}' in metrics
