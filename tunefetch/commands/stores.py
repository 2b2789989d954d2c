"""Knowledge stores: `ingest`, `kb list|versions|rollback`, `search`."""

from __future__ import annotations

import shutil
import time
from argparse import Namespace

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch.console import Console
from tunefetch.stack import knowledge_stores


# A CLI ingest embeds batches up to this size without loading torch (retrieval/embedding.py):
# a file or two is embedded before torch would have loaded.
LIGHT_BATCH = 32


def add_parsers(sub, command) -> None:
    p = command(sub, "ingest", "write a new version of a knowledge store from files, directories or globs",
                handler=ingest)
    p.add_argument("paths", nargs="+", help="markdown, text, HTML, PDF or JSONL files, directories or globs")
    p.add_argument("--kb", required=True, help="knowledge store name")
    p.add_argument("--full", action="store_true", help="re-embed every chunk (default: reuse unchanged ones)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="chunk size in embedder tokens for this version (default: retrieval.chunk_tokens)")
    p.add_argument("--chunk-overlap", type=int, default=None,
                   help="tokens shared by consecutive chunks (default: retrieval.chunk_overlap)")
    p.add_argument("--text-field", default="text", help="JSONL: field holding the text")
    p.add_argument("--id-field", default="id", help="JSONL: field holding the record id (default: line number)")
    p.add_argument("--metadata-field", action="append", default=[], help="JSONL: a field kept as metadata (repeatable)")

    p = command(sub, "kb", "inspect and roll back knowledge stores")
    kb = p.add_subparsers(dest="kb_command", required=True, metavar="ACTION")
    p = command(kb, "list", "stores and their current versions", handler=kb_list, json="print JSON")
    p = command(kb, "versions", "versions of one store", handler=kb_versions, json="print JSON")
    p.add_argument("name", help="knowledge store name")
    p = command(kb, "rollback", "point a store back at an older version", handler=kb_rollback)
    p.add_argument("name", help="knowledge store name")
    p.add_argument("--to", default=None, help="version (vN); default: the one before the current")

    p = command(sub, "search", "retrieval only: the top passages of a store",
                handler=search, json="print the full hits as JSON")
    p.add_argument("text", help="the query")
    p.add_argument("--kb", required=True, help="knowledge store name")
    p.add_argument("--top-k", type=int, default=None, help="hits to return (default: retrieval.top_k)")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="filter on doc_id, section, source, kb_version or ingested_at (repeatable)")


def version_arg(value: str | None) -> int | None:
    if value is None:
        return None
    digits = value[1:] if value.startswith("v") else value
    if not digits.isdigit():
        raise UserError(f"--to expects a version like v3, got {value!r}")
    return int(digits)


def ingest(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from retrieval.documents import JsonlFields
    from retrieval.embedding import Embedder
    from retrieval.ingest import ingest as run_ingest
    from retrieval.store import validate_name

    validate_name(args.kb)
    jsonl = JsonlFields(args.text_field, args.id_field, tuple(args.metadata_field))
    settings = chunking(config, args.chunk_tokens, args.chunk_overlap)
    with console.captured(config.paths.logs, "ingest"), knowledge_stores(config) as stores, \
            console.progress(f"ingest {args.kb}") as update:
        result = run_ingest(args.paths, args.kb, stores, Embedder(light_up_to=LIGHT_BATCH), settings,
                            progress=console.info, on_chunks=update, incremental=not args.full, jsonl=jsonl)
    console.info(f"{result.documents} documents, {result.chunks} chunks ({result.embedded} embedded, "
                 f"{result.chunks - result.embedded} reused) in {result.seconds:.1f} s; "
                 f"{len(result.skipped)} files skipped")
    console.result(result.version.ref)
    return 0


def chunking(config: TunefetchConfig, tokens: int | None, overlap: int | None):
    """The retrieval settings with this ingest's chunking, validated like the config file."""
    from pydantic import ValidationError

    from cluster.config import RetrievalConfig, describe_validation_error

    update = {k: v for k, v in (("chunk_tokens", tokens), ("chunk_overlap", overlap)) if v is not None}
    try:
        return RetrievalConfig.model_validate({**config.retrieval.model_dump(), **update})
    except ValidationError as exc:
        raise UserError(f"--chunk-tokens/--chunk-overlap: {describe_validation_error(exc)}") from None


def kb_list(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    with knowledge_stores(config) as stores:
        rows = []
        for name in stores.names():
            versions = stores.versions(name)
            current = next(v for v in versions if v.current)
            rows.append({"name": name, "version": current.version, "collection": current.collection,
                         "versions": len(versions), "rows": current.rows})
    if args.json:
        console.json(rows)
        return 0
    if not rows:
        console.info("no knowledge stores (create one with `tunefetch ingest PATH --kb NAME`)")
    console.table([[r["name"], f"v{r['version']}", r["collection"], f"{r['versions']} versions"] for r in rows])
    return 0


def kb_versions(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    with knowledge_stores(config) as stores:
        versions = stores.versions(args.name)
    if args.json:
        console.json([{"name": v.name, "version": v.version, "collection": v.collection, "rows": v.rows,
                       "current": v.current, **v.record.model_dump(mode="json")} for v in versions])
        return 0
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
        console.result(f"{'*' if v.current else ' '} v{v.version}\t{v.rows} chunks\t{created}\t{v.collection}")
    return 0


def kb_rollback(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    with knowledge_stores(config) as stores:
        version = stores.rollback(args.name, version_arg(args.to))
    console.result(version.ref)
    return 0


def search(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from retrieval.filters import build_filter, parse_where

    filters = parse_where(args.where)
    build_filter(filters)  # validate before loading anything
    top_k = args.top_k or config.retrieval.top_k
    if top_k < 1:
        raise UserError("--top-k must be at least 1")
    result = _search_on_server(args.text, args.kb, top_k, filters, config, console)
    if result is None:
        result = _search_here(args.text, args.kb, top_k, filters, config, console)
    if args.json:
        console.json(result)
        return 0
    console.info(f"{result['kb']} -> {result['collection']} (v{result['kb_version']}), {len(result['hits'])} hits")
    width = max(40, shutil.get_terminal_size((100, 20)).columns - 6)
    for i, hit in enumerate(result["hits"], 1):
        console.result(f"{i}. {hit['score']:.4f}  {hit['doc_id']}  [{hit['section']}]  chunk {hit['chunk_id']}  "
                       f"v{hit['kb_version']}")
        console.result(f"   {_passage(hit['text'], hit['section'], width)}")
    return 0


def _search_on_server(query: str, kb: str, top_k: int, filters: dict, config: TunefetchConfig,
                      console: Console) -> dict | None:
    """The hits from the `tunefetch serve` of this home, when one runs: its embedder is loaded
    and its cache warm. None: search here instead."""
    from tunefetch.client import Client, ServerUnavailable, Unauthorized
    from tunefetch.commands.serving import running_server

    url = running_server(config)
    if url is None:
        return None
    try:
        data = Client.for_config(config, url).retrieve(query, kb, top_k, filters)
    except ServerUnavailable:
        return None
    except Unauthorized:
        console.info(f"the server at {url} wants an API key (client.api_key): searching the store directly")
        return None
    hits = [{k: h[k] for k in ("chunk_id", "doc_id", "section", "source", "text", "score", "kb_version")}
            | {"collection": data["collection"]} for h in data["data"]]
    return {"kb": data["kb"], "collection": data["collection"], "kb_version": data["kb_version"], "hits": hits,
            "searched_by": url}


def _search_here(query: str, kb: str, top_k: int, filters: dict, config: TunefetchConfig, console: Console) -> dict:
    from retrieval.embedding import Embedder

    with console.captured(config.paths.logs, "search"), knowledge_stores(config) as stores:
        stores.current(kb)
        vector = Embedder(light_up_to=1).encode([query])[0]
        return {**stores.search(kb, vector, top_k, filters).to_json(), "searched_by": "local"}


def _passage(text: str, section: str, width: int) -> str:
    """The hit's text on one line, without its heading line (shown above), cut to `width`."""
    body = text.split("\n", 1)[1] if section and text.startswith(section) and "\n" in text else text
    body = " ".join(body.split())
    return body if len(body) <= width else body[:width - 1] + "…"
