"""Builds a small Llama-architecture causal LM and its tokenizer, offline and deterministically.

No model hub is reachable here, so tests and the demo use this model; any real model directory
works in its place. The geometry is the smallest vLLM's CPU attention accepts (head size 32)
and the files are the standard Hugging Face layout that transformers, PEFT and vLLM all load.
Built with a passage template it is then pretrained on the reading skill (training/pretrain.py):
it answers from passages and declines without them, and knows no facts of any real domain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import random
from pathlib import Path
from typing import Callable, Iterable

from pydantic import BaseModel, ConfigDict

from training.pretrain import PretrainSpec, Pretraining, RenderContext, conversation_messages, mimetic_init
from training.reading_skill import conversation, level_at

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
MODEL_ID = "tiny-llama"


class ChatFormat:
    """CHAT_TEMPLATE in Python, for rendering many conversations fast (the build checks that it
    renders exactly what the tokenizer's template renders)."""

    generation_prompt = "<|im_start|>assistant\n"

    def __call__(self, messages: list[dict]) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def build_local_model(out_dir: Path, corpus: Iterable[str], *, render_context: RenderContext | None = None,
                      template_version: str | None = None, spec: PretrainSpec = PretrainSpec(),
                      vocab_size: int = 2048, progress: Callable[[int, int, str], None] = lambda d, t, n: None) -> Path:
    """Writes tokenizer + weights into `out_dir` (atomically) and returns it; a model already
    there is reused. With `render_context` (how passages enter a chat: the serving template,
    `template_version` its name) the weights are pretrained on the reading skill, else random.

    The same inputs give the same files on the same machine, so the model hash is stable there.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    try:
        corpus = list(corpus)
        if render_context is not None:  # the tokenizer also learns the synthetic worlds' words
            corpus += _synthetic_sample(render_context, spec.seed)
        tokenizer = _train_tokenizer(corpus, vocab_size)
        tokenizer.save_pretrained(staging)
        model = _init_model(tokenizer, spec.seed)
        record: dict = {"id": MODEL_ID, "seed": spec.seed}
        if render_context is not None:
            _check_chat_format(tokenizer, render_context)
            report = Pretraining(model, tokenizer, ChatFormat(), render_context, spec, progress).run()
            record["pretraining"] = {"template": template_version, "steps": report.steps,
                                     "batch_size": spec.batch_size, "seconds": round(report.seconds, 1),
                                     "tokens_per_s": round(report.tokens_per_s), "final_loss": round(report.final_loss, 4),
                                     "synthetic_exact_match": report.exact_match, "curve": report.curve}
        model.save_pretrained(staging, safe_serialization=True)
        record["sha256"] = directory_hash(staging)
        (staging / "tunefetch_model.json").write_text(json.dumps(record, indent=2))
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def build_record(model_dir: Path) -> dict:
    """What the build recorded (tunefetch_model.json): id, hash, pretraining numbers."""
    return json.loads((Path(model_dir) / "tunefetch_model.json").read_text())


def _synthetic_sample(render_context: RenderContext, seed: int, count: int = 3000) -> list[str]:
    rng = random.Random(seed + 1)
    render = ChatFormat()
    return [render(conversation_messages(*conversation(rng, level_at(i / count)), render_context)) for i in range(count)]


def _check_chat_format(tokenizer, render_context: RenderContext) -> None:
    rng = random.Random(0)
    for i in range(5):
        messages = conversation_messages(*conversation(rng, level_at(i / 5)), render_context)
        if tokenizer.apply_chat_template(messages, tokenize=False) != ChatFormat()(messages):
            raise RuntimeError("ChatFormat no longer renders what CHAT_TEMPLATE renders")


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
        initializer_range=0.02,
        # Tied: copying a token from the context is then the same direction in and out.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    mimetic_init(model)
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


class ModelIdentity(BaseModel):
    """Which base model: its id (served model name) and the sha256 of its files."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    id: str
    sha256: str
    path: str | None = None


def model_identity(model_dir: Path) -> ModelIdentity:
    """The identity of a model directory: ours record it, any other is hashed on demand."""
    model_dir = Path(model_dir)
    meta = model_dir / "tunefetch_model.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        return ModelIdentity(id=data["id"], sha256=data["sha256"], path=str(model_dir))
    return ModelIdentity(id=model_dir.name, sha256=directory_hash(model_dir), path=str(model_dir))
