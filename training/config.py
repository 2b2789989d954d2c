"""The typed config of one LoRA fine-tuning run (a YAML file; examples/train.yaml)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.config import describe_validation_error, read_yaml
from cluster.errors import UserError

ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Section):
    path: Path
    format: Literal["auto", "instruction", "chat"] = Field(
        "auto", description="instruction: {instruction, input, output}; chat: {messages: [...]}; auto: per row."
    )


class LoraSpec(_Section):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class OptimizerSpec(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)


class ScheduleSpec(_Section):
    type: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)


class DeepSpeedSpec(_Section):
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    # Parameters smaller than this stay unsharded under ZeRO-3; 0 shards everything (tests).
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)


class ScalingSpec(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class EvalSpec(_Section):
    split: float = Field(0.1, ge=0.0, lt=0.5, description="Fraction of rows held out for eval loss.")
    every_steps: int = Field(0, ge=0, description="Eval cadence; 0 evaluates at the end only.")


class TrainConfig(_Section):
    name: str = Field(..., description="Adapter name in the registry; each run adds NAME@vN.")
    base_model: str | None = Field(None, description="Base model directory; empty uses the home's local model.")
    datasets: list[DatasetSpec] = Field(..., min_length=1)
    max_seq_length: int = Field(512, ge=16)
    lora: LoraSpec = LoraSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Micro-batch per worker.")
    gradient_accumulation: int = Field(1, ge=1)
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    precision: Literal["fp32", "bf16"] = "fp32"
    scaling: ScalingSpec = ScalingSpec()
    eval: EvalSpec = EvalSpec()
    log_every_steps: int = Field(1, ge=1)
    checkpoint_every_steps: int = Field(0, ge=0, description="Resumable checkpoint cadence; 0: only the final adapter.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts (resuming from the last checkpoint).")
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _adapter_name(cls, v: str) -> str:
        if not ADAPTER_NAME.match(v):
            raise ValueError("use lowercase letters, digits, '-' and '_' (max 63), starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _bf16_needs_gpu(self) -> "TrainConfig":
        if self.precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("precision bf16 needs scaling.use_gpu: true (CPU workers train in fp32)")
        return self


def load_train_config(path: Path) -> TrainConfig:
    """Validates a train YAML; relative dataset paths resolve against the file's directory."""
    path = Path(path)
    data = read_yaml(path)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None
    for spec in config.datasets:
        if not spec.path.is_absolute():
            spec.path = (path.parent / spec.path).resolve()
        if not spec.path.is_file():
            raise UserError(f"{path}: datasets: file not found: {spec.path}")
    return config


def stage_train_config(path: Path, train: TrainConfig, stage_dir: Path) -> Path:
    """Copies the train YAML and its datasets into `stage_dir` (a job's upload), dataset paths
    rewritten relative to the YAML; returns the staged YAML. The user's own keys are kept as
    written (not every default), so the job validates the same input."""
    data = read_yaml(path)
    for i, (raw, spec) in enumerate(zip(data["datasets"], train.datasets)):
        # One folder per entry keeps the file name (errors name the user's file) without clashes.
        target = stage_dir / "datasets" / str(i) / spec.path.name
        target.parent.mkdir(parents=True)
        shutil.copy2(spec.path, target)
        raw["path"] = target.relative_to(stage_dir).as_posix()
    staged = stage_dir / Path(path).name
    staged.write_text(yaml.safe_dump(data, sort_keys=False))
    return staged
