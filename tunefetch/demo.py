"""The main job: the whole tune-and-fetch pipeline on the sample domain, end to end.

local model -> ingest the sample knowledge base -> LoRA fine-tune (Ray Train + DeepSpeed) ->
serve base + adapter + store (Ray Serve + vLLM) -> ask the four ways through the HTTP API.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch import sample_domain
from tunefetch.console import Console

# The four ways to answer, as `tunefetch eval compare` measures them: (label, adapter?, store?).
MODES = (("base", False, False), ("rag", False, True), ("adapter", True, False), ("hybrid", True, True))
_QUESTIONS = 3


def run_demo(config: TunefetchConfig, console: Console) -> int:
    from retrieval.embedding import Embedder
    from retrieval.ingest import ingest
    from tunefetch.client import Client
    from tunefetch.commands.serving import show_answer
    from tunefetch.commands.training import run_training_job
    from tunefetch.stack import ensure_local_model, knowledge_stores, served_app
    from training.config import load_train_config

    if not sample_domain.DOCS.is_dir():
        raise UserError(f"sample domain not found at {sample_domain.ROOT} (run the demo from a tunefetch checkout)")
    started = time.perf_counter()
    console.info(f"tunefetch demo: state in {config.home}")
    with console.captured(config.paths.logs, "demo"):
        if console.log_path:
            console.info(f"framework output goes to {console.log_path}")
        with console.stage("1/5 local model: a small Llama that reads passages but knows no Kestrel facts", started):
            console.note(str(ensure_local_model(config, console)))
        with knowledge_stores(config) as stores:
            with console.stage("2/5 ingest the sample knowledge base into Milvus", started), \
                    console.progress("chunks") as update:
                settings = config.retrieval.model_copy(update={"chunk_tokens": sample_domain.CHUNK_TOKENS,
                                                                "chunk_overlap": sample_domain.CHUNK_OVERLAP})
                result = ingest([str(sample_domain.DOCS)], sample_domain.KB, stores, Embedder(), settings,
                                on_chunks=update)
            console.note(f"{result.version.ref}: {result.documents} documents, {result.chunks} chunks")
        with console.stage("3/5 fine-tune a LoRA adapter on the Kestrel Q&A (Ray Train + DeepSpeed ZeRO-2)", started):
            adapter = run_training_job(load_train_config(sample_domain.TRAIN_CONFIG), config, console)
            console.note(f"registered {adapter.ref} (hash {adapter.content_hash[:12]})")
        with ExitStack() as app:
            with console.stage("4/5 serve base model + adapters + store (Ray Serve + vLLM)", started):
                url = app.enter_context(served_app(config))
                console.note(url)
            with console.stage("5/5 ask through the HTTP API: base, rag, adapter, hybrid", started):
                client = Client.for_config(config, url)
                base = client.base_model()
                for fact in sample_domain.facts()[:_QUESTIONS]:
                    console.result(f"\nQ: {fact.eval_question}   (expected: {fact.answer}; in {fact.doc_id})")
                    for label, tuned, grounded in MODES:
                        answer = client.chat(fact.eval_question, adapter.ref if tuned else base,
                                             kb=sample_domain.KB if grounded else None, top_k=sample_domain.TOP_K,
                                             max_tokens=24)
                        show_answer(console, answer, indent=f"  {label:<8}")
    console.info(f"done in {time.perf_counter() - started:.0f} s. Next: `tunefetch serve`, then in another shell "
                 f"`tunefetch query \"{sample_domain.facts()[0].eval_question}\" --model support --kb {sample_domain.KB}`"
                 f", or `tunefetch eval compare` for the numbers")
    return 0
