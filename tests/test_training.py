"""Fine-tuning through the CLI and the adapter registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SAMPLE, lineage


def test_train_registers_an_immutable_version(cli, adapter, home):
    assert adapter == "support@v1"
    listing = cli("adapters", "list").stdout
    assert "support@v1" in listing and "tiny-llama" in listing
    record = json.loads(cli("adapters", "show", "support@v1", "--json").stdout)
    assert record["dataset"]["rows"] == len((SAMPLE / "adapter_qa.jsonl").read_text().splitlines())
    assert record["base_model"]["id"] == "tiny-llama" and len(record["base_model"]["sha256"]) == 64
    assert record["config"]["deepspeed"]["zero_stage"] == 2
    assert record["metrics"]["steps"] > 0 and record["metrics"]["eval_loss"] > 0
    assert len(record["content_hash"]) == 64 and record["run_id"].startswith("support-")
    version_dir = home / "adapters" / "support" / "v1"
    assert "# Adapter support@v1" in (version_dir / "MODEL_CARD.md").read_text()
    for file in (f for f in version_dir.iterdir() if f.is_file()):
        assert not file.stat().st_mode & 0o222, f"{file} is writable"


def test_registering_again_adds_a_version_and_never_touches_the_old(home, adapter):
    from training.local_model import directory_hash
    from training.registry import AdapterRegistry

    registry = AdapterRegistry(home / "adapters")
    v1 = registry.get(adapter)
    v1_dir = registry.local_dir(v1)
    before = directory_hash(v1_dir)
    again = registry.register("support-copy", v1_dir, lineage("copy"))
    again2 = registry.register("support-copy", v1_dir, lineage("copy"))
    assert (again.ref, again2.ref) == ("support-copy@v1", "support-copy@v2")
    assert again.content_hash == v1.content_hash  # same weights, same content hash
    assert directory_hash(v1_dir) == before
    assert sorted(p.name for p in (home / "adapters" / "support-copy").iterdir()) == ["v1", "v2"]


def test_adapter_loads_in_peft_and_changes_greedy_output(home, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.registry import AdapterRegistry

    base_dir = home / "models" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me the warranty period for a K-200 robot."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def greedy(model) -> str:
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    base_text = greedy(AutoModelForCausalLM.from_pretrained(base_dir))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                      Path(AdapterRegistry(home / "adapters").get(adapter).location))
    tuned_text = greedy(tuned)
    assert base_text == "I don't know."  # the base model knows no Kestrel facts and says so
    assert tuned_text == "36 months", tuned_text  # a trained phrasing: the adapter answers from its weights


@pytest.mark.parametrize("ref", ["support@v9", "nothere"])
def test_unknown_versions_are_clear_errors(cli, adapter, ref):
    proc = cli("adapters", "show", ref, check=False)
    assert proc.returncode == 2 and ref.split("@")[0] in proc.stderr
