"""The local stack a command stands up and tears down: Ray, the Milvus endpoint, the knowledge
stores, the served application. Each piece is a context manager that stops only what it started."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from cluster.config import TunefetchConfig


@contextmanager
def knowledge_stores(config: TunefetchConfig) -> Iterator["KnowledgeStores"]:  # noqa: F821
    from retrieval.milvus_endpoint import milvus_endpoint
    from retrieval.store import KnowledgeStores

    with milvus_endpoint(config) as address:
        yield KnowledgeStores(address)


@contextmanager
def served_app(config: TunefetchConfig) -> Iterator[str]:
    """Ray (local or `ray.address`) + Milvus + the Serve app; yields the app's base URL and
    shuts the app down on exit."""
    from ray import serve

    from cluster.runtime import ray_runtime
    from retrieval.milvus_endpoint import milvus_endpoint
    from serving.app import run_app

    with ray_runtime(config), milvus_endpoint(config) as milvus:
        url = run_app(config, milvus)
        try:
            yield url
        finally:
            serve.shutdown()


def ensure_local_model(config: TunefetchConfig, console=None) -> Path:
    """The home's local model, built once (~minutes) and reused: a tokenizer that knows the
    sample domain's words, weights pretrained to read passages laid out by the serving
    template (serving/prompts.py), so what it learned is what the gateway will show it."""
    from serving.prompts import CHAT_CONTEXT
    from training.local_model import build_local_model
    from tunefetch import sample_domain

    path = config.paths.local_model
    if (path / "config.json").exists():
        return path
    corpus = [p.read_text() for p in sorted(sample_domain.DOCS.glob("*.md"))]
    bar = console.progress("pretrain the reading skill", total=None) if console else nullcontext(lambda *a: None)
    with bar as update:
        return build_local_model(path, corpus, render_context=CHAT_CONTEXT.chat, template_version=CHAT_CONTEXT.version,
                                 progress=update)
