"""The bundled sample domain: Kestrel Robotics, a fictional warehouse-robot maker.

Its documents become the demo's knowledge store; its facts (one statement each in a document,
with question phrasings, a held-out phrasing and an update) drive the adapter's training data
and `tunefetch eval compare`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "examples" / "sample_domain"
DOCS = ROOT / "docs"
FACTS = ROOT / "facts.jsonl"
QUESTIONS = ROOT / "questions.jsonl"  # retrieval qrels: question -> the documents that answer it
ADAPTER_DATASET = ROOT / "adapter_qa.jsonl"  # generated from FACTS by adapter_dataset(); do not edit
TRAIN_CONFIG = ROOT.parent / "train.yaml"
KB = "kestrel"
# Sentence-window chunks: a passage of one or two sentences is what a small reader copes with
# (and what a fact lookup needs); a real model reads larger chunks just as well.
CHUNK_TOKENS, CHUNK_OVERLAP = 48, 0
TOP_K = 1  # one sentence-window passage per question: the retriever finds it (recall@1 1.0 here)
ADAPTER = "support"


def facts():
    from evaluation.facts import load_facts

    return load_facts(FACTS)


def adapter_rows() -> list[dict]:
    """The demo adapter's training rows, built from the facts and documents (evaluation.facts)."""
    from evaluation.facts import adapter_rows as rows
    from serving.prompts import CHAT_CONTEXT

    return rows(facts(), DOCS, CHAT_CONTEXT.chat)


if __name__ == "__main__":  # python -m tunefetch.sample_domain: regenerate ADAPTER_DATASET
    from evaluation.facts import write_jsonl

    print(write_jsonl(adapter_rows(), ADAPTER_DATASET))
