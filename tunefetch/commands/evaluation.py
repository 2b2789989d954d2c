"""Evaluations: `eval retrieval` (a store against qrels) and `eval compare` (tune or fetch?)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from cluster.config import TunefetchConfig
from tunefetch import sample_domain
from tunefetch.console import Console


def add_parsers(sub, command) -> None:
    p = command(sub, "eval", "evaluations")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    p = command(ev, "retrieval", "recall@k, MRR and nDCG@10 of a store against qrels", handler=eval_retrieval)
    p.add_argument("--kb", required=True, help="knowledge store name")
    p.add_argument("--qrels", required=True, type=Path,
                   help="JSONL {id, question, doc_ids} or a BEIR folder / qrels .tsv")
    p.add_argument("--k", type=int, action="append", default=None, help="a cut-off (repeatable; default: 1 3 5 10)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")

    p = command(ev, "compare", "base vs RAG vs fine-tuned vs hybrid on held-out questions, and freshness",
                handler=eval_compare)
    p.add_argument("--kb", default=sample_domain.KB, help=f"knowledge store (default: {sample_domain.KB})")
    p.add_argument("--adapter", default=sample_domain.ADAPTER,
                   help=f"adapter NAME (its newest version) or NAME@vN (default: {sample_domain.ADAPTER})")
    p.add_argument("--facts", type=Path, default=sample_domain.FACTS,
                   help="facts JSONL: statements, questions, answers, updates (default: the sample domain's)")
    p.add_argument("--docs", type=Path, default=sample_domain.DOCS,
                   help="the documents the store was ingested from (the freshness test edits a copy)")
    p.add_argument("--out", type=Path, default=Path("eval-compare"), help="report directory (default: ./eval-compare)")
    p.add_argument("--url", default=None, help="a running server to evaluate (default: start one for the run)")
    p.add_argument("--changed", type=int, default=8, help="facts changed by the freshness test (default: 8; 0 skips it)")
    p.add_argument("--top-k", type=int, default=sample_domain.TOP_K,
                   help=f"passages per RAG request (default: {sample_domain.TOP_K}, what the bundled small model "
                        "reads well; 3-5 for a real model)")


def eval_retrieval(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from retrieval.embedding import Embedder
    from retrieval.evaluation import DEFAULT_KS, evaluate, load_qrels
    from tunefetch.stack import knowledge_stores

    queries = load_qrels(args.qrels)
    with console.captured(config.paths.logs, "eval-retrieval"), knowledge_stores(config) as stores:
        stores.current(args.kb)
        report = evaluate(stores, Embedder(), args.kb, queries, ks=tuple(args.k or DEFAULT_KS))
    console.info(f"{report.kb} -> {report.collection} (v{report.kb_version}), {report.n_queries} queries")
    console.result(report.to_table())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    return 0


def eval_compare(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from tunefetch.comparison import run_comparison

    return run_comparison(args, config, console)
