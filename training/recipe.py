"""The LoRA fine-tuning recipe that runs on every Ray Train worker, read top to bottom:
setup (tokenizer, data, model + LoRA, DeepSpeed engine) -> train loop (with eval) -> save.

DeepSpeed reuses the gloo/NCCL process group Ray Train created; the same code runs on CPU
workers (fp32, gloo) and GPU workers (bf16, NCCL) by config alone.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

from cluster.runtime import PROGRESS_MARKER
from training.config import TrainConfig
from training.datasets import IGNORE_INDEX, collate, read_rows, tokenize

_CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's sub-directory inside each Ray checkpoint


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: `loop_config` holds the TrainConfig and the base model path."""
    LoraFinetuneRecipe(TrainConfig.model_validate(loop_config["train"]), loop_config["base_model"]).run()


class LoraFinetuneRecipe:
    def __init__(self, config: TrainConfig, base_model: str):
        import ray.train

        self.config = config
        self.base_model = base_model
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def run(self) -> None:
        self.setup()
        metrics = self.train()
        self.save(metrics)

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        import torch
        from transformers import AutoTokenizer

        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.config.scaling.use_gpu else "gloo",
                                   dist_init_required=False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        self.train_examples, self.eval_examples = self._load_examples()
        self.steps_per_epoch = max(1, self._micro_batches_per_epoch() // self.config.gradient_accumulation)
        self.total_steps = self.config.max_steps or self.steps_per_epoch * self.config.epochs
        self.engine = self._build_engine()

    def _load_examples(self):
        rows = [r for spec in self.config.datasets for r in read_rows(spec.path, spec.format)]
        tokenized = [tokenize(r, self.tokenizer, self.config.max_seq_length) for r in rows]
        # A row whose answer starts past max_seq_length has nothing to learn from; its loss would
        # be NaN and poison the run's metrics, so it is left out, and the run says how many.
        examples = [e for e in tokenized if any(label != IGNORE_INDEX for label in e.labels)]
        if not examples:
            raise ValueError(f"every answer starts after max_seq_length {self.config.max_seq_length}: raise it")
        if len(examples) < len(tokenized) and self.rank == 0:
            print(f"{PROGRESS_MARKER} {len(tokenized) - len(examples)} of {len(tokenized)} rows left out: their "
                  f"answer starts after max_seq_length {self.config.max_seq_length}", flush=True)
        random.Random(self.config.seed).shuffle(examples)  # same split on every worker
        n_eval = int(len(examples) * self.config.eval.split)
        return examples[n_eval:], examples[:n_eval]

    def _build_engine(self):
        import deepspeed
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=dtype)
        lora = self.config.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, task_type="CAUSAL_LM",
        ))
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(self.config),
            lr_scheduler=self._scheduler,
        )
        return engine

    def _scheduler(self, optimizer):
        from transformers import get_scheduler

        schedule = self.config.schedule
        return get_scheduler(schedule.type, optimizer, num_warmup_steps=schedule.warmup_steps,
                             num_training_steps=self.total_steps)

    # -- train ------------------------------------------------------------------------------
    def _micro_batches_per_epoch(self) -> int:
        """The same on every worker: ranks that ran a different number of steps would wait on
        each other's collectives forever (a remainder row is dropped for the epoch instead)."""
        return max(1, len(self.train_examples) // self.world_size // self.config.batch_size)

    def _batches(self, examples, epoch: int):
        """This worker's micro-batches: a seeded shuffle per epoch, strided over workers."""
        order = list(range(len(examples)))
        random.Random(self.config.seed + epoch).shuffle(order)
        mine = order[self.rank::self.world_size]
        size = self.config.batch_size
        for i in range(self._micro_batches_per_epoch()):
            yield collate([examples[j] for j in mine[i * size:(i + 1) * size] or mine[:size]],
                          self.tokenizer.pad_token_id)

    def train(self) -> dict:
        c = self.config
        start_step = self._restore()
        step, tokens, started, seen = start_step, 0, time.perf_counter(), 0
        losses: list[float] = []
        self.engine.train()
        for epoch in range(math.ceil(self.total_steps / max(1, self.steps_per_epoch))):
            for batch in self._batches(self.train_examples, epoch):
                seen += 1
                if seen <= start_step * c.gradient_accumulation:
                    continue  # replay the seeded data order up to the checkpoint
                loss = self.engine(**batch).loss
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.backward(loss)
                self.engine.step()
                tokens += int(batch["attention_mask"].sum())
                if not boundary:
                    continue
                step += 1
                losses.append(float(loss.detach()))
                if step % c.log_every_steps == 0 and step < self.total_steps:
                    self._log_step(step, losses[-1], tokens * self.world_size / (time.perf_counter() - started))
                if c.eval.every_steps and step % c.eval.every_steps == 0:
                    self._log_eval(step)
                if c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0 and step < self.total_steps:
                    self._checkpoint(step, losses[-1])
                if step >= self.total_steps:
                    break
            if step >= self.total_steps:
                break
        elapsed = time.perf_counter() - started
        if self.rank == 0 and losses:  # the final step's line; its metrics go out with the adapter
            print(f"{PROGRESS_MARKER} step {step}/{self.total_steps} loss {losses[-1]:.4f}", flush=True)
        metrics = {"train_loss": losses[-1] if losses else float("nan"), "steps": step, "resumed_from_step": start_step,
                   "train_tokens_per_s": tokens * self.world_size / elapsed, "train_seconds": elapsed,
                   "optimizer_offloaded": self._optimizer_offloaded()}
        eval_loss = self.evaluate()
        if eval_loss is not None:
            metrics["eval_loss"] = eval_loss
        return metrics

    def _log_step(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Reports the step's loss to Ray Train (every rank must report) and shows it to the user
        (rank 0's marked line reaches the CLI through Ray's log forwarding)."""
        import ray.train

        lr = self.engine.get_lr()[0]
        ray.train.report({"step": step, "train_loss": loss, "lr": lr, "train_tokens_per_s": tokens_per_s})
        if self.rank == 0:
            print(f"{PROGRESS_MARKER} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
                  f"tokens/s {tokens_per_s:.0f}", flush=True)

    def _optimizer_offloaded(self) -> bool:
        """Whether DeepSpeed really holds the optimizer states in host memory (what it did, not
        what was asked: ZeRO-1/2 call it cpu_offload, ZeRO-3 offload_optimizer)."""
        optimizer = self.engine.optimizer
        return bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))

    # -- checkpoints (fault tolerance) -------------------------------------------------------
    def _checkpoint(self, step: int, loss: float) -> None:
        """Every rank saves its ZeRO shard of the optimizer (and rank 0 the trainable weights);
        Ray Train gathers the ranks' files into one checkpoint in the run's storage."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=_CHECKPOINT_TAG, client_state={"step": step},
                                        exclude_frozen_parameters=True)
            ray.train.report({"step": step, "train_loss": loss}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.rank == 0:
            print(f"{PROGRESS_MARKER} checkpoint at step {step}", flush=True)

    def _restore(self) -> int:
        """After a worker failure Ray Train restarts the group; continue from the last checkpoint."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as path:
            if not (Path(path) / _CHECKPOINT_TAG).is_dir():
                return 0  # the final adapter checkpoint of a finished run: nothing to resume
            _, state = self.engine.load_checkpoint(path, tag=_CHECKPOINT_TAG, load_module_strict=False)
        if self.rank == 0:
            print(f"{PROGRESS_MARKER} resumed from step {state['step']}", flush=True)
        return int(state["step"])

    def _log_eval(self, step: int) -> None:
        loss = self.evaluate()
        if loss is not None and self.rank == 0:
            print(f"{PROGRESS_MARKER} step {step} eval_loss {loss:.4f}", flush=True)

    def evaluate(self) -> float | None:
        """Mean eval loss over the held-out split, averaged across workers."""
        import torch
        import torch.distributed as dist

        if not self.eval_examples:
            return None
        self.engine.eval()
        total = torch.zeros(2)
        n = len(self.eval_examples)
        with torch.no_grad():
            # The same number of forward passes on every rank: under ZeRO-3 each one gathers
            # parameters from all ranks, so a rank with one more example would wait forever.
            # Ranks past the end repeat example 0 and do not count it.
            for i in range(self.rank, math.ceil(n / self.world_size) * self.world_size, self.world_size):
                batch = collate([self.eval_examples[i if i < n else 0]], self.tokenizer.pad_token_id)
                loss = float(self.engine(**batch).loss)
                if i < n:
                    total += torch.tensor([loss, 1.0])
        dist.all_reduce(total)
        self.engine.train()
        return float(total[0] / total[1])

    # -- save -------------------------------------------------------------------------------
    def save(self, metrics: dict) -> None:
        """Gathers the LoRA weights (sharded under ZeRO-3) and reports them as the checkpoint."""
        import deepspeed
        import ray.train
        import torch.distributed as dist

        model = self.engine.module
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        with tempfile.TemporaryDirectory() as tmp:
            # Every rank must enter: gathering is a collective. Without it ZeRO-3 saves empty tensors.
            with deepspeed.zero.GatheredParameters(lora_params, enabled=self.config.deepspeed.zero_stage == 3):
                if self.rank == 0:
                    model.save_pretrained(tmp, safe_serialization=True)
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)
        dist.barrier()


def deepspeed_config(c: TrainConfig) -> dict:
    """The DeepSpeed config of a run: ZeRO stage and offload, precision, optimizer, batch."""
    zero: dict = {"stage": c.deepspeed.zero_stage}
    if c.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = c.deepspeed.stage3_param_persistence_threshold
    if c.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": c.batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation,
        # torch_adam on CPU workers: DeepSpeed's FusedAdam would JIT-compile (~50 s) and is CUDA-only.
        "optimizer": {"type": "AdamW", "params": {
            "lr": c.optimizer.lr, "betas": list(c.optimizer.betas),
            "weight_decay": c.optimizer.weight_decay, "torch_adam": not c.scaling.use_gpu}},
        "gradient_clipping": c.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": c.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
