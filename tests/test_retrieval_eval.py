"""Unit tests of our own logic: document-level retrieval metrics, qrels loading, averaging.

Every expected value is computed by hand in a comment; log2(3) = 1.58496..., so 1/log2(3) = 0.63093.
`evaluate` runs against a fake store and embedder: what is tested is our collapsing and averaging,
not Milvus (tests/test_retrieval.py covers the real store).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cluster.errors import UserError
from retrieval.evaluation import (
    EvalReport,
    Query,
    collapse_to_docs,
    evaluate,
    load_qrels,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
)
from retrieval.store import Hit, SearchResult

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_domain"
INV_LOG2_3 = 1 / math.log2(3)  # discount at rank 2


# -- recall ---------------------------------------------------------------------------------------
def test_recall_counts_relevant_docs_in_the_top_k():
    relevant = {"a": 1, "b": 1, "c": 1}
    ranked = ["a", "x", "b", "y", "c"]
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)  # {a}
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(2 / 3)  # {a, b}
    assert recall_at_k(ranked, relevant, 5) == pytest.approx(1.0)  # {a, b, c}


def test_recall_with_k_larger_than_the_ranking():
    # Only 2 docs retrieved, k = 10: found {a} of {a, b} -> 1/2.
    assert recall_at_k(["a", "x"], {"a": 1, "b": 1}, 10) == pytest.approx(0.5)


def test_recall_is_zero_when_no_relevant_doc_is_retrieved():
    assert recall_at_k(["x", "y", "z"], {"a": 1}, 3) == 0.0


def test_recall_ignores_grade_zero_judgements():
    # b is judged NOT relevant (grade 0): relevant set is {a}; found {a} -> 1/1, not 1/2.
    assert recall_at_k(["a"], {"a": 1, "b": 0}, 5) == pytest.approx(1.0)
    # A higher grade does not weigh more in recall: found {b} of {a, b} -> 1/2.
    assert recall_at_k(["b"], {"a": 3, "b": 1}, 5) == pytest.approx(0.5)


# -- MRR ------------------------------------------------------------------------------------------
def test_mrr_is_the_reciprocal_rank_of_the_first_relevant_doc():
    ranked = ["x", "y", "a", "b"]
    relevant = {"a": 1, "b": 1}
    assert mrr_at_k(ranked, relevant, 10) == pytest.approx(1 / 3)  # first relevant (a) at rank 3
    assert mrr_at_k(ranked, relevant, 2) == 0.0  # top 2 = [x, y]: none relevant
    assert mrr_at_k(["b", "a"], relevant, 10) == pytest.approx(1.0)  # rank 1


def test_mrr_with_k_larger_than_the_ranking_and_no_hit():
    assert mrr_at_k(["x", "a"], {"a": 1}, 10) == pytest.approx(0.5)  # rank 2 -> 1/2
    assert mrr_at_k(["x", "y"], {"a": 1}, 10) == 0.0


# -- nDCG -----------------------------------------------------------------------------------------
def test_ndcg_with_graded_relevance():
    relevant = {"a": 2, "b": 1}
    ranked = ["x", "b", "a"]
    # DCG@3  = 0/log2(2) + 1/log2(3) + 2/log2(4) = 0.63093 + 1 = 1.63093
    # IDCG@3 = 2/log2(2) + 1/log2(3)              = 2 + 0.63093 = 2.63093
    expected = (1 / math.log2(3) + 2 / math.log2(4)) / (2 / 1 + 1 / math.log2(3))
    assert expected == pytest.approx(0.61991, abs=1e-5)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(expected)
    # @2: DCG = 1/log2(3) = 0.63093; IDCG@2 = 2 + 0.63093 -> 0.23981
    assert ndcg_at_k(ranked, relevant, 2) == pytest.approx(INV_LOG2_3 / (2 + INV_LOG2_3))


def test_ndcg_uses_linear_gain_not_exponential():
    # grades {a:3, b:1}, ranking [b, a], k = 2
    # linear (pytrec_eval ndcg_cut): (1 + 3/log2(3)) / (3 + 1/log2(3)) = 2.89279 / 3.63093 = 0.79671
    # exponential 2^rel - 1 would be (1 + 7/log2(3)) / (7 + 1/log2(3)) = 0.70982
    got = ndcg_at_k(["b", "a"], {"a": 3, "b": 1}, 2)
    assert got == pytest.approx((1 + 3 * INV_LOG2_3) / (3 + INV_LOG2_3))
    assert got == pytest.approx(0.79671, abs=1e-5)


def test_ndcg_ideal_is_truncated_at_k():
    # grades {a:3, b:2, c:1}, ranking [c], k = 1: DCG@1 = 1/1; IDCG@1 = 3/1 (not 3 + 2/log2(3) + 1/2)
    assert ndcg_at_k(["c"], {"a": 3, "b": 2, "c": 1}, 1) == pytest.approx(1 / 3)


def test_ndcg_with_k_larger_than_the_ranking():
    # ranking [x, a], k = 10: DCG = 1/log2(3); IDCG = 1/log2(2) = 1 -> 0.63093
    assert ndcg_at_k(["x", "a"], {"a": 1}, 10) == pytest.approx(INV_LOG2_3)
    assert ndcg_at_k(["a", "b"], {"a": 2, "b": 1}, 10) == pytest.approx(1.0)  # the ideal order


def test_ndcg_is_zero_when_no_relevant_doc_is_retrieved():
    assert ndcg_at_k(["x", "y"], {"a": 2}, 10) == 0.0
    assert ndcg_at_k(["a"], {}, 10) == 0.0  # nothing relevant at all: 0, not a ZeroDivisionError


def test_metrics_score_a_repeated_doc_once():
    # [a, a] must score as [a]: DCG = 1; IDCG for {a, b} = 1 + 1/log2(3) -> 1/1.63093 = 0.61315
    # (counting a twice would give (1 + 1/log2(3)) / (1 + 1/log2(3)) = 1.0)
    assert ndcg_at_k(["a", "a"], {"a": 1, "b": 1}, 2) == pytest.approx(1 / (1 + INV_LOG2_3))
    # [a, a, b] is the document ranking [a, b]: top 2 finds both -> 2/2 (chunk-style top 2 [a, a] gives 1/2)
    assert recall_at_k(["a", "a", "b"], {"a": 1, "b": 1}, 2) == pytest.approx(1.0)


# -- chunk -> document collapsing ------------------------------------------------------------------
def hit(doc_id: str, n: int = 0, collection: str = "kb__v1") -> Hit:
    return Hit(chunk_id=f"{doc_id}-{n}", doc_id=doc_id, section="", source="", text="",
               score=1.0 - n / 100, kb_version=1, collection=collection)


def test_collapse_keeps_the_first_occurrence_of_each_doc():
    hits = [hit("a", 0), hit("a", 1), hit("b", 2), hit("a", 3), hit("c", 4), hit("b", 5)]
    assert collapse_to_docs(hits) == ["a", "b", "c"]
    assert collapse_to_docs([]) == []


def test_collapsing_changes_the_score():
    # Chunks [a, a, b]: at chunk level b is at rank 3, at document level at rank 2.
    ranked = collapse_to_docs([hit("a", 0), hit("a", 1), hit("b", 2)])
    assert recall_at_k(ranked, {"b": 1}, 2) == pytest.approx(1.0)
    assert mrr_at_k(ranked, {"b": 1}, 10) == pytest.approx(0.5)


# -- qrels loading: our JSONL ---------------------------------------------------------------------
def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_qrels_jsonl_with_doc_ids_and_grades(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        json.dumps({"id": "q1", "question": "How long is the warranty?", "answer": "5 years",
                    "doc_ids": ["warranty", "faq"]}),
        "",
        json.dumps({"id": "q2", "question": "Returns?", "relevance": {"returns": 2, "faq": 1}}),
        json.dumps({"id": "q3", "question": "Both?", "doc_ids": ["a", "b"], "relevance": {"a": 3, "b": 0}}),
    ])
    assert load_qrels(path) == [
        Query("q1", "How long is the warranty?", {"warranty": 1, "faq": 1}),
        Query("q2", "Returns?", {"returns": 2, "faq": 1}),
        Query("q3", "Both?", {"a": 3}),  # grades override doc_ids; grade 0 means not relevant
    ]


def test_load_qrels_reads_the_sample_questions():
    queries = load_qrels(SAMPLE / "questions.jsonl")
    assert len(queries) == 24
    assert queries[0].id == "q01" and queries[0].relevant == {"returns-policy": 1}
    assert queries[0].text.startswith("Within how many days")


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "q9", "doc_ids": ["a"]}', "'question'"),
    ('{"id": "q9", "question": "?", "doc_ids": "a"}', "'doc_ids' must be a list"),
    ('{"id": "q9", "question": "?", "doc_ids": []}', "no relevant documents"),
    ('{"id": "q9", "question": "?", "relevance": {"a": "high"}}', "integer grades"),
    ('{"id": "q1", "question": "again?", "doc_ids": ["a"]}', "duplicate query id"),
    ('{"_id": "q9", "text": "?"}', "looks like BEIR queries"),
])
def test_load_qrels_jsonl_names_the_bad_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "q.jsonl", [
        json.dumps({"id": "q1", "question": "ok?", "doc_ids": ["a"]}),
        "",  # blank lines still count: the bad one is line 3 of the file
        bad_line,
    ])
    with pytest.raises(UserError, match=message) as err:
        load_qrels(path)
    assert f"{path}:3:" in str(err.value)


def test_load_qrels_missing_path_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="no such qrels file"):
        load_qrels(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no queries"):
        load_qrels(write_lines(tmp_path / "empty.jsonl", [""]))


# -- qrels loading: BEIR --------------------------------------------------------------------------
def beir_dataset(root: Path, qrels_rows: list[str], header: str = "query-id\tcorpus-id\tscore") -> Path:
    write_lines(root / "queries.jsonl", [
        json.dumps({"_id": "q1", "text": "what is a k200"}),
        json.dumps({"_id": "q2", "text": "dock install"}),
        json.dumps({"_id": "q3", "text": "judged only non-relevant"}),
        json.dumps({"_id": "q4", "text": "in another split"}),
    ])
    write_lines(root / "qrels" / "test.tsv", [header, *qrels_rows])
    return root


GOOD_ROWS = ["q1\td1\t2", "q1\td2\t1", "q1\td3\t0", "q2\td7\t1", "q3\td1\t0"]
GOOD_QUERIES = [
    Query("q1", "what is a k200", {"d1": 2, "d2": 1}),  # score 0 (d3) is a judged non-relevant doc
    Query("q2", "dock install", {"d7": 1}),
    # q3 has no relevant doc and q4 is not in test.tsv: neither is scored
]


def test_load_qrels_beir_directory(tmp_path):
    assert load_qrels(beir_dataset(tmp_path / "ds", GOOD_ROWS)) == GOOD_QUERIES


def test_load_qrels_beir_tsv_finds_queries_in_the_dataset_directory(tmp_path):
    root = beir_dataset(tmp_path / "ds", GOOD_ROWS)
    assert load_qrels(root / "qrels" / "test.tsv") == GOOD_QUERIES


def test_load_qrels_beir_tsv_next_to_queries(tmp_path):
    root = beir_dataset(tmp_path / "ds", GOOD_ROWS)
    flat = tmp_path / "flat"
    write_lines(flat / "queries.jsonl", (root / "queries.jsonl").read_text().splitlines())
    write_lines(flat / "dev.tsv", (root / "qrels" / "test.tsv").read_text().splitlines())
    assert load_qrels(flat / "dev.tsv") == GOOD_QUERIES


@pytest.mark.parametrize("rows, line, message", [
    (["q1\td1\t2", "q1\td2"], 3, "expected 'query-id<TAB>corpus-id<TAB>score'"),
    (["q1\td1\thigh"], 2, "not an integer"),
    (["q1\td1\t1", "q2\td2\t1", "q1\td1\t2"], 4, "duplicate judgement"),
    (["q1\td1\t1", "q99\td2\t1"], 3, "'q99' is not in"),
])
def test_load_qrels_beir_names_the_bad_line(tmp_path, rows, line, message):
    tsv = beir_dataset(tmp_path / "ds", rows) / "qrels" / "test.tsv"
    with pytest.raises(UserError, match=message) as err:
        load_qrels(tmp_path / "ds")
    assert f"{tsv}:{line}:" in str(err.value)


def test_load_qrels_beir_requires_the_header(tmp_path):
    tsv = beir_dataset(tmp_path / "ds", ["q1\td1\t1"], header="q1\td0\t1") / "qrels" / "test.tsv"
    with pytest.raises(UserError, match="expected the header") as err:
        load_qrels(tsv)
    assert f"{tsv}:1:" in str(err.value)


def test_load_qrels_beir_bad_queries_line_and_missing_files(tmp_path):
    root = beir_dataset(tmp_path / "ds", GOOD_ROWS)
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2"}\n')
    with pytest.raises(UserError, match=r"queries\.jsonl:2: expected '_id' and 'text'"):
        load_qrels(root)
    with pytest.raises(UserError, match=r"not found: .*dev\.tsv"):
        load_qrels(root, split="dev")
    (tmp_path / "lonely").mkdir()
    with pytest.raises(UserError, match="no queries.jsonl"):
        load_qrels(write_lines(tmp_path / "lonely" / "sub" / "test.tsv", ["query-id\tcorpus-id\tscore"]))


# -- evaluate -------------------------------------------------------------------------------------
class FakeEmbedder:
    """Query i -> the vector [i]; records every batch it is asked to encode."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        return np.arange(len(texts), dtype=np.float32).reshape(-1, 1)


class FakeStores:
    """Returns a fixed chunk ranking (by doc id) per query vector, cut to top_k like Milvus."""

    def __init__(self, rankings: list[list[str]], collections: list[str] | None = None):
        self.rankings, self.collections = rankings, collections
        self.calls: list[tuple[str, int]] = []

    def search(self, name: str, vector, top_k: int, filters=None) -> SearchResult:
        self.calls.append((name, top_k))
        i = int(vector[0])
        collection = self.collections[i] if self.collections else f"{name}__v3"
        hits = [hit(d, n, collection) for n, d in enumerate(self.rankings[i])][:top_k]
        return SearchResult(name, collection, int(collection.rsplit("__v", 1)[1]), hits)


TWO_QUERIES = [Query("q1", "first?", {"a": 1}), Query("q2", "second?", {"c": 2, "d": 1})]
TWO_RANKINGS = [
    ["a", "a", "b"],  # docs [a, b]
    ["x", "x", "d", "y", "c"],  # docs [x, d, y, c]
]


def test_evaluate_averages_over_queries():
    embedder, stores = FakeEmbedder(), FakeStores(TWO_RANKINGS)
    report = evaluate(stores, embedder, "kb", TWO_QUERIES, ks=(3, 1))
    # q1: docs [a, b], relevant {a}:       recall@1 = 1, recall@3 = 1,   mrr@3 = 1,   ndcg@3 = 1
    # q2: docs [x, d, y, c], {c:2, d:1}:  recall@1 = 0, recall@3 = 1/2, mrr@3 = 1/2,
    #     ndcg@3 = (1/log2(3)) / (2 + 1/log2(3)) = 0.23981 (c is at rank 4, outside k)
    q2_ndcg = INV_LOG2_3 / (2 + INV_LOG2_3)
    assert list(report.metrics) == ["recall@1", "recall@3", "mrr@3", "ndcg@3"]
    assert report.metrics == pytest.approx({
        "recall@1": (1 + 0) / 2,
        "recall@3": (1 + 0.5) / 2,
        "mrr@3": (1 + 0.5) / 2,
        "ndcg@3": (1 + q2_ndcg) / 2,
    })
    assert (report.kb, report.collection, report.kb_version, report.n_queries) == ("kb", "kb__v3", 3, 2)
    assert embedder.batches == [["first?", "second?"]]  # one batch for all queries
    assert stores.calls == [("kb", 9), ("kb", 9)]  # default depth = max(ks) * 3
    assert [q["id"] for q in report.per_query] == ["q1", "q2"]
    assert report.per_query[1]["ranked"] == ["x", "d", "y", "c"]
    assert report.per_query[1]["metrics"]["ndcg@3"] == pytest.approx(q2_ndcg)


def test_evaluate_default_ks_and_explicit_depth():
    stores = FakeStores(TWO_RANKINGS)
    report = evaluate(stores, FakeEmbedder(), "kb", TWO_QUERIES, depth=12)
    assert list(report.metrics) == ["recall@1", "recall@3", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    assert stores.calls == [("kb", 12), ("kb", 12)]
    # At k = 10 q2 finds c (rank 4) too: recall@10 = (1 + 2/2) / 2 = 1.0
    assert report.metrics["recall@10"] == pytest.approx(1.0)


def test_evaluate_scores_only_the_fetched_depth():
    stores = FakeStores(TWO_RANKINGS)
    report = evaluate(stores, FakeEmbedder(), "kb", TWO_QUERIES, ks=(1, 2), depth=2)
    assert stores.calls == [("kb", 2), ("kb", 2)]
    # depth 2 keeps chunks [a, a] -> docs [a] and [x, x] -> docs [x]: recall@2 = (1 + 0) / 2
    assert report.per_query[0]["ranked"] == ["a"] and report.per_query[1]["ranked"] == ["x"]
    assert report.metrics["recall@2"] == pytest.approx(0.5)


def test_evaluate_rejects_bad_arguments():
    with pytest.raises(UserError, match="no queries"):
        evaluate(FakeStores([]), FakeEmbedder(), "kb", [])
    with pytest.raises(UserError, match="ks must be positive"):
        evaluate(FakeStores(TWO_RANKINGS), FakeEmbedder(), "kb", TWO_QUERIES, ks=(0, 5))
    with pytest.raises(UserError, match="depth must be"):
        evaluate(FakeStores(TWO_RANKINGS), FakeEmbedder(), "kb", TWO_QUERIES, ks=(1, 10), depth=5)


def test_evaluate_refuses_a_store_that_moves_mid_run():
    stores = FakeStores(TWO_RANKINGS, collections=["kb__v3", "kb__v4"])
    with pytest.raises(UserError, match="moved from kb__v3 to kb__v4"):
        evaluate(stores, FakeEmbedder(), "kb", TWO_QUERIES)


# -- report output --------------------------------------------------------------------------------
def test_report_table_and_json():
    report = EvalReport("kb", "kb__v3", 3, 2, {"recall@1": 0.5, "recall@10": 0.75, "ndcg@10": 0.619907},
                        [{"id": "q1", "ranked": ["a"], "metrics": {"recall@1": 1.0}}])
    assert report.to_table() == (
        "metric      value\n"
        "recall@1   0.5000\n"
        "recall@10  0.7500\n"
        "ndcg@10    0.6199"
    )
    data = json.loads(json.dumps(report.to_json()))
    assert data == {
        "kb": "kb", "collection": "kb__v3", "kb_version": 3, "n_queries": 2,
        "metrics": {"recall@1": 0.5, "recall@10": 0.75, "ndcg@10": 0.619907},
        "per_query": [{"id": "q1", "ranked": ["a"], "metrics": {"recall@1": 1.0}}],
    }
