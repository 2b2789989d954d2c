"""The one typed configuration of a tunefetch deployment.

Read once at the edge (the CLI), validated up front, then passed down as an object: no module
reads the environment on its own. Every section has defaults that run the embedded stack
(local model, Milvus Lite, local Ray) inside one home directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.errors import UserError


class _Section(BaseModel):
    # Unknown keys are typos: fail loudly instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; empty starts a local Ray on 127.0.0.1.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all).")


class TelemetryConfig(_Section):
    exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="Where spans go; 'otlp' honours the standard OTEL_EXPORTER_OTLP_* variables."
    )
    endpoint: str | None = Field(None, description="OTLP endpoint, e.g. http://127.0.0.1:4317.")
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    sampling_ratio: float = Field(1.0, ge=0.0, le=1.0)
    service_name: str = "tunefetch"


class RetrievalConfig(_Section):
    milvus_uri: str | None = Field(
        None, description="Milvus server URI (http://host:19530); empty uses Milvus Lite in the home directory."
    )
    milvus_token: str | None = None
    chunk_tokens: int = Field(200, ge=16, le=512, description="Chunk size in embedder tokens (MiniLM reads 256).")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks of one section.")
    top_k: int = Field(3, ge=1, le=50)
    keep_versions: int = Field(10, ge=0, description="Versions kept per store (oldest dropped first; 0 keeps all).")

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, v: int, info) -> int:
        if v >= info.data.get("chunk_tokens", 200):
            raise ValueError("must be smaller than chunk_tokens")
        return v


class EngineConfig(_Section):
    """vLLM engine arguments that matter for a deployment; the rest keep vLLM's defaults."""

    model: str | None = Field(None, description="Base model directory; empty uses the home's local model.")
    dtype: str = "auto"
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(32, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_loras: int = Field(2, ge=1)
    max_lora_rank: int = Field(16, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    kv_cache_gib: int = Field(1, ge=1, description="KV cache size on CPU hosts (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    pin_cpu_cores: bool = Field(
        True, description="CPU hosts: the engine core process runs alone on floor(generator.num_cpus) cores of "
        "its node, claimed so replicas never share one, and at least one core stays for everything else.")


class DeploymentOptions(_Section):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests each caller queues beyond max_ongoing_requests; more get 429 (-1: unbounded)."
    )


class RagPolicy(_Section):
    """What a retrieval request does when no passage is relevant enough."""

    min_score: float = Field(0.0, ge=-1.0, le=1.0, description="Passages scoring below this are not used.")
    no_context: Literal["abstain", "answer"] = Field(
        "answer", description="abstain: a fixed 'not found' answer; answer: generate without context, marked grounded: false."
    )

    def merged(self, request) -> "RagPolicy":
        """This policy with a request's `min_score` / `no_context` overrides applied."""
        overrides = {k: getattr(request, k) for k in ("min_score", "no_context") if getattr(request, k) is not None}
        return self.model_copy(update=overrides)


class ServingConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "tunefetch"
    engine: EngineConfig = EngineConfig()
    gateway: DeploymentOptions = DeploymentOptions()
    # The engine replica does the real work; the gateway and retriever get fractions so the
    # whole app fits on a 2-core host next to the Serve proxy.
    generator: DeploymentOptions = DeploymentOptions(num_cpus=1.0)
    retriever: DeploymentOptions = DeploymentOptions(num_cpus=0.5)
    default_max_tokens: int = Field(64, ge=1)
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    rag: RagPolicy = RagPolicy()


class RegistryConfig(_Section):
    uri: str | None = Field(
        None, description="Adapter registry: a directory or a pyarrow/fsspec URI (s3://KEY:SECRET@bucket/prefix"
        "?endpoint_override=host:port&scheme=http, gs://...); empty uses HOME/adapters.")


class TunefetchConfig(_Section):
    home: Path = Field(Path(".tunefetch"), description="Directory holding models, adapters, stores, provenance.")
    ray: RayConfig = RayConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    registry: RegistryConfig = RegistryConfig()
    serving: ServingConfig = ServingConfig()

    @property
    def paths(self) -> "HomePaths":
        return HomePaths(self.home)


class HomePaths:
    """Where each kind of state lives inside the home directory."""

    def __init__(self, home: Path):
        self.home = Path(home).resolve()

    @property
    def local_model(self) -> Path:
        return self.home / "models" / "tiny-llama"

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    @property
    def adapter_cache(self) -> Path:
        """Local copies of versions from a remote registry (verified, never modified)."""
        return self.home / "cache" / "adapters"

    @property
    def milvus(self) -> Path:
        return self.home / "milvus"

    @property
    def provenance(self) -> Path:
        return self.home / "provenance"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def server_state(self) -> Path:
        return self.home / "server.json"


def load_config(path: Path | None = None, home: Path | None = None) -> TunefetchConfig:
    """Read and validate the config file (if any); `home` overrides the file's home."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    try:
        config = TunefetchConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None
    if home is not None:
        config = config.model_copy(update={"home": Path(home)})
    return config.model_copy(update={"home": config.home.resolve()})


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """First problem of a pydantic error as 'key.path: message' (the key the user must fix)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"
