"""Training jobs beyond the happy path: ZeRO-3 saving, resume after a killed worker, datasets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from conftest import CLI, ROOT, SAMPLE, TUNEFETCH, s3_uri


def train_config(tmp_path, name: str, **overrides) -> str:
    config = {
        "name": name,
        "datasets": [{"path": str(SAMPLE / "adapter_qa.jsonl"), "format": "chat"}],
        "max_seq_length": 128, "batch_size": 2, "epochs": 1, "log_every_steps": 1, "seed": 7,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "optimizer": {"lr": 0.002}, "schedule": {"type": "constant"}, "eval": {"split": 0.1},
        **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def adapter_weights(home, ref: str) -> dict:
    from safetensors.torch import load_file

    from training.registry import AdapterRegistry

    return load_file(str(Path(AdapterRegistry(home / "adapters").get(ref).location) / "adapter_model.safetensors"))


def test_zero3_and_cpu_offload_save_the_same_adapter_as_zero2(cli, home, local_model, tmp_path):
    """Sharding forced on (persistence threshold 0): the gathered save is complete and loads in
    peft, and equals the ZeRO-2 adapter trained on the same seed and data. With the optimizer
    offloaded to host memory (really: DeepSpeed says so) ZeRO-2 computes the same fp32 steps."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.registry import AdapterRegistry

    z2 = cli("train", train_config(tmp_path, "zero-two", max_steps=4)).stdout.strip().splitlines()[-1]
    z3 = cli("train", train_config(tmp_path, "zero-three", max_steps=4,
                                   deepspeed={"zero_stage": 3, "stage3_param_persistence_threshold": 0})
             ).stdout.strip().splitlines()[-1]
    offload = cli("train", train_config(tmp_path, "zero-two-offload", max_steps=4,
                                        deepspeed={"zero_stage": 2, "offload_optimizer": True})
                  ).stdout.strip().splitlines()[-1]
    offloaded = {ref: json.loads(cli("adapters", "show", ref, "--json").stdout)["metrics"]
                 ["optimizer_offloaded"] for ref in (z2, offload)}
    assert offloaded == {z2: False, offload: True}
    w2, w3 = adapter_weights(home, z2), adapter_weights(home, z3)
    for key, value in adapter_weights(home, offload).items():
        assert torch.allclose(value, w2[key], atol=1e-7), key
    assert set(w2) == set(w3) and len(w3) == 2 * 2 * 2  # q,v x A,B x 2 layers
    for key in w2:
        assert w3[key].numel() > 0 and w3[key].shape == w2[key].shape
        # Sharded reduce-scatter sums in another order than ZeRO-2's all-reduce; Adam turns a
        # near-zero gradient's sign into a +-lr step, so rare elements may differ by up to 2*lr.
        diff = (w3[key] - w2[key]).abs()
        assert float((diff <= 2e-4).float().mean()) >= 0.99 and float(diff.max()) <= 4e-3, key
    assert any(float(w3[k].abs().sum()) > 0 for k in w3 if "lora_B" in k)  # trained, not the zero init
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_model),
                              AdapterRegistry(home / "adapters").get(z3).location)


def _train_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "^ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(cli, home, local_model, tmp_path):
    config = train_config(tmp_path, "resilient", max_steps=16, checkpoint_every_steps=4, max_failures=1)
    # --verbose: the workers' own lines (checkpoint, resume, every step), not the progress bar
    proc = subprocess.Popen([TUNEFETCH, "train", config, "--home", str(home), "--verbose"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        if killed is None and "checkpoint at step 8" in line:
            workers = _train_workers()
            assert len(workers) == 2, workers
            killed = workers[-1]
            subprocess.run(["kill", "-9", str(killed)])
    assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
    log = "".join(lines)
    assert killed is not None, log[-3000:]
    after = log[log.index("resumed from step"):]
    resumed = int(re.search(r"resumed from step (\d+)", after).group(1))
    # the kill may land before Ray committed the step-8 checkpoint: then step 4 is the latest
    assert resumed in (4, 8), after[:200]
    assert "step 1/16" not in after and f"step {resumed + 1}/16" in after  # the step count continues
    ref = log.strip().splitlines()[-1]
    record = json.loads(cli("adapters", "show", ref, "--json").stdout)
    assert record["metrics"]["steps"] == 16 and record["metrics"]["resumed_from_step"] == resumed


def test_a_run_registers_into_an_s3_registry(home, local_model, s3_endpoint, tmp_path):
    """registry.uri on S3: the finished run lands there (and only there), loadable by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.registry import AdapterRegistry

    uri = s3_uri(s3_endpoint, "training")
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({"registry": {"uri": uri}}))
    ref = CLI(home, config)("train", train_config(tmp_path, "remote", max_steps=2)).stdout.strip().splitlines()[-1]
    assert ref == "remote@v1" and "remote" not in AdapterRegistry(home / "adapters").names()
    registry = AdapterRegistry(uri, cache_dir=tmp_path / "cache")
    version = registry.get(ref)
    assert version.record.metrics["steps"] == 2 and version.record.base_model.id == "tiny-llama"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_model), registry.local_dir(version))


def test_both_dataset_forms_train_only_on_the_answer(local_model, tmp_path):
    from transformers import AutoTokenizer

    from training.datasets import IGNORE_INDEX, read_rows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(local_model)
    (tmp_path / "instruction.jsonl").write_text(json.dumps(
        {"instruction": "How long is the K-40's warranty?", "input": "", "output": "24 months"}) + "\n")
    instruction = read_rows(tmp_path / "instruction.jsonl", "auto")[0]
    chat = next(row for row in read_rows(SAMPLE / "adapter_qa.jsonl", "auto") if row[0]["role"] == "system")
    assert [m["role"] for m in instruction] == ["user", "assistant"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]
    for messages in (instruction, chat):
        example = tokenize(messages, tokenizer, 512)
        answer = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(answer).startswith(messages[-1]["content"])  # then <|im_end|>
        prompt = tokenizer.decode(example.input_ids[: len(example.input_ids) - len(answer)])
        assert messages[-2]["content"] in prompt and messages[-1]["content"] not in prompt
