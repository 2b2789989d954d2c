"""Knowledge stores through the CLI: ingest -> versions -> search -> rollback, safe filters."""

from __future__ import annotations

import json

import pytest

from conftest import KB, SAMPLE


def questions():
    return [json.loads(line) for line in (SAMPLE / "questions.jsonl").read_text().splitlines() if line.strip()]


def top_doc_ids(cli, text: str, *extra: str) -> list[str]:
    out = cli("search", text, "--kb", KB, "--top-k", "3", *extra).stdout.splitlines()
    return [line.split()[2] for line in out[1:]]


def test_ingest_prints_the_new_version(ingested):
    assert ingested.startswith(f"{KB}@v")


@pytest.mark.parametrize("q", questions()[:8], ids=lambda q: q["id"])
def test_search_finds_the_answering_document(cli, ingested, q):
    assert set(q["doc_ids"]) & set(top_doc_ids(cli, q["question"]))


def test_filter_restricts_hits_and_injection_matches_nothing(cli, ingested):
    assert set(top_doc_ids(cli, "warranty", "--where", "doc_id=returns-policy")) == {"returns-policy"}
    injected = 'returns-policy" or doc_id != "x'
    assert top_doc_ids(cli, "warranty", "--where", f"doc_id={injected}") == []


def test_new_version_and_rollback(cli, ingested, tmp_path):
    current = int(ingested.split("@v")[1])
    (tmp_path / "memo.md").write_text("# Memo\n\n## Parking\n\nVisitor parking at Kestrel is in lot Q7.\n")
    newer = cli("ingest", str(tmp_path), "--kb", KB).stdout.strip().splitlines()[-1]
    assert newer == f"{KB}@v{current + 1}"
    assert top_doc_ids(cli, "Where is visitor parking?") == ["memo"]
    assert cli("kb", "rollback", KB).stdout.strip() == f"{KB}@v{current}"
    assert "memo" not in top_doc_ids(cli, "Where is visitor parking?")
    versions = cli("kb", "versions", KB).stdout.splitlines()
    assert any(line.startswith(f"* v{current}") for line in versions)
    assert any(line.strip().startswith(f"v{current + 1}") for line in versions)
    assert f"{KB}\tv{current}" in cli("kb", "list").stdout
