"""Training benchmark: the Ray Train + DeepSpeed LoRA path vs a plain single-process
transformers + peft loop, same model, data, LoRA and optimizer settings, one run, one machine.

    .venv/bin/python bench/training_bench.py [--steps 200] [--out FILE]

Reports steady-state training tokens/s of both (the Ray path's train loop, the plain loop after
3 warm-up steps) and, separately, the Ray path's fixed costs: Ray start, the job around its train
loop (worker group, DeepSpeed init, model load, checkpoint, registry) and Ray shutdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)

SAMPLE = ROOT / "examples" / "sample_domain"
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH, LR, MAX_LEN = 4, 1e-3, 256


def plain_loop(model_dir: Path, steps: int) -> dict:
    """transformers + peft + torch AdamW in this process; tokens/s after 3 warm-up steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.datasets import collate, read_rows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = read_rows(SAMPLE / "adapter_qa.jsonl", "auto")
    examples = [tokenize(r, tokenizer, MAX_LEN) for r in rows]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    tokens, started = 0, None
    for step in range(steps):
        if step == 3:
            tokens, started = 0, time.perf_counter()
        batch = collate([examples[(step * BATCH + i) % len(examples)] for i in range(BATCH)], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - started), "steps": steps}


def ray_deepspeed(home: Path, steps: int) -> dict:
    from cluster.config import load_config
    from cluster.runtime import configure_process, ray_runtime
    from training.config import TrainConfig
    from training.job import run_training

    config = load_config(home=home)
    train = TrainConfig.model_validate({
        "name": "bench", "datasets": [{"path": str(SAMPLE / "adapter_qa.jsonl")}],
        "max_seq_length": MAX_LEN, "lora": LORA, "optimizer": {"lr": LR}, "schedule": {"type": "constant"},
        "max_steps": steps, "batch_size": BATCH, "log_every_steps": 10, "eval": {"split": 0.0},
        "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 2},
    })
    configure_process(config)
    started = time.perf_counter()
    with ray_runtime(config):
        ray_up = time.perf_counter()
        version = run_training(train, config, progress=lambda _: None)
        job_s = time.perf_counter() - ray_up
    metrics = version.record.metrics
    return {"tokens_per_s": metrics["train_tokens_per_s"], "steps": metrics["steps"],
            "train_loop_s": metrics["train_seconds"], "ray_start_s": ray_up - started,
            "job_s": job_s, "job_overhead_s": job_s - metrics["train_seconds"],
            "ray_shutdown_s": time.perf_counter() - started - (ray_up - started) - job_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from cluster.config import load_config
    from tunefetch.stack import ensure_local_model

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model_dir = ensure_local_model(load_config(home=home))
        plain = plain_loop(model_dir, args.steps)
        ours = ray_deepspeed(home, args.steps)
    report = {"plain_transformers_peft": plain, "ray_train_deepspeed_zero2_2_workers": ours,
              "tokens_per_s_ratio": ours["tokens_per_s"] / plain["tokens_per_s"]}
    emit(report, args.out)


if __name__ == "__main__":
    main()
