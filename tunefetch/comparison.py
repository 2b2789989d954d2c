"""`tunefetch eval compare`: wires the evaluation (evaluation/) to a running server, the knowledge
stores and the trainer, and writes the report."""

from __future__ import annotations

import time
from argparse import Namespace
from contextlib import ExitStack
from pathlib import Path

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch.console import Console


def run_comparison(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from evaluation.compare import Comparison, Setup, StoreOps, differences, freshness, summarize
    from evaluation.facts import check_documents, load_facts
    from evaluation.report import write_report
    from retrieval.embedding import Embedder
    from retrieval.evaluation import Query, evaluate
    from tunefetch.client import Client
    from tunefetch.stack import knowledge_stores, served_app

    facts = load_facts(args.facts)
    check_documents(facts, args.docs)
    if args.changed < 0 or args.top_k < 1:
        raise UserError("--changed must be >= 0 and --top-k >= 1")
    change = [f for f in facts if f.update is not None][:args.changed]
    started = time.perf_counter()
    with console.captured(config.paths.logs, "eval-compare"), ExitStack() as stack:
        stores = stack.enter_context(knowledge_stores(config))
        stores.current(args.kb)  # an unknown store fails before anything starts
        with console.stage("1/4 the server", started):
            url = args.url or stack.enter_context(served_app(config))
            client = Client.for_config(config, url)
            base = client.base_model()
            adapter = _exact_adapter(client, args.adapter)
            console.note(f"{url}: base {base}, adapter {adapter}, store {args.kb}@v{stores.current(args.kb)[1]}")
        setup = Setup(kb=args.kb, base=base, adapter=adapter, top_k=args.top_k)
        texts: dict[tuple[str, str], str] = {}

        def passage_text(citation: dict) -> str:
            key = (citation["collection"], citation["chunk_id"])
            if key not in texts:
                texts.update({(citation["collection"], k): v for k, v in
                              stores.chunk_texts(citation["collection"], [citation["chunk_id"]]).items()})
            return texts.get(key, "")

        with console.stage(f"2/4 {len(facts)} held-out questions x base, rag, ft, hybrid", started), \
                console.progress("answers") as update:
            comparison = Comparison(client, setup, passage_text, console.info, on_answer=update)
            rows = comparison.ask(facts)
        with console.stage("3/4 retrieval track", started):
            queries = [Query(f.id, f.eval_question, {f.doc_id: 1}) for f in facts]
            retrieval = evaluate(stores, Embedder(), args.kb, queries)
        results = {
            "questions": len(facts),
            "settings": {"top_k": setup.top_k, "max_tokens": setup.max_tokens, "temperature": 0},
            "versions": {"kb": f"{args.kb}@v{retrieval.kb_version}", "collection": retrieval.collection,
                         "adapter": adapter, "base_model": base},
            "modes": summarize(rows),
            "differences": differences(rows),
            "retrieval": {"k": setup.top_k, "recall@k": retrieval.metrics[f"recall@{setup.top_k}"]
                          if f"recall@{setup.top_k}" in retrieval.metrics else None,
                          **{f"recall@{k}": retrieval.metrics[f"recall@{k}"] for k in (1, 3, 5, 10)},
                          "mrr": retrieval.metrics["mrr@10"], "ndcg@10": retrieval.metrics["ndcg@10"]},
            "answers": [row.__dict__ for row in rows],
        }
        if change:
            with console.stage(f"4/4 freshness: {len(change)} facts change in the store", started), \
                    console.progress("answers") as update:
                comparison.on_answer = update
                results["freshness"] = freshness(
                    comparison, facts, change, rows, args.docs, _store_ops(stores, args.kb, config, console),
                    _retrainer(adapter, config, console), progress=console.note)
        paths = write_report(args.out, results)
    _summary(console, results, paths, time.perf_counter() - started)
    return 0


def _exact_adapter(client, name: str) -> str:
    """NAME -> its newest NAME@vN now, so the whole run asks one version."""
    for model in client.models():
        if model["id"] == name and model["parent"] is not None:
            return model["root"] if "@v" not in name else name
    raise UserError(f"the server has no adapter {name!r} (see `tunefetch adapters list`)")


def _store_ops(stores, kb: str, config: TunefetchConfig, console: Console):
    from evaluation.compare import StoreOps
    from retrieval.embedding import Embedder
    from retrieval.ingest import ingest

    # The trial version is chunked like the version it stands in for, and must not push the
    # user's old versions out (no retention for it).
    current = next(v for v in stores.versions(kb) if v.current).record
    settings = config.retrieval.model_copy(update={
        "keep_versions": 0, "chunk_tokens": current.chunk_tokens or config.retrieval.chunk_tokens,
        "chunk_overlap": current.chunk_overlap if current.chunk_overlap is not None else config.retrieval.chunk_overlap})
    return StoreOps(
        ingest=lambda docs: ingest([str(docs)], kb, stores, Embedder(), settings, progress=console.note).version.version,
        rollback=lambda version: stores.rollback(kb, version),
        drop=lambda version: stores.drop_version(kb, version),
        current=lambda: stores.current(kb)[1],
    )


def _retrainer(adapter: str, config: TunefetchConfig, console: Console):
    """Trains NAME-fresh with NAME@vN's recorded recipe on a new dataset; returns its ref. A
    separate name: `NAME` keeps resolving to what the user trained."""
    from evaluation.facts import adapter_rows, write_jsonl
    from serving.prompts import CHAT_CONTEXT
    from training.config import TrainConfig
    from training.registry import open_registry
    from tunefetch.commands.training import run_training_job

    recipe = open_registry(config.registry_settings()).get(adapter).record.config

    def retrain(facts, docs: Path) -> str:
        import ray

        dataset = write_jsonl(adapter_rows(facts, docs, CHAT_CONTEXT.chat), docs.parent / "retrain.jsonl")
        spec = TrainConfig.model_validate({**recipe, "name": f"{adapter.split('@')[0]}-fresh",
                                           "datasets": [{"path": str(dataset), "format": "chat"}]})
        if ray.is_initialized():  # beside the running app: use the CPUs it leaves free
            free = ray.available_resources().get("CPU", 0.0)
            per_worker = min(spec.scaling.cpus_per_worker, max(0.1, free / spec.scaling.num_workers))
            spec = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"cpus_per_worker": per_worker})})
        return run_training_job(spec, config, console).ref

    return retrain


def _summary(console: Console, results: dict, paths: dict, seconds: float) -> None:
    modes = results["modes"]
    console.result("mode     EM     F1     citations  abstain  p50 ms")
    for mode, r in modes.items():
        cite = "-" if r["citation_correct"] is None else f"{r['citation_correct']:.2f}"
        console.result(f"{mode:<8} {r['exact_match']:.2f}   {r['f1']:.2f}   {cite:<9}  {r['abstain_rate']:.2f}     "
                       f"{r['latency_p50_ms']:.0f}")
    fresh = results.get("freshness")
    if fresh and "after_update" in fresh:
        for phase in ("before", "after_update", "after_retrain"):
            if phase in fresh:
                console.result(f"freshness {phase:<13} " + "  ".join(
                    f"{mode} {fresh[phase][mode]['exact_match']:.2f}" for mode in fresh[phase]))
    console.info(f"report: {paths['report']}, {paths['results']}, {paths['chart']} ({seconds:.0f} s)")
