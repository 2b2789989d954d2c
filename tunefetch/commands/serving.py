"""Serving: `serve` (the Ray Serve app in the foreground) and `query` (ask a running server)."""

from __future__ import annotations

import signal
import threading
from argparse import Namespace
from contextlib import contextmanager

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch.console import Console


def add_parsers(sub, command) -> None:
    p = command(sub, "serve", "run the Ray Serve application in the foreground", handler=serve)
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serving.port)")
    p.add_argument("--print-serve-config", action="store_true",
                   help="print the Serve config (YAML) a KubeRay RayService deploys, without secrets, and exit")

    p = command(sub, "query", "ask a running server; prints the answer, citations, provenance and trace ids",
                handler=query)
    p.add_argument("question", help="the user message")
    p.add_argument("--model", default=None, help="base model id, adapter NAME or NAME@vN (default: base)")
    p.add_argument("--kb", default=None, help="retrieve from this knowledge store")
    p.add_argument("--top-k", type=int, default=None, help="passages to retrieve (default: retrieval.top_k)")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="retrieval filter (repeatable)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer length limit (default: serving.default_max_tokens)")
    p.add_argument("--cite", action="store_true", help="with --kb: strict citations (JSON answer whose citations can "
                                                       "only name retrieved passages; quotes verified)")
    p.add_argument("--url", default=None, help="server URL (default: from serving.host/port)")


def with_port(config: TunefetchConfig, port: int | None) -> TunefetchConfig:
    if port is None:
        return config
    return config.model_copy(update={"serving": config.serving.model_copy(update={"port": port})})


def serve(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    config = with_port(config, args.port)
    if args.print_serve_config:
        import yaml

        from serving.app import serve_config

        console.result(yaml.safe_dump(serve_config(config), sort_keys=False).rstrip())
        return 0
    from serving.app import base_model_path, check_exposure
    from tunefetch.stack import served_app

    base_model_path(config)  # fail fast, before starting Ray
    check_exposure(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with console.captured(config.paths.logs, "serve"), served_app(config) as url, announced(config, url):
        console.info(f"serving on {url} (Ctrl-C to stop; framework log: {console.log_path or 'on this terminal'})")
        stop.wait()
        console.info("shutting down")
    return 0


@contextmanager
def announced(config: TunefetchConfig, url: str):
    """HOME/server.json names the running server while it runs, so commands on the same home
    (`search`) can ask it instead of loading the embedder and the store themselves."""
    import json
    import os

    from cluster.files import replace_text

    path = config.paths.server
    replace_text(path, json.dumps({"url": url, "pid": os.getpid()}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def running_server(config: TunefetchConfig) -> str | None:
    """The URL of the server announced for this home, if its process is alive."""
    import json

    from retrieval.milvus_endpoint import pid_alive

    try:
        announced = json.loads(config.paths.server.read_text())
        return announced["url"] if pid_alive(int(announced["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def query(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from retrieval.filters import parse_where
    from tunefetch.client import Client

    if args.cite and not args.kb:
        raise UserError("--cite needs --kb: citations name retrieved passages")
    client = Client.for_config(config, args.url)
    model = args.model or client.base_model()
    answer = client.chat(args.question, model, kb=args.kb, top_k=args.top_k, filters=parse_where(args.where),
                         max_tokens=args.max_tokens, cite=args.cite)
    show_answer(console, answer)
    return 0


def show_answer(console: Console, answer, indent: str = "") -> None:
    console.result(f"{indent}[{answer.model}] {answer.text.strip()}")
    for i, c in enumerate(answer.citations, 1):
        console.result(f"{indent}  [{i}] {c['doc_id']} ({c['section']}) {c['kb']}@v{c['kb_version']} "
                       f"score {c['score']:.3f}")
    if answer.attribution is not None:
        console.result(f"{indent}  quotes: {answer.attribution['verified']} verified, "
                       f"{answer.attribution['unverified']} not")
    for c in (answer.attribution or {}).get("citations", []):
        console.result(f"{indent}  cites [{c['index']}] {'verified' if c['verified'] else 'NOT verified'}: "
                       f"{c['quote'].strip()[:100]!r}")
    console.result(f"{indent}  provenance {answer.provenance_id}  trace {answer.trace_id}")
