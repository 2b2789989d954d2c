"""Knowledge stores through the CLI: ingest -> versions -> search -> rollback, safe filters."""

from __future__ import annotations

import json
import re

from conftest import KB, SAMPLE


def questions():
    return [json.loads(line) for line in (SAMPLE / "questions.jsonl").read_text().splitlines() if line.strip()]


def top_doc_ids(cli, text: str, *extra: str) -> list[str]:
    out = cli("search", text, "--kb", KB, "--top-k", "3", *extra).stdout.splitlines()
    return [line.split()[2] for line in out if re.match(r"^\d+\. ", line)]


def test_ingest_prints_the_new_version(ingested):
    assert ingested.startswith(f"{KB}@v")


def test_search_shows_each_passage_under_its_hit_and_json_gives_the_record(cli, ingested):
    out = cli("search", "How do I reset a DockStation?", "--kb", KB, "--top-k", "2").stdout.splitlines()
    assert re.match(r"^1\. \d\.\d{4}  dockstation-troubleshooting  \[DockStation Troubleshooting > Resetting the "
                    r"Charger\]", out[0]), out
    assert out[1].startswith("   To reset the DockStation, hold the reset button")  # the text, heading shown above
    record = json.loads(cli("search", "How do I reset a DockStation?", "--kb", KB, "--top-k", "2", "--json").stdout)
    assert record["kb"] == KB and len(record["hits"]) == 2
    assert "hold the reset button" in record["hits"][0]["text"] and record["hits"][0]["chunk_id"]


def test_search_asks_the_running_server_and_finds_what_the_store_finds(server, cli, home, tmp_path):
    """With `tunefetch serve` up for the home, `search` asks it (POST /v1/retrieve) instead of
    loading an embedder and the store; without, it embeds here (NumPy MiniLM, no torch). Both
    find the same passages with the same scores."""
    announced = home / "server.json"
    assert json.loads(announced.read_text())["url"] == server

    def search() -> dict:
        return json.loads(cli("search", "Which fault code means a dirty contact plate?", "--kb", KB, "--top-k", "3",
                              "--json").stdout)

    via_server = search()
    announced.rename(tmp_path / "server.json")
    try:
        here = search()
    finally:
        (tmp_path / "server.json").rename(announced)
    assert (via_server["searched_by"], here["searched_by"]) == (server, "local")
    assert [(h["chunk_id"], round(h["score"], 4)) for h in via_server["hits"]] == \
        [(h["chunk_id"], round(h["score"], 4)) for h in here["hits"]]
    assert via_server["hits"][0]["text"] == here["hits"][0]["text"] and via_server["kb_version"] == here["kb_version"]


def test_filter_restricts_hits_and_injection_matches_nothing(cli, ingested):
    assert set(top_doc_ids(cli, "warranty", "--where", "doc_id=returns-policy")) == {"returns-policy"}
    injected = 'returns-policy" or doc_id != "x'
    assert top_doc_ids(cli, "warranty", "--where", f"doc_id={injected}") == []


def test_new_version_and_rollback(cli, ingested, tmp_path):
    current = int(ingested.split("@v")[1])
    (tmp_path / "memo.md").write_text("# Memo\n\n## Parking\n\nVisitor parking at Kestrel is in lot Q7.\n")
    newer = cli("ingest", str(tmp_path), "--kb", KB).stdout.strip().splitlines()[-1]
    # Numbers only grow; one may be skipped (eval compare's dropped trial version keeps its own).
    assert newer.startswith(f"{KB}@v") and int(newer.split("@v")[1]) > current
    assert top_doc_ids(cli, "Where is visitor parking?") == ["memo"]
    assert cli("kb", "rollback", KB).stdout.strip() == f"{KB}@v{current}"
    assert "memo" not in top_doc_ids(cli, "Where is visitor parking?")
    versions = cli("kb", "versions", KB).stdout.splitlines()
    assert any(line.startswith(f"* v{current}") for line in versions)
    assert any(line.strip().startswith(f"v{newer.split('@v')[1]}") for line in versions)
    assert f"{KB}\tv{current}" in cli("kb", "list").stdout


def test_eval_retrieval_reports_beir_metrics(cli, ingested, tmp_path):
    out = cli("eval", "retrieval", "--kb", KB, "--qrels", str(SAMPLE / "questions.jsonl"),
              "--json", str(tmp_path / "report.json")).stdout
    for metric in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
        assert metric in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_queries"] == len(questions()) and report["kb"] == KB
    # The bundled questions each name the one document that answers them. With the suite's
    # 48-token sentence windows, 23 of 24 have it in the top 3 (the security-hotline question
    # ranks other "hotline" passages first) and all 24 in the top 10.
    assert report["metrics"]["recall@3"] >= 0.95 and report["metrics"]["recall@10"] == 1.0
    assert 0.9 <= report["metrics"]["ndcg@10"] <= 1
    assert report["metrics"]["recall@1"] <= report["metrics"]["recall@10"]


def test_jsonl_records_become_documents_with_custom_fields(cli, tmp_path):
    data = tmp_path / "faq.jsonl"
    data.write_text('{"key": "f1", "body": "Kestrel badges are renewed every 18 months.", "team": "security"}\n'
                    '{"key": "f2", "body": "Cafeteria opens at 7:30.", "team": "facilities"}\n'
                    'not json\n')
    proc = cli("ingest", str(data), "--kb", "faq", "--text-field", "body", "--id-field", "key")
    assert "faq.jsonl:3" in proc.stderr and proc.stdout == "faq@v1\n"  # the bad line reported, the result alone
    hits = cli("search", "How often are badges renewed?", "--kb", "faq", "--top-k", "1").stdout
    assert "faq/f1" in hits
