"""Retrieval evaluation against relevance judgements (qrels): recall@k, MRR@k and nDCG@k.

Judgements are per document, but a knowledge store returns chunks, so a ranked chunk list is
collapsed to a ranked list of unique doc_ids (first occurrence wins) before scoring. The metric
definitions follow BEIR / pytrec_eval: a document counts as relevant when its grade is > 0,
nDCG uses the grade itself as gain (trec_eval's ndcg_cut) with a 1/log2(rank+1) discount.

Qrels come in two formats, detected from the path:
  * our JSONL, one {"id", "question", "doc_ids": [...], "relevance"?: {doc_id: grade}} a line;
  * BEIR: a dataset directory (queries.jsonl + qrels/<split>.tsv) or a qrels .tsv file
    (header `query-id<TAB>corpus-id<TAB>score`) with the dataset's queries.jsonl nearby.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from cluster.errors import UserError

DEFAULT_KS = (1, 3, 5, 10)
# Chunks collapse to fewer documents, so fetch several chunks per document slot we score.
_CHUNKS_PER_DOC = 3
# Enough of each query's ranking to see why it missed, without bloating the report.
_PER_QUERY_DOCS = 10
_BEIR_HEADER = ["query-id", "corpus-id", "score"]


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    relevant: dict[str, int]  # doc_id -> graded relevance (> 0)


# -- qrels loading -------------------------------------------------------------------------------
def load_qrels(path: str | Path, split: str = "test") -> list[Query]:
    """Loads queries with their relevant documents from our JSONL or a BEIR dataset.

    `split` names the BEIR qrels file read from a dataset directory (qrels/<split>.tsv).
    """
    path = Path(path)
    if path.is_dir():
        return _load_beir(path / "qrels" / f"{split}.tsv", path / "queries.jsonl")
    if not path.is_file():
        raise UserError(f"no such qrels file or directory: {path}")
    if path.suffix.lower() == ".tsv":
        return _load_beir(path, _find_beir_queries(path))
    return _load_jsonl(path)


def _json_lines(path: Path) -> Iterator[tuple[str, int, dict]]:
    """Yields (where, line number, object) for each non-blank line of a JSONL file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError:
            raise UserError(f"{where}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object")
        yield where, number, obj


def _load_jsonl(path: Path) -> list[Query]:
    queries: list[Query] = []
    seen: set[str] = set()
    for where, _, obj in _json_lines(path):
        query = _jsonl_query(where, obj)
        if query.id in seen:
            raise UserError(f"{where}: duplicate query id {query.id!r}")
        seen.add(query.id)
        queries.append(query)
    if not queries:
        raise UserError(f"{path}: no queries")
    return queries


def _jsonl_query(where: str, obj: dict) -> Query:
    if "question" not in obj and "_id" in obj:
        raise UserError(f"{where}: looks like BEIR queries; pass the dataset directory or its qrels .tsv")
    qid, text = obj.get("id"), obj.get("question")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: expected an 'id' and a non-empty 'question' string")
    doc_ids = obj.get("doc_ids", [])
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) and d for d in doc_ids):
        raise UserError(f"{where}: 'doc_ids' must be a list of doc id strings")
    relevant = {d: 1 for d in doc_ids}
    relevant.update(_grades(where, obj.get("relevance", {})))
    relevant = {d: g for d, g in relevant.items() if g > 0}
    if not relevant:
        # Recall is undefined without a relevant document; such a line is a data mistake.
        raise UserError(f"{where}: query {qid!r} has no relevant documents ('doc_ids' or 'relevance')")
    return Query(str(qid), text, relevant)


def _grades(where: str, relevance: object) -> dict[str, int]:
    if not isinstance(relevance, dict) or not all(
        isinstance(d, str) and d and _is_int(g) for d, g in relevance.items()
    ):
        raise UserError(f"{where}: 'relevance' must map doc ids to integer grades")
    return dict(relevance)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _find_beir_queries(qrels: Path) -> Path:
    # BEIR keeps qrels in <dataset>/qrels/, queries.jsonl one level up; also accept a flat layout.
    for candidate in (qrels.parent / "queries.jsonl", qrels.parent.parent / "queries.jsonl"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{qrels}: no queries.jsonl next to it or in its parent directory")


def _load_beir(qrels_path: Path, queries_path: Path) -> list[Query]:
    for needed in (qrels_path, queries_path):
        if not needed.is_file():
            raise UserError(f"BEIR dataset file not found: {needed}")
    judgements = _read_beir_qrels(qrels_path)
    texts = _read_beir_queries(queries_path)
    queries = []
    for qid, (number, relevant) in judgements.items():
        if qid not in texts:
            raise UserError(f"{qrels_path}:{number}: query {qid!r} is not in {queries_path}")
        # Queries judged only non-relevant (score 0) cannot be scored, as in BEIR's evaluation.
        positive = {d: g for d, g in relevant.items() if g > 0}
        if positive:
            queries.append(Query(qid, texts[qid], positive))
    if not queries:
        raise UserError(f"{qrels_path}: no query has a relevant document (score > 0)")
    return queries


def _read_beir_qrels(path: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """query-id -> (line of its first judgement, {corpus-id: score}), in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    if not lines or lines[0].strip().split("\t") != _BEIR_HEADER:
        raise UserError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score'")
    judgements: dict[str, tuple[int, dict[str, int]]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        qid, doc_id, score = _beir_row(f"{path}:{number}", line)
        relevant = judgements.setdefault(qid, (number, {}))[1]
        if doc_id in relevant:
            raise UserError(f"{path}:{number}: duplicate judgement for query {qid!r}, document {doc_id!r}")
        relevant[doc_id] = score
    return judgements


def _beir_row(where: str, line: str) -> tuple[str, str, int]:
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
        raise UserError(f"{where}: expected 'query-id<TAB>corpus-id<TAB>score'")
    try:
        score = int(parts[2])
    except ValueError:
        raise UserError(f"{where}: score {parts[2]!r} is not an integer") from None
    return parts[0].strip(), parts[1].strip(), score


def _read_beir_queries(path: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    for where, _, obj in _json_lines(path):
        qid, text = obj.get("_id"), obj.get("text")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not isinstance(text, str):
            raise UserError(f"{where}: expected '_id' and 'text'")
        texts[str(qid)] = text
    return texts


# -- metrics --------------------------------------------------------------------------------------
def collapse_to_docs(hits: Iterable) -> list[str]:
    """Ranked chunk hits -> ranked unique doc_ids; a document ranks at its best chunk."""
    return list(dict.fromkeys(hit.doc_id for hit in hits))


def _top(ranked: list[str], k: int) -> list[str]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # A repeated doc_id would be counted twice and push nDCG above 1; score each doc once.
    return list(dict.fromkeys(ranked))[:k]


def _positive(relevant: dict[str, int]) -> dict[str, int]:
    return {d: g for d, g in relevant.items() if g > 0}


def recall_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """|relevant ∩ top-k| / |relevant|; 0.0 when nothing is relevant."""
    positive = _positive(relevant)
    if not positive:
        return 0.0
    return len(positive.keys() & set(_top(ranked, k))) / len(positive)


def mrr_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """1 / rank of the first relevant document in the top k; 0.0 if none is there."""
    positive = _positive(relevant)
    for rank, doc_id in enumerate(_top(ranked, k), start=1):
        if doc_id in positive:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """DCG@k / ideal DCG@k with gain = grade and discount 1/log2(rank + 1)."""
    positive = _positive(relevant)
    ideal = _dcg(sorted(positive.values(), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return _dcg([positive.get(d, 0) for d in _top(ranked, k)]) / ideal


def _dcg(gains: list[int]) -> float:
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


def score_query(ranked: list[str], relevant: dict[str, int], ks: tuple[int, ...]) -> dict[str, float]:
    """The report's metrics for one query: recall at every k, MRR and nDCG at the largest k."""
    top = max(ks)
    metrics = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in ks}
    metrics[f"mrr@{top}"] = mrr_at_k(ranked, relevant, top)
    metrics[f"ndcg@{top}"] = ndcg_at_k(ranked, relevant, top)
    return metrics


# -- evaluation -----------------------------------------------------------------------------------
@dataclass
class EvalReport:
    kb: str
    collection: str
    kb_version: int
    n_queries: int
    metrics: dict[str, float]
    per_query: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "kb": self.kb,
            "collection": self.collection,
            "kb_version": self.kb_version,
            "n_queries": self.n_queries,
            "metrics": dict(self.metrics),
            "per_query": [dict(q) for q in self.per_query],
        }

    def to_table(self) -> str:
        """The averaged metrics as an aligned two-column table, one metric a row."""
        rows = [("metric", "value")] + [(name, f"{value:.4f}") for name, value in self.metrics.items()]
        name_width = max(len(name) for name, _ in rows)
        value_width = max(len(value) for _, value in rows)
        return "\n".join(f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows)


def evaluate(stores, embedder, kb: str, queries: list[Query], ks: Iterable[int] = DEFAULT_KS,
             depth: int | None = None) -> EvalReport:
    """Searches `kb` with every query and averages the document-level metrics over queries.

    `depth` is how many chunks to fetch per query (default: max(ks) * 3, since several chunks of
    one document collapse into one ranked document).
    """
    ks = _check_ks(ks)
    depth = _check_depth(depth, ks)
    if not queries:
        raise UserError("no queries to evaluate")
    vectors = embedder.encode([q.text for q in queries])  # one batch: far faster than per query
    if len(vectors) != len(queries):
        raise RuntimeError(f"embedder returned {len(vectors)} vectors for {len(queries)} queries")
    first = None
    per_query = []
    for query, vector in zip(queries, vectors):
        result = stores.search(kb, vector, top_k=depth)
        if first is None:
            first = result
        _check_same_version(first, result)
        ranked = collapse_to_docs(result.hits)
        per_query.append({
            "id": query.id,
            "ranked": ranked[:max(_PER_QUERY_DOCS, max(ks))],
            "metrics": score_query(ranked, query.relevant, ks),
        })
    return EvalReport(first.kb, first.collection, first.kb_version, len(queries), _mean(per_query), per_query)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(_is_int(k) and k >= 1 for k in ks):
        raise UserError(f"ks must be positive integers, got {ks!r}")
    return tuple(sorted(set(ks)))


def _check_depth(depth: int | None, ks: tuple[int, ...]) -> int:
    if depth is None:
        return max(ks) * _CHUNKS_PER_DOC
    # Fewer chunks than the largest k would silently cap recall@k below what the store can do.
    if not _is_int(depth) or depth < max(ks):
        raise UserError(f"depth must be an integer >= the largest k ({max(ks)}), got {depth!r}")
    return depth


def _check_same_version(first, result) -> None:
    # Each search resolves the alias anew; a rollout mid-run would mix two versions in one score.
    if result.collection != first.collection:
        raise UserError(
            f"knowledge store {first.kb!r} moved from {first.collection} to {result.collection} "
            "during the evaluation; run it again"
        )


def _mean(per_query: list[dict]) -> dict[str, float]:
    names = per_query[0]["metrics"].keys()
    return {name: sum(q["metrics"][name] for q in per_query) / len(per_query) for name in names}
