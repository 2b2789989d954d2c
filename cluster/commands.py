"""What each `tunefetch` verb does; argument parsing lives in cluster/cli.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from argparse import Namespace
from contextlib import contextmanager

from cluster.config import TunefetchConfig
from cluster.errors import UserError


def _say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def _stores(config: TunefetchConfig):
    from retrieval.milvus_endpoint import milvus_endpoint
    from retrieval.store import KnowledgeStores

    with milvus_endpoint(config) as address:
        yield KnowledgeStores(address)


def _version_arg(value: str | None) -> int | None:
    if value is None:
        return None
    digits = value[1:] if value.startswith("v") else value
    if not digits.isdigit():
        raise UserError(f"--to expects a version like v3, got {value!r}")
    return int(digits)


# -- knowledge stores ------------------------------------------------------------------------
def cmd_ingest(args: Namespace, config: TunefetchConfig) -> int:
    from retrieval.documents import JsonlFields
    from retrieval.embedding import Embedder
    from retrieval.ingest import ingest
    from retrieval.store import validate_name

    validate_name(args.kb)
    jsonl = JsonlFields(args.text_field, args.id_field, tuple(args.metadata_field))
    with _stores(config) as stores:
        result = ingest(args.paths, args.kb, stores, Embedder(), config.retrieval, progress=_say,
                        incremental=not args.full, jsonl=jsonl)
    _say(f"{result.documents} documents, {result.chunks} chunks ({result.embedded} embedded, "
         f"{result.chunks - result.embedded} reused) in {result.seconds:.1f} s, {result.chunks_per_s:.0f} chunks/s; "
         f"{len(result.skipped)} files skipped")
    print(f"{result.version.name}@v{result.version.version}")
    return 0


def cmd_kb(args: Namespace, config: TunefetchConfig) -> int:
    with _stores(config) as stores:
        if args.kb_command == "list":
            names = stores.names()
            if not names:
                _say("no knowledge stores (create one with `tunefetch ingest PATH --kb NAME`)")
            for name in names:
                collection, version = stores.current(name)
                _say(f"{name}\tv{version}\t{collection}\t{len(stores.versions(name))} versions")
        elif args.kb_command == "versions":
            for v in stores.versions(args.name):
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
                _say(f"{'*' if v.current else ' '} v{v.version}\t{v.rows} chunks\t{created}\t{v.collection}")
        else:
            version = stores.rollback(args.name, _version_arg(args.to))
            print(f"{version.name}@v{version.version}")
    return 0


def cmd_search(args: Namespace, config: TunefetchConfig) -> int:
    from retrieval.embedding import Embedder
    from retrieval.filters import build_filter, parse_where

    filters = parse_where(args.where)
    build_filter(filters)  # validate before loading anything
    top_k = args.top_k or config.retrieval.top_k
    if top_k < 1:
        raise UserError("--top-k must be at least 1")
    with _stores(config) as stores:
        stores.current(args.kb)
        result = stores.search(args.kb, Embedder().encode([args.text])[0], top_k, filters)
    _say(f"{result.kb} -> {result.collection} (v{result.kb_version}), {len(result.hits)} hits")
    for i, hit in enumerate(result.hits, 1):
        _say(f"{i}. {hit.score:.4f}  {hit.doc_id}  [{hit.section}]  chunk {hit.chunk_id}  v{hit.kb_version}")
    return 0


def cmd_eval(args: Namespace, config: TunefetchConfig) -> int:
    from retrieval.embedding import Embedder
    from retrieval.evaluation import DEFAULT_KS, evaluate, load_qrels

    queries = load_qrels(args.qrels)
    with _stores(config) as stores:
        stores.current(args.kb)
        report = evaluate(stores, Embedder(), args.kb, queries, ks=tuple(args.k or DEFAULT_KS))
    _say(f"{report.kb} -> {report.collection} (v{report.kb_version}), {report.n_queries} queries")
    print(report.to_table())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    return 0


# -- training and the registry ---------------------------------------------------------------
def cmd_train(args: Namespace, config: TunefetchConfig) -> int:
    from cluster.runtime import ray_runtime
    from cluster.telemetry import setup_tracing, shutdown_tracing
    from training.config import load_train_config
    from training.job import check_inputs, run_training

    train = load_train_config(args.train_config)
    check_inputs(train, config)  # fail fast, before starting Ray
    setup_tracing(config.telemetry, "training")
    try:
        with ray_runtime(config):
            version = run_training(train, config, progress=_say)
    finally:
        shutdown_tracing()
    metrics = version.metadata.get("metrics", {})
    _say(", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float)))
    print(version.ref)
    return 0


def cmd_submit(args: Namespace, config: TunefetchConfig) -> int:
    from cluster.jobs import submit_training

    # The job writes into this home on the cluster (a shared filesystem on multi-node clusters).
    return submit_training(args.address, args.train_config, config.home, progress=_say)


def cmd_adapters(args: Namespace, config: TunefetchConfig) -> int:
    from training.registry import open_registry

    registry = open_registry(config)
    if args.adapters_command == "list":
        versions = registry.all()
        if not versions:
            _say("no adapters (train one with `tunefetch train examples/train.yaml`)")
        for v in versions:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.metadata.get("created_at", 0)))
            _say(f"{v.ref}\t{v.content_hash[:12]}\tbase {v.metadata['base_model']['id']}\t"
                 f"{v.metadata['dataset']['rows']} rows\t{created}")
        return 0
    version = registry.get(args.ref)
    print(json.dumps(version.metadata, indent=2, sort_keys=True))
    print()
    print(registry.read_text(version.location, "MODEL_CARD.md"))
    return 0


# -- serving ---------------------------------------------------------------------------------
def _with_port(config: TunefetchConfig, port: int | None) -> TunefetchConfig:
    if port is None:
        return config
    return config.model_copy(update={"serving": config.serving.model_copy(update={"port": port})})


def cmd_serve(args: Namespace, config: TunefetchConfig) -> int:
    from ray import serve

    from cluster.runtime import ray_runtime
    from retrieval.milvus_endpoint import milvus_endpoint
    from serving.app import base_model_path, run_app

    config = _with_port(config, args.port)
    if args.print_serve_config:
        import yaml

        from serving.app import serve_config

        print(yaml.safe_dump(serve_config(config), sort_keys=False))
        return 0
    base_model_path(config)  # fail fast, before starting Ray
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ray_runtime(config), milvus_endpoint(config) as milvus:
        url = run_app(config, milvus)
        _say(f"serving on {url} (Ctrl-C to stop)")
        stop.wait()
        _say("shutting down")
        serve.shutdown()
    return 0


def cmd_query(args: Namespace, config: TunefetchConfig) -> int:
    from cluster.client import TunefetchClient
    from retrieval.filters import parse_where

    client = TunefetchClient(args.url or f"http://{config.serving.host}:{config.serving.port}")
    model = args.model or next(m["id"] for m in client.models() if m["parent"] is None)
    answer = client.chat(args.question, model, kb=args.kb, top_k=args.top_k, filters=parse_where(args.where),
                         max_tokens=args.max_tokens)
    print_answer(answer)
    return 0


def print_answer(answer) -> None:
    _say(f"[{answer.model}] {answer.text.strip()}")
    for c in answer.citations:
        _say(f"  [{c['index']}] {c['doc_id']} ({c['section']}) {c['kb']}@v{c['kb_version']} score {c['score']:.3f}")
    _say(f"  provenance {answer.provenance_id}  trace {answer.trace_id}")


def cmd_provenance(args: Namespace, config: TunefetchConfig) -> int:
    from serving.provenance import ProvenanceLog

    log = ProvenanceLog(config.paths.provenance)
    if args.provenance_command == "list":
        if args.limit < 1:
            raise UserError("--limit must be at least 1")
        for r in log.recent(args.limit):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
            kb = r["retrieval"]["collection"] if r.get("retrieval") else "-"
            _say(f"{r['provenance_id']}\t{when}\t{(r.get('adapter') or {}).get('ref') or r['base_model']['id']}\t{kb}")
        return 0
    record = log.get(args.id)
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True))
        return 0
    _print_lineage(record, config)
    return 0


def _print_lineage(record: dict, config: TunefetchConfig) -> None:
    from training.registry import open_registry

    _say(f"provenance {record['provenance_id']}  trace {record['trace_id']}")
    _say(f"  base model: {record['base_model']['id']} (sha256 {record['base_model']['sha256'][:16]})")
    adapter = record.get("adapter")
    if adapter:
        meta = open_registry(config).get(adapter["ref"]).metadata
        _say(f"  adapter: {adapter['ref']} (hash {adapter['content_hash'][:16]}) <- run {meta['run_id']}, "
             f"dataset {meta['dataset']['rows']} rows sha256 {meta['dataset']['sha256'][:16]}")
    retrieval = record.get("retrieval")
    if retrieval:
        _say(f"  store: {retrieval['kb']} -> {retrieval['collection']} (v{retrieval['kb_version']}), "
             f"template {record['prompt_template']}")
        for chunk in retrieval["chunks"]:
            _say(f"    {chunk['doc_id']}  chunk {chunk['chunk_id']}  score {chunk['score']:.3f}")
    _say(f"  output sha256 {record['output_hash'][:16]}")
    if record.get("latency_ms") is not None:
        parts = [f"{name} {record[f'{name}_ms']:.0f} ms" for name in ("retrieval", "generation")
                 if record.get(f"{name}_ms") is not None]
        _say(f"  time: {record['latency_ms']:.0f} ms in the gateway" + (f" ({', '.join(parts)})" if parts else ""))


def cmd_demo(args: Namespace, config: TunefetchConfig) -> int:
    from cluster.demo import run_demo

    return run_demo(_with_port(config, args.port), progress=_say)
