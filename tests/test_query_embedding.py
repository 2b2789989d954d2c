"""The NumPy MiniLM that `search` embeds queries with gives the vectors of the
sentence-transformers model the stores were built with (so the same hits and scores), and the
commands that use it do not import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import ROOT, SAMPLE


def test_numpy_minilm_matches_the_torch_model():
    from retrieval.embedding import Embedder
    from retrieval.numpy_minilm import NumpyMiniLM

    texts = [json.loads(line)["question"] for line in (SAMPLE / "questions.jsonl").read_text().splitlines() if line]
    texts += ["", "warranty DockStation", "Ünïcödé, CAPITALS and   spaces!", "a long passage " * 200]
    ours, theirs = NumpyMiniLM().encode(texts), Embedder().encode(texts)
    assert ours.shape == theirs.shape == (len(texts), 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_listing_and_searching_stores_imports_no_torch():
    probe = ("import sys; from tunefetch.commands import stores; from retrieval import numpy_minilm, store; "
             "numpy_minilm.NumpyMiniLM().encode(['hello']); print(sorted(m for m in ('torch', 'transformers', "
             "'sentence_transformers', 'pypdf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_the_torch_free_tokenizer_chunks_documents_exactly_as_the_models_own():
    from retrieval.chunking import chunk_document
    from retrieval.documents import load_documents
    from retrieval.embedding import Embedder

    embedder = Embedder()
    docs = load_documents([str(SAMPLE / "docs")]).documents
    for tokens, overlap in ((48, 0), (200, 32)):
        ours = [c for d in docs for c in chunk_document(d, embedder.tokenizer, tokens, overlap)]
        theirs = [c for d in docs for c in chunk_document(d, embedder.model.tokenizer, tokens, overlap)]
        assert ours == theirs and len(ours) > len(docs)


def test_small_batches_skip_torch_only_when_asked_and_give_the_same_vectors():
    from retrieval.embedding import Embedder

    light = Embedder(light_up_to=2)
    pair = light.encode(["first question", "second question"])
    assert "model" not in light.__dict__  # torch never loaded
    batch = light.encode(["first question", "second question", "third"])  # over the limit: the torch model
    assert "model" in light.__dict__ and np.abs(batch[:2] - pair).max() < 1e-5
    assert "model" not in Embedder().__dict__ and Embedder().dim == 384
