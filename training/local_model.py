"""Builds a small Llama-architecture causal LM and its tokenizer, offline and deterministically.

No model hub is reachable here, so tests and the demo use this model; any real model directory
works in its place. The geometry is the smallest vLLM's CPU attention accepts (head size 32)
and the files are the standard Hugging Face layout that transformers, PEFT and vLLM all load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
MODEL_ID = "tiny-llama"


def build_local_model(out_dir: Path, corpus: Iterable[str], *, vocab_size: int = 2048, seed: int = 0) -> Path:
    """Writes tokenizer + random-init weights into `out_dir` (atomically) and returns it.

    The same corpus and seed give byte-identical files, so the model hash is stable.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    try:
        tokenizer = _train_tokenizer(list(corpus), vocab_size)
        tokenizer.save_pretrained(staging)
        _init_model(tokenizer, seed).save_pretrained(staging, safe_serialization=True)
        (staging / "tunefetch_model.json").write_text(
            json.dumps({"id": MODEL_ID, "sha256": directory_hash(staging), "seed": seed}, indent=2)
        )
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|end_of_text|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def _init_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 32: the smallest vLLM's CPU attention takes
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        # Wider than the usual 0.02 so the random model's greedy choices are decisive (top-2
        # logit gaps mostly > 0.05): exactness tests compare greedy tokens across engines.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def directory_hash(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (sorted)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        if file.name == "tunefetch_model.json":
            continue
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: Path) -> dict:
    """{'id', 'sha256'} of a model directory: ours record it, any other is hashed on demand."""
    model_dir = Path(model_dir)
    meta = model_dir / "tunefetch_model.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        return {"id": data["id"], "sha256": data["sha256"]}
    return {"id": model_dir.name, "sha256": directory_hash(model_dir)}
