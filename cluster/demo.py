"""The main job: the whole tune-and-fetch pipeline on the sample domain, end to end.

local model -> ingest the sample knowledge base -> LoRA fine-tune (Ray Train + DeepSpeed) ->
serve base + adapter + store (Ray Serve + vLLM) -> ask through the HTTP API -> shut down.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from cluster.config import TunefetchConfig
from cluster.errors import UserError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SAMPLE_DOMAIN = EXAMPLES / "sample_domain"
DEMO_KB = "kestrel"


def sample_questions(limit: int) -> list[dict]:
    lines = (SAMPLE_DOMAIN / "questions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:limit]


def ensure_local_model(config: TunefetchConfig) -> Path:
    """Builds the home's local model (tokenizer trained on the sample domain) if missing."""
    from training.local_model import build_local_model

    corpus = [p.read_text() for p in sorted((SAMPLE_DOMAIN / "docs").glob("*.md"))]
    corpus += [(SAMPLE_DOMAIN / name).read_text() for name in ("train.jsonl", "train_chat.jsonl")]
    return build_local_model(config.paths.local_model, corpus)


def run_demo(config: TunefetchConfig, progress: Callable[[str], None] = print) -> int:
    from ray import serve

    from cluster.client import TunefetchClient
    from cluster.commands import print_answer
    from cluster.runtime import ray_runtime
    from cluster.telemetry import setup_tracing, shutdown_tracing
    from retrieval.embedding import Embedder
    from retrieval.ingest import ingest
    from retrieval.milvus_endpoint import milvus_endpoint
    from retrieval.store import KnowledgeStores
    from serving.app import run_app
    from training.config import load_train_config
    from training.job import run_training

    if not SAMPLE_DOMAIN.is_dir():
        raise UserError(f"sample domain not found at {SAMPLE_DOMAIN} (run the demo from a tunefetch checkout)")
    started = time.perf_counter()
    step = _stepper(progress, started)
    setup_tracing(config.telemetry, "demo")
    progress(f"tunefetch demo: state in {config.home}")
    try:
        with step("1/5 local model"):
            model_dir = ensure_local_model(config)
            progress(f"    {model_dir}")
        with ray_runtime(config), milvus_endpoint(config) as milvus:
            with step("2/5 ingest the sample knowledge base into Milvus"):
                result = ingest([str(SAMPLE_DOMAIN / "docs")], DEMO_KB, KnowledgeStores(milvus), Embedder(),
                                config.retrieval, progress=lambda m: progress(f"    {m}"))
                progress(f"    {DEMO_KB}@v{result.version.version}: {result.documents} documents, {result.chunks} chunks")
            with step("3/5 fine-tune a LoRA adapter (Ray Train + DeepSpeed ZeRO-2, 2 workers)"):
                adapter = run_training(load_train_config(EXAMPLES / "train.yaml"), config,
                                       progress=lambda m: progress(f"    {m}"))
                progress(f"    registered {adapter.ref} (hash {adapter.content_hash[:12]})")
            with step("4/5 serve base model + adapters + store (Ray Serve + vLLM)"):
                url = run_app(config, milvus)
                progress(f"    {url}")
            try:
                with step("5/5 ask through the HTTP API"):
                    _ask(TunefetchClient(url), adapter.ref, progress, print_answer)
            finally:
                serve.shutdown()
    finally:
        shutdown_tracing()
    progress(f"done in {time.perf_counter() - started:.0f} s. Next: `tunefetch serve`, then in another shell "
             f"`tunefetch query \"...\" --model support --kb {DEMO_KB}`")
    return 0


def _ask(client, adapter_ref: str, progress, print_answer) -> None:
    base = next(m["id"] for m in client.models() if m["parent"] is None)
    questions = sample_questions(2)
    for question in questions:
        progress(f"  Q: {question['question']}   (expected: {question['answer']}; docs {', '.join(question['doc_ids'])})")
        for label, model, kb in (("base", base, None), ("adapter", adapter_ref, None),
                                 ("adapter + retrieval", adapter_ref, DEMO_KB)):
            progress(f"  -- {label}")
            print_answer(client.chat(question["question"], model, kb=kb, max_tokens=32))


def _stepper(progress, started: float):
    @contextmanager
    def step(title: str):
        progress(f"==> {title}")
        t0 = time.perf_counter()
        yield
        progress(f"    ({time.perf_counter() - t0:.1f} s, {time.perf_counter() - started:.0f} s total)")

    return step
