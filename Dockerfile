# tunefetch's image: the Ray head, workers, training jobs and `helm test` of the Helm chart
# (helm/tunefetch) all run it. One Dockerfile, two stacks, installed exactly as on a host:
#   docker build -t tunefetch:0.1.0-cpu .                        # vLLM's CPU build (make setup)
#   docker build -t tunefetch:0.1.0-gpu --build-arg VARIANT=gpu .  # CUDA vLLM (make setup-gpu, hashed lock)
# The chart's default image is REPOSITORY:APPVERSION-VARIANT (values image.*).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
# g++/ninja: DeepSpeed builds its ops at first use; libnuma: vLLM's CPU build; make: the setup.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make g++ ninja-build libnuma1 git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/tunefetch
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU lock pins torch 2.13.0+cpu, which PyTorch's CPU index serves (PyPI has CUDA builds
# only); the GPU lock is hash-checked against PyPI alone.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Locks and build files first: the dependency layer is rebuilt only when they change.
COPY Makefile pyproject.toml README.md ./
COPY requirements requirements
COPY cluster cluster
COPY retrieval retrieval
COPY serving serving
COPY training training
COPY evaluation evaluation
COPY tunefetch tunefetch
COPY examples examples
RUN if [ "$VARIANT" = gpu ]; then make setup-gpu; \
    elif [ "$VARIANT" = cpu ]; then PIP_EXTRA_INDEX_URL=$TORCH_CPU_INDEX make setup; \
    else echo "VARIANT must be cpu or gpu, not $VARIANT" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ ninja-build libnuma1 wget procps \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 ray
COPY --from=build --chown=1000:1000 /opt/tunefetch /opt/tunefetch
# KubeRay starts `ray start` through bash and probes with wget; both must be on PATH.
ENV PATH=/opt/tunefetch/.venv/bin:$PATH \
    TUNEFETCH_HOME=/var/lib/tunefetch \
    PYTHONUNBUFFERED=1
RUN mkdir -p /var/lib/tunefetch && chown 1000:1000 /var/lib/tunefetch \
 && tunefetch --help > /dev/null && python -c "import ray, vllm, tunefetch"
LABEL org.opencontainers.image.title="tunefetch" \
      org.opencontainers.image.description="LoRA fine-tuning, retrieval and multi-adapter vLLM serving on Ray" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.tunefetch.variant="${VARIANT}"
USER 1000
WORKDIR /home/ray
CMD ["tunefetch", "--help"]
