"""Driver side of a training run: Ray Train TorchTrainer -> adapter registry."""

from __future__ import annotations

import getpass
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from cluster.telemetry import trace_id_of, tracer
from training.config import TrainConfig
from training.datasets import dataset_fingerprint, read_rows
from training.local_model import model_identity
from training.recipe import train_loop_per_worker
from training.registry import AdapterVersion, DatasetLineage, TrainingLineage, open_registry, redacted


def check_inputs(train: TrainConfig, config: TunefetchConfig) -> tuple[Path, int]:
    """Validates every dataset row, the base model and the registry before any cluster work;
    (model, rows). An unreachable registry fails now, not after hours of training."""
    rows = sum(len(read_rows(spec.path, spec.format)) for spec in train.datasets)
    base_model = Path(train.base_model or config.paths.local_model)
    if not (base_model / "config.json").is_file():
        raise UserError(f"base model not found: {base_model} (run `tunefetch demo` or set base_model)")
    registry = open_registry(config.registry_settings())
    try:
        registry.versions(train.name)
    except OSError as exc:
        raise UserError(redacted(f"registry.uri: cannot read {registry.uri}: {str(exc).splitlines()[0]}")) from None
    return base_model, rows


def cluster_settings(train: TrainConfig):
    """Ray Train's ScalingConfig and TorchConfig of a run: N workers with their CPUs (and GPUs),
    NCCL between GPU workers, gloo between CPU workers."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    scaling = train.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    return (ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
            TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"))


def run_training(train: TrainConfig, config: TunefetchConfig,
                 progress: Callable[[str], None] = print) -> AdapterVersion:
    """Runs one fine-tuning job on the current Ray cluster and registers its adapter."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    base_model, rows = check_inputs(train, config)
    run_id = f"{train.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    scaling = train.scaling
    scaling_config, torch_config = cluster_settings(train)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": train.model_dump(mode="json"), "base_model": str(base_model)},
        scaling_config=scaling_config,
        torch_config=torch_config,
        run_config=RunConfig(
            name=run_id,
            storage_path=config.ray.storage_path or str(config.paths.runs),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # DeepSpeed JIT-builds ops with ninja/g++: the workers need this venv's bin on PATH.
            worker_runtime_env={"env_vars": {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}},
        ),
    )
    progress(f"training {train.name}: {rows} rows, {scaling.num_workers} workers, ZeRO-{train.deepspeed.zero_stage} (run {run_id})")
    with tracer("tunefetch.training").start_as_current_span("train") as span:
        span.set_attribute("tunefetch.adapter.name", train.name)
        span.set_attribute("tunefetch.training.run_id", run_id)
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"training run {run_id} failed: {result.error}")
        lineage = TrainingLineage(
            base_model=model_identity(base_model),
            dataset=DatasetLineage(sha256=dataset_fingerprint([s.path for s in train.datasets]), rows=rows,
                                   paths=[str(s.path) for s in train.datasets]),
            config=train.model_dump(mode="json"),
            metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            run_id=run_id,
            author=getpass.getuser(),
            trace_id=trace_id_of(span),
        )
        with result.checkpoint.as_directory() as adapter_dir:
            version = open_registry(config.registry_settings()).register(train.name, Path(adapter_dir), lineage)
        span.set_attribute("tunefetch.adapter.version", version.ref)
    return version
