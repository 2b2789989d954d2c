"""Pretraining the local model on the reading skill (training/reading_skill.py): a plain torch
loop on the CPU, read top to bottom.

Why not Ray Train + DeepSpeed as for adapters: this runs once per home, before anything else
exists, on a sub-million-parameter model where one process with bf16 autocast keeps both cores
busy; the measured numbers are in the README. Deterministic for a given seed and machine: a
fixed number of steps, seeded data and initialisation.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from training.reading_skill import conversation, level_at

RenderContext = Callable[[list[dict], list[str]], list[dict]]  # (messages, passages) -> messages


@dataclass(frozen=True)
class PretrainSpec:
    steps: int = 2600
    batch_size: int = 16
    lr: float = 8e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 300  # steps between evaluations on held-out synthetic questions (the curve)
    eval_questions: int = 200


@dataclass
class PretrainReport:
    steps: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    final_loss: float = float("nan")
    exact_match: float = 0.0  # greedy answers (value and citation) on held-out synthetic questions
    curve: list[dict] = field(default_factory=list)  # [{"step", "seconds", "exact_match"}]


def conversation_messages(passages: list[str] | None, qa: list[tuple[str, str]],
                          render_context: RenderContext) -> list[dict]:
    messages: list[dict] = []
    for question, answer in qa:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return render_context(messages, passages) if passages is not None else messages


class Pretraining:
    def __init__(self, model, tokenizer, render_chat: Callable[[list[dict]], str], render_context: RenderContext,
                 spec: PretrainSpec, progress: Callable[[int, int, str], None] = lambda done, total, note: None):
        import torch

        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.render_chat, self.render_context, self.progress = render_chat, render_context, progress
        self.rng = random.Random(spec.seed)
        self.pad = tokenizer.pad_token_id
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                                           betas=(0.9, 0.98))
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=_cpu_bf16())
        self.eval_set = self._held_out()
        self._queue: list[list[tuple[list[int], int]]] = []

    def run(self) -> PretrainReport:
        import torch

        report = PretrainReport()
        started, tokens, losses = time.perf_counter(), 0, []
        self.model.train()
        for step in range(self.spec.steps):
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(step)
            ids, labels = self._batch(step / self.spec.steps)
            with self.autocast:
                loss = self.model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += int((labels != -100).sum())
            losses.append(float(loss.detach()))
            done = step + 1
            if done % self.spec.eval_every == 0 or done == self.spec.steps:
                report.curve.append({"step": done, "seconds": round(time.perf_counter() - started, 1),
                                     "exact_match": self.exact_match()})
            self.progress(done, self.spec.steps, f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
        report.steps, report.seconds = self.spec.steps, time.perf_counter() - started
        report.tokens_per_s, report.final_loss = tokens / report.seconds, sum(losses[-50:]) / len(losses[-50:])
        report.exact_match = report.curve[-1]["exact_match"]
        return report

    def _lr(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth."""
        warm = min(1.0, (step + 1) / self.spec.warmup_steps)
        progress = step / max(1, self.spec.steps)
        return self.spec.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _batch(self, progress: float):
        """Conversations of similar length (little padding), right-padded: a causal model never
        looks past its own tokens, so no attention mask is needed; pads carry no loss."""
        import torch

        if not self._queue:
            level = level_at(progress)
            encoded = sorted((self._encode(conversation(self.rng, level)) for _ in range(self.spec.batch_size * 16)),
                             key=lambda example: len(example[0]))
            self._queue = [encoded[i:i + self.spec.batch_size] for i in range(0, len(encoded), self.spec.batch_size)]
            self.rng.shuffle(self._queue)
        batch = self._queue.pop()
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (row, learn_from) in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, learn_from:len(row)] = ids[i, learn_from:len(row)]
        return ids, labels

    def _encode(self, example) -> tuple[list[int], int]:
        """(token ids, where the loss starts). The loss covers the whole conversation: predicting
        the passages' repeated names is what first teaches the model to copy."""
        messages = conversation_messages(*example, self.render_context)
        return self.tokenizer(self.render_chat(messages), add_special_tokens=False)["input_ids"], 0

    def _held_out(self) -> list[tuple[list[int], int]]:
        """Single-question conversations at the final level: (ids, where the answer starts)."""
        rng = random.Random(self.spec.seed + 10_000)
        level = level_at(1.0)
        held = []
        while len(held) < self.spec.eval_questions:
            passages, qa = conversation(rng, level)
            messages = conversation_messages(passages, qa[:1], self.render_context)
            prompt = self.tokenizer(self.render_chat(messages[:-1]) + self.render_chat.generation_prompt,
                                    add_special_tokens=False)["input_ids"]
            full = self.tokenizer(self.render_chat(messages), add_special_tokens=False)["input_ids"]
            held.append((full, len(prompt)))
        return held

    def exact_match(self) -> float:
        """Share of held-out answers whose every token is the model's greedy choice (teacher
        forcing with all-correct tokens is exactly greedy decoding), through the end of turn."""
        import torch

        self.model.eval()
        right = 0
        with torch.no_grad(), self.autocast:
            for start in range(0, len(self.eval_set), 50):
                chunk = self.eval_set[start:start + 50]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
                for i, (row, _) in enumerate(chunk):
                    ids[i, :len(row)] = torch.tensor(row)
                predicted = self.model(input_ids=ids).logits.argmax(-1)
                for i, (row, answer_start) in enumerate(chunk):
                    end = row.index(self.tokenizer.eos_token_id, answer_start) + 1
                    target = torch.tensor(row[answer_start:end])
                    right += bool(torch.equal(predicted[i, answer_start - 1:end - 1], target))
        self.model.train()
        return right / len(self.eval_set)


def _cpu_bf16() -> bool:
    """bf16 autocast only where the CPU computes in bf16 natively (AVX-512 BF16 / AMX)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def mimetic_init(model) -> None:
    """Mimetic initialisation of attention (Trockman & Kolter, 2023): each query/key pair starts
    as the same orthonormal projection (attention prefers similar tokens) and value/output as a
    scaled copy of it, the shape trained attention takes; copying tasks train far faster from it."""
    import torch

    config = model.config
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim, group = hidden // heads, heads // kv_heads
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for kv in range(kv_heads):
                qk = torch.linalg.qr(torch.randn(hidden, head_dim, generator=generator))[0].T
                vo = torch.linalg.qr(torch.randn(hidden, head_dim, generator=generator))[0].T
                first = kv * group
                attention.q_proj.weight[first * head_dim:(first + 1) * head_dim] = qk
                attention.k_proj.weight[kv * head_dim:(kv + 1) * head_dim] = qk
                attention.v_proj.weight[kv * head_dim:(kv + 1) * head_dim] = vo
                for head in range(first, first + group):
                    attention.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0.5 * vo.T / group
