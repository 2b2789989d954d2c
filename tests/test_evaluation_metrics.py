"""The judge-free answer metrics and the paired bootstrap, on cases computed by hand; the facts
file and the adapter dataset it generates."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLE
from evaluation import metrics


@pytest.mark.parametrize("reply, reference, em", [
    ("45 days [1]", "45 days", 1.0),  # the citation marker is not part of the answer
    ("The 45 Days.", "45 days", 1.0),  # case, punctuation and articles are normalised away
    ("45 days and more [2]", "45 days", 0.0),
    ("$1,900 per site [3]", "$1,900 per site", 1.0),
    ("I don't know.", "45 days", 0.0),
])
def test_exact_match(reply, reference, em):
    assert metrics.exact_match(reply, reference) == em


def test_token_f1_by_hand():
    # predicted {45, days, and, more} vs gold {45, days}: precision 2/4, recall 2/2 -> F1 = 2/3
    assert metrics.token_f1("45 days and more [2]", "45 days") == pytest.approx(2 / 3)
    assert metrics.token_f1("60 days", "45 days") == pytest.approx(0.5)  # 1 of 2 tokens both ways
    assert metrics.token_f1("nothing alike", "45 days") == 0.0
    assert metrics.token_f1("", "") == 1.0


def test_citation_correct_needs_a_cited_passage_that_holds_the_answer():
    passages = ["Returns > Eligibility\nThe return window for unused hardware is 45 days.",
                "Warranty > Coverage\nThe warranty period for a K-200 robot is 36 months."]
    assert metrics.citation_correct("45 days [1]", passages, "45 days") == 1.0
    assert metrics.citation_correct("45 days [2]", passages, "45 days") == 0.0  # cites the wrong passage
    assert metrics.citation_correct("45 days", passages, "45 days") == 0.0  # cites nothing
    assert metrics.citation_correct("45 days [1][3]", passages, "45 days") == 0.0  # [3] was not retrieved
    assert metrics.citation_correct("45 days [2][1]", passages, "45 days") == 1.0
    assert metrics.cited_indices("a [2] b [1] c [2]") == [2, 1]


def test_declined_and_percentile():
    assert metrics.declined("I don't know.") and metrics.declined("I could not find anything relevant ...")
    assert not metrics.declined("45 days [1]")
    assert metrics.percentile([10, 20, 30, 40], 50) == 25.0 and metrics.percentile([], 50) is None


def test_paired_bootstrap_on_a_known_case():
    # b is right on 8 of 10 questions where a is right on 2, the same 2: difference 0.6 exactly.
    a = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    b = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    interval = metrics.paired_bootstrap(a, b, resamples=4000, seed=1)
    assert interval.difference == pytest.approx(0.6)
    # per-question differences are six 1s and four 0s: the mean of n=10 resampled pairs has
    # sd sqrt(0.24/10) ~ 0.155, so the 95 % interval is about 0.6 +- 0.3 and excludes zero
    assert 0.2 <= interval.low <= 0.4 and 0.8 <= interval.high <= 1.0 and interval.significant
    same = metrics.paired_bootstrap(a, a, resamples=500)
    assert (same.difference, same.low, same.high, same.significant) == (0, 0, 0, False)
    with pytest.raises(ValueError):
        metrics.paired_bootstrap([1, 0], [1])


def test_every_fact_is_stated_once_and_the_adapter_dataset_is_in_sync():
    from evaluation.facts import check_documents, load_facts
    from tunefetch import sample_domain

    facts = load_facts(SAMPLE / "facts.jsonl")
    check_documents(facts, SAMPLE / "docs")
    assert len(facts) >= 30 and all(f.update and f.update != f.answer for f in facts)
    committed = [json.loads(line) for line in (SAMPLE / "adapter_qa.jsonl").read_text().splitlines()]
    assert committed == sample_domain.adapter_rows(), "regenerate: python -m tunefetch.sample_domain"
    asked = {m["content"] for row in committed for m in row["messages"] if m["role"] == "user"}
    assert not asked & {f.eval_question for f in facts}, "a held-out phrasing leaked into training"


def test_updated_documents_change_exactly_the_chosen_facts(tmp_path):
    from evaluation.facts import load_facts, write_updated_documents

    facts = load_facts(SAMPLE / "facts.jsonl")
    changed = write_updated_documents(facts[:3], SAMPLE / "docs", tmp_path / "docs")
    assert [f.answer for f in changed] == [f.update for f in facts[:3]]
    for before, after in zip(facts[:3], changed):
        text = (tmp_path / "docs" / f"{before.doc_id}.md").read_text()
        assert before.statement not in text and after.statement in text
    untouched = facts[5]
    assert (tmp_path / "docs" / f"{untouched.doc_id}.md").read_text().count(untouched.statement) == 1
