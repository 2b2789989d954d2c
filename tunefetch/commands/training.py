"""Training and the adapter registry: `train`, `submit train`, `adapters list|show`."""

from __future__ import annotations

import re
import time
from argparse import Namespace
from pathlib import Path

from cluster.config import TunefetchConfig
from tunefetch.console import Console

_STEP = re.compile(r"^step (\d+)/(\d+) (.*)$")


def add_parsers(sub, command) -> None:
    p = command(sub, "train", "LoRA fine-tune from a train YAML and register the adapter (prints NAME@vN)",
                handler=train)
    p.add_argument("train_config", type=Path, help="train YAML (see examples/train.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, else a local Ray)")

    p = command(sub, "submit", "submit a job to a remote Ray cluster (Ray Jobs API) and stream its logs")
    sj = p.add_subparsers(dest="submit_command", required=True, metavar="JOB")
    p = command(sj, "train", "a training run: `tunefetch train CONFIG` on the cluster", handler=submit_train)
    p.add_argument("train_config", type=Path, help="train YAML; it and its datasets are uploaded with the job")
    p.add_argument("--address", required=True, help="Ray job server, e.g. http://127.0.0.1:8265")

    p = command(sub, "adapters", "the adapter registry")
    ad = p.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    p = command(ad, "list", "every adapter version", handler=adapters_list, json="print JSON")
    p = command(ad, "show", "one version's record and model card",
                handler=adapters_show, json="print the record as JSON")
    p.add_argument("ref", help="NAME (its newest version) or NAME@vN")


def train(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from training.config import load_train_config
    from training.job import check_inputs

    if args.address:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": args.address})})
    spec = load_train_config(args.train_config)
    check_inputs(spec, config)  # fail fast, before starting Ray
    with console.captured(config.paths.logs, "train"):
        version = run_training_job(spec, config, console)
    metrics = version.record.metrics
    console.info(", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float)))
    console.result(version.ref)
    return 0


def run_training_job(spec, config: TunefetchConfig, console: Console):
    """One training run on Ray with its progress shown: the registered AdapterVersion."""
    from cluster.runtime import ray_runtime
    from cluster.telemetry import setup_tracing, shutdown_tracing
    from training.job import run_training

    setup_tracing(config.telemetry, "training")
    try:
        with ray_runtime(config), console.progress(f"train {spec.name}") as update:
            console.on_marker = _training_progress(console, update)
            try:
                return run_training(spec, config, progress=console.note)
            finally:
                console.on_marker = None
    finally:
        shutdown_tracing()


def _training_progress(console: Console, update):
    last = [""]

    def show(line: str) -> None:
        if line == last[0]:  # Ray may forward a worker's line twice
            return
        last[0] = line
        match = _STEP.match(line)
        if match:
            update(int(match.group(1)), int(match.group(2)), match.group(3))
        else:
            console.info(f"    {line}")

    return show


def submit_train(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    return submit_training(args.address, args.train_config, config.home, console.info)


def submit_training(address: str, train_config: Path, home: Path | None, progress) -> int:
    """`tunefetch train TRAIN_CONFIG` as a Ray job on the cluster at `address`, writing into
    `home` on the cluster (None: the cluster's own default); 0 if it succeeded."""
    from cluster.jobs import STAGE_DIR, submit
    from training.config import load_train_config, stage_train_config

    train_config = Path(train_config)
    spec = load_train_config(train_config)  # a bad config never reaches the cluster
    # `python -m tunefetch` runs the uploaded code with the cluster's Python (no console script
    # needed there); `--address auto` joins the cluster the job runs on. The home is absolute,
    # like every verb's --home (relative to the job it would be its throw-away working_dir).
    entrypoint = ["python", "-m", "tunefetch", "train", f"{STAGE_DIR}/{train_config.name}", "--address", "auto"]
    if home is not None:
        entrypoint += ["--home", str(Path(home).expanduser().resolve())]
    return submit(address, entrypoint, lambda stage: stage_train_config(train_config, spec, stage),
                  name=f"train-{spec.name}", metadata={"adapter": spec.name, "train_config": str(train_config)},
                  progress=progress)


def adapters_list(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from training.registry import open_registry

    unreadable: list[str] = []
    versions = open_registry(config.registry_settings()).all(unreadable)
    for problem in unreadable:
        console.info(f"warning: left out {problem}")
    if args.json:
        console.json([v.record.model_dump(mode="json") for v in versions])
        return 0
    if not versions:
        console.info("no adapters (train one with `tunefetch train examples/train.yaml`)")
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.record.created_at))
        console.result(f"{v.ref}\t{v.content_hash[:12]}\tbase {v.record.base_model.id}\t"
                       f"{v.record.dataset.rows} rows\t{created}")
    return 0


def adapters_show(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from training.registry import open_registry

    registry = open_registry(config.registry_settings())
    version = registry.get(args.ref)
    approvals = _approvals_of(version, registry, config)
    if args.json:
        console.json({**version.record.model_dump(mode="json"), "approvals": approvals})
        return 0
    console.result(registry.read_text(version.location, "MODEL_CARD.md"))
    for a in approvals:
        state = "valid" if a["valid"] else f"invalid: {a['reason']}"
        console.result(f"- approval `{a['approval_id']}` by {a['approved_by']} ({state})")
    return 0


def _approvals_of(version, registry, config: TunefetchConfig) -> list[dict]:
    """The approvals of one version (the registry record itself never changes), each checked
    against its evidence now."""
    from training.approvals import ApprovalStore

    store = ApprovalStore(config.paths.approvals, config.governance)
    mine = [a for a in store.all() if a.ref == version.ref]
    if not mine:
        return []
    local = registry.local_dir(version)
    return [{"approval_id": a.approval_id, "approved_by": a.approved_by, "approved_at": a.approved_at,
             **store.verify(a, local).model_dump()} for a in mine]
