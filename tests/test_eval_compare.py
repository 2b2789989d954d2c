"""`tunefetch eval compare` against the suite's running server: the four modes, both tracks,
the freshness test, the report files, and the store exactly as it was afterwards."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import KB, SAMPLE

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def compared(cli, server, tmp_path_factory):
    before = cli("kb", "versions", KB, "--json").stdout
    out = tmp_path_factory.mktemp("compare")
    proc = cli("eval", "compare", "--url", server, "--out", str(out), "--changed", "2", timeout=1500)
    return proc, out, json.loads(before)


def test_results_have_every_mode_track_and_phase(compared):
    proc, out, _ = compared
    results = json.loads((out / "results.json").read_text())
    facts = [json.loads(line) for line in (SAMPLE / "facts.jsonl").read_text().splitlines()]
    assert results["questions"] == len(facts)
    for mode in ("base", "rag", "ft", "hybrid"):
        metrics = results["modes"][mode]
        assert metrics["n"] == len(facts) and 0 <= metrics["exact_match"] <= metrics["f1"] + 1e-9 <= 1
        assert metrics["latency_p50_ms"] > 0
        assert (metrics["citation_correct"] is None) == (mode in ("base", "ft"))
    assert {"recall@1", "recall@k", "mrr", "ndcg@10"} <= set(results["retrieval"])
    for phase in ("before", "after_update", "after_retrain"):
        assert set(results["freshness"][phase]) == {"base", "rag", "ft", "hybrid"}
    assert results["versions"]["adapter"].startswith("support@v") and results["versions"]["kb"].startswith(f"{KB}@v")
    assert results["freshness"]["retrained_adapter"].startswith("support-fresh@v")
    assert set(results["differences"]) >= {"rag - base", "ft - base", "hybrid - rag"}
    # what the terminal shows: the table on stdout, the stages and the report paths on stderr
    assert proc.stdout.splitlines()[0].startswith("mode") and "report:" in proc.stderr


def test_the_modes_separate_as_the_readme_says(compared):
    """Answer quality, not just shape: the base model declines; the adapter answers facts it
    was trained on (held-out phrasings) and forgets a changed one until retrained; retrieval
    cites a passage that holds the answer; both together answer at least as well as retrieval."""
    results = json.loads((compared[1] / "results.json").read_text())
    modes, fresh = results["modes"], results["freshness"]
    assert modes["base"]["exact_match"] == 0 and modes["base"]["abstain_rate"] >= 0.9
    assert modes["ft"]["exact_match"] >= 0.5
    assert modes["rag"]["citation_correct"] >= 0.8 and modes["rag"]["abstain_rate"] <= 0.1
    assert modes["hybrid"]["exact_match"] >= modes["rag"]["exact_match"]
    assert fresh["before"]["ft"]["exact_match"] >= 0.5
    assert fresh["after_update"]["ft"]["exact_match"] == 0  # the store changed, the weights did not
    assert fresh["after_retrain"]["ft"]["exact_match"] >= 0.5


def test_every_answer_is_traceable_to_its_provenance(compared, cli):
    _, out, _ = compared
    answers = json.loads((out / "results.json").read_text())["answers"]
    hybrid = next(a for a in answers if a["mode"] == "hybrid")
    record = json.loads(cli("provenance", "show", hybrid["provenance_id"], "--json").stdout)
    assert record["adapter"]["ref"] == hybrid["model"] and record["retrieval"]["kb"] == KB
    base = next(a for a in answers if a["mode"] == "base")
    assert json.loads(cli("provenance", "show", base["provenance_id"], "--json").stdout)["adapter"] is None


def test_the_store_is_as_it_was_after_the_freshness_run(compared, cli):
    _, _, before = compared
    after = json.loads(cli("kb", "versions", KB, "--json").stdout)
    assert [(v["version"], v["current"]) for v in after] == [(v["version"], v["current"]) for v in before]


def test_report_and_chart(compared):
    _, out, _ = compared
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "## Freshness" in report and "| hybrid |" in report
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_approval_binds_the_report_and_breaks_when_a_byte_of_it_changes(compared, cli, tmp_path):
    _, out, _ = compared
    adapter = json.loads((out / "results.json").read_text())["versions"]["adapter"]
    report = tmp_path / "report"
    shutil.copytree(out, report)
    approval_id = cli("approve", adapter, "--eval", str(report), "--by", "reviewer-2").stdout.strip()
    listed = {a["approval_id"]: a for a in json.loads(cli("approvals", "list", "--json").stdout)}
    evidence = listed[approval_id]["evidence"]
    assert listed[approval_id]["valid"] and evidence["results"]["ft.exact_match"] >= evidence["thresholds"]["ft.exact_match"]
    assert evidence["kb"].startswith(f"{KB}@v") and len(evidence["eval_report_sha256"]) == 64

    results = report / "results.json"
    results.write_bytes(results.read_bytes() + b" ")  # one byte more: the same JSON, other evidence
    listed = {a["approval_id"]: a for a in json.loads(cli("approvals", "list", "--json").stdout)}
    assert not listed[approval_id]["valid"] and listed[approval_id]["reason"] == "the eval report changed"

    wrong = cli("approve", "echo@v1", "--eval", str(out), "--by", "reviewer-2", check=False)
    assert wrong.returncode == 2 and f"evaluated {adapter}, not echo@v1" in wrong.stderr
