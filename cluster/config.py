"""The one typed configuration of a tunefetch deployment.

Read once at the edge (the CLI, or Serve's app builder in a pod), validated up front, then
passed down as objects: each layer and each Serve deployment gets the sections it needs.
Sources, strongest first: explicit overrides (CLI flags), the environment
(`TUNEFETCH_<SECTION>__<KEY>`, e.g. `TUNEFETCH_SERVING__PORT=9000`), the YAML file (`--config`
or `TUNEFETCH_CONFIG`), the defaults. The defaults run the embedded stack (local model, Milvus
Lite, local Ray) inside one home directory. Secrets are `SecretStr`: they print as `**********`
and are left out of every dump meant for people or manifests.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from cluster.errors import UserError

CONFIG_ENV = "TUNEFETCH_CONFIG"


class _Section(BaseModel):
    # Unknown keys are typos: fail loudly instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; empty starts a local Ray on 127.0.0.1.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all).")
    storage_path: str | None = Field(
        None, description="Ray Train run storage (checkpoints): a path every node sees (NFS, a shared volume) or "
        "s3://bucket/prefix; empty uses HOME/runs, which only works on one node.")


class TelemetryConfig(_Section):
    """Spans over OTLP. Keys left unset fall back to the standard OTEL_* variables."""

    exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="Where spans go (unset: OTEL_TRACES_EXPORTER, else none).")
    endpoint: str | None = Field(None, description="OTLP endpoint, e.g. http://127.0.0.1:4317 (unset: "
                                                   "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT).")
    protocol: Literal["grpc", "http/protobuf"] = Field(
        "grpc", description="OTLP protocol (unset: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else grpc).")
    headers: SecretStr | None = Field(None, description="OTLP headers 'k1=v1,k2=v2', e.g. an auth token.")
    sampling_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Parent-based ratio sampler (unset: "
                                                                   "OTEL_TRACES_SAMPLER[_ARG], else 1.0).")
    service_name: str = Field("tunefetch", description="Resource service.name (unset: OTEL_SERVICE_NAME).")


class RetrievalConfig(_Section):
    milvus_uri: str | None = Field(
        None, description="Milvus server URI (http://host:19530); empty uses Milvus Lite in the home directory.")
    milvus_token: SecretStr | None = Field(None, description="Milvus 'user:password' or API key.")
    chunk_tokens: int = Field(200, ge=16, le=512, description="Chunk size in embedder tokens; at most the "
                                                              "embedder's input length (MiniLM reads 256).")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks of one section.")
    top_k: int = Field(3, ge=1, le=50, description="Default hits per retrieval.")
    keep_versions: int = Field(10, ge=0, description="Versions kept per store (oldest dropped first; 0 keeps all).")

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, v: int, info) -> int:
        if v >= info.data.get("chunk_tokens", 200):
            raise ValueError("must be smaller than chunk_tokens")
        return v


# EngineConfig fields that are tunefetch's own, not vLLM engine arguments.
_NOT_VLLM_ARGS = {"kv_cache_gib", "pin_cpu_cores", "extra_args", "json_whitespace"}


class EngineConfig(_Section):
    """The vLLM engine. Every field except tunefetch's own (kv_cache_gib, pin_cpu_cores) is a
    vLLM `AsyncEngineArgs` field of the same name, passed as is: a new vLLM knob is one line
    here, or a key of `extra_args` without a code change."""

    model: str | None = Field(None, description="Base model directory; empty uses the home's local model.")
    dtype: str = Field("auto", description="Weights and activations dtype (auto, float32, bfloat16, ...).")
    max_model_len: int = Field(2048, ge=64, description="Context length (prompt + output tokens).")
    max_num_seqs: int = Field(32, ge=1, description="Sequences batched per engine step.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    max_loras: int = Field(2, ge=1, description="Adapters resident in one batch.")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank served.")
    max_cpu_loras: int | None = Field(None, ge=1, description="Adapters cached in host memory (null: max_loras).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU hosts: memory share for the engine.")
    seed: int = Field(0, description="Engine seed (sampling without a per-request seed).")
    extra_args: dict[str, Any] = Field(default_factory=dict,
                                       description="Any other AsyncEngineArgs field, passed to vLLM as is.")
    kv_cache_gib: int = Field(1, ge=1, description="CPU hosts: KV cache size (VLLM_CPU_KVCACHE_SPACE).")
    pin_cpu_cores: bool = Field(
        True, description="CPU hosts: the engine core process runs alone on floor(generator.num_cpus) cores of "
        "its node, claimed so replicas never share one, and at least one core stays for everything else.")
    json_whitespace: bool = Field(
        False, description="Structured outputs (response_format) may contain free whitespace. Off: compact JSON, "
        "fewer tokens, and a model cannot spend its token budget on blank lines inside the JSON.")

    def vllm_args(self) -> dict[str, Any]:
        """The vLLM engine arguments this section names (model excluded: resolved by the caller)."""
        args = self.model_dump(exclude=_NOT_VLLM_ARGS | {"model"})
        overlap = set(args) & set(self.extra_args)
        if overlap:
            raise UserError(f"serving.engine.extra_args: {', '.join(sorted(overlap))} are typed keys of "
                            "serving.engine; set them there")
        # xgrammar by name: vLLM honours the whitespace switch only for xgrammar and guidance.
        structured = {"backend": "xgrammar", "disable_any_whitespace": not self.json_whitespace}
        return {**args, "structured_outputs_config": structured, **self.extra_args}


class Autoscaling(_Section):
    """Serve replica autoscaling on ongoing requests (Serve's autoscaling_config)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(4, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica to scale towards.")
    upscale_delay_s: float = Field(30, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(600, ge=0, description="Load must stay low this long before one is removed.")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DeploymentOptions(_Section):
    num_replicas: int = Field(1, ge=1, description="Replicas of this deployment (fixed; see autoscaling).")
    autoscaling: Autoscaling | None = Field(None, description="Scale replicas with load instead of num_replicas.")
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests each caller queues beyond max_ongoing_requests; more get 429 (-1: unbounded)."
    )


# The engine replica does the real work; the gateway and retriever get fractions so the whole
# app fits on a 2-core host next to the Serve proxy. Subclasses, so that setting one key of a
# section keeps the others' defaults.
class GeneratorOptions(DeploymentOptions):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")


class RetrieverOptions(DeploymentOptions):
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica.")


class RagPolicy(_Section):
    """What a retrieval request does when no passage is relevant enough."""

    min_score: float = Field(0.0, ge=-1.0, le=1.0, description="Passages scoring below this are not used.")
    no_context: Literal["abstain", "answer"] = Field(
        "answer", description="abstain: a fixed 'not found' answer; answer: generate without context, marked grounded: false."
    )
    on_unavailable: Literal["fail", "answer"] = Field(
        "fail", description="When the knowledge store backend is down: fail: 503 with Retry-After; answer: generate "
                            "without context, marked grounded: false with the retrieval_error.")
    search_timeout_s: float = Field(5.0, gt=0, description="A search slower than this counts as the backend failing.")
    breaker_failures: int = Field(3, ge=1, description="Consecutive backend failures that open the circuit (calls "
                                                       "then fail at once, without waiting for a timeout).")
    breaker_reset_s: float = Field(10.0, gt=0, description="Seconds an open circuit waits before one trial call.")
    cite_answer_chars: int = Field(600, ge=16, le=20000, description="retrieval.cite strict: longest `answer` "
                                                                     "string (without a caller's schema).")
    cite_quote_chars: int = Field(200, ge=8, le=2000, description="retrieval.cite strict: longest quote per "
                                                                  "citation.")

    def merged(self, request) -> "RagPolicy":
        """This policy with a request's `min_score` / `no_context` / `on_unavailable` overrides applied."""
        overrides = {k: getattr(request, k) for k in ("min_score", "no_context", "on_unavailable")
                     if getattr(request, k) is not None}
        return self.model_copy(update=overrides)


class CacheConfig(_Section):
    """Per-replica caches, bounded (LRU) and never stale by construction (retrieval/cache.py)."""

    retrieval: bool = Field(False, description="Cache query vectors and search results, keyed by the store "
                                               "version the alias points at: a new version or rollback never "
                                               "serves an old hit.")
    max_entries: int = Field(4096, ge=1, description="Entries per cache in each retriever replica.")


class ServingConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 inside a pod).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("tunefetch", description="Serve application name.")
    engine: EngineConfig = EngineConfig()
    gateway: DeploymentOptions = DeploymentOptions()
    generator: GeneratorOptions = GeneratorOptions()
    retriever: RetrieverOptions = RetrieverOptions()
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of requests that set none.")
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    allow_unauthenticated: bool = Field(
        False, description="Serve on an address beyond loopback (e.g. 0.0.0.0) while no API key exists.")
    public_metrics: bool = Field(False, description="With API keys in force, /metrics without an admin key "
                                                    "(for a scraper that cannot send one).")
    keys_file: Path | None = Field(None, description="API keys file; empty uses HOME/keys.json (e.g. a mounted "
                                                     "Kubernetes Secret; it is re-read when it changes).")
    rag: RagPolicy = RagPolicy()
    cache: CacheConfig = CacheConfig()
    record_text: bool = Field(True, description="Provenance records keep the question and the answer text (the "
                                                "review queue and the drift monitor read them); false keeps hashes only.")


class ClientConfig(_Section):
    """How the CLI calls a running server (`query`, `card`, `eval compare`)."""

    url: str | None = Field(None, description="Server URL (default: http://serving.host:serving.port).")
    api_key: SecretStr | None = Field(None, description="The API key it sends (e.g. TUNEFETCH_CLIENT__API_KEY).")


class RegistryConfig(_Section):
    uri: str | None = Field(
        None, description="Adapter registry: a directory or a pyarrow/fsspec URI (s3://bucket/prefix"
        "?endpoint_override=host:port&scheme=http, gs://...); empty uses HOME/adapters.")
    access_key: SecretStr | None = Field(None, description="Object store access key (else the usual credential chain).")
    secret_key: SecretStr | None = Field(None, description="Object store secret key.")
    cache_dir: Path | None = Field(None, description="Local copies of remote versions; empty uses HOME/cache/adapters.")


class CanaryPolicy(_Section):
    """How a canary between two versions of one adapter is judged and advanced."""

    alpha: float = Field(0.05, gt=0, lt=0.5, description="Bound on the chance of rolling back a candidate as good as "
                                                          "stable (always-valid sequential test, all metrics together).")
    min_samples: int = Field(20, ge=5, description="Answers per arm before any decision.")
    promote_after: int = Field(200, ge=10, description="Canary answers without harm that pass a step.")
    steps: list[float] = Field(default_factory=list, description="Weights to move through after each passed step "
                                                                 "(e.g. [0.1, 0.5]); after the last: promote.")
    latency_margin: float = Field(0.25, ge=0, description="Relative latency increase tolerated before it counts as harm.")
    effect_size: float = Field(0.1, gt=0, le=1, description="Scale of the differences the test is tuned to find "
                                                            "(mixture width of the sequential test).")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        if any(not 0 < w < 1 for w in steps) or steps != sorted(set(steps)):
            raise ValueError("steps must be increasing weights between 0 and 1")
        return steps


class MonitorConfig(_Section):
    """Drift and freshness of what is served, and which answers a person should review."""

    window: int = Field(200, ge=20, description="Answers per window: the reference is a store's (or adapter's) "
                                                "first window in the log, compared with its latest.")
    alpha: float = Field(0.01, gt=0, lt=0.5, description="False alarm bound per group and look (split over its "
                                                         "tests, Bonferroni).")
    permutations: int = Field(1000, ge=100, le=20000, description="Permutations of the query-embedding test "
                                                                  "(its smallest p-value is 1/(permutations+1)).")
    lookback_days: float = Field(7, gt=0, description="Answers the server's drift checks look at (`tunefetch "
                                                      "monitor` reads all, or --since).")
    interval_s: float = Field(300, ge=0, description="Seconds between the server's own drift checks (0: off; "
                                                     "`tunefetch monitor` works either way).")
    review_below_score: float = Field(0.3, ge=-1, le=1, description="Grounded answers whose best passage "
                                                                    "scored below this enter the review queue.")
    negative_feedback_below: float = Field(0.5, gt=0, le=1, description="Feedback scores below this are negative: "
                                                                        "the answer enters the review queue.")
    kpis: list[str] = Field(default_factory=list, description="Business KPIs clients may post per answer "
                                                              "(e.g. resolved_without_escalation).")

    @model_validator(mode="after")
    def _permutations_can_reach_the_level(self):
        if 1 / (self.permutations + 1) > self.alpha / 4:  # four tests share alpha on a store
            raise ValueError(f"permutations: {self.permutations} cannot give a p-value at or under alpha/4 = "
                             f"{self.alpha / 4:g}; use at least {int(4 / self.alpha)}")
        return self

    @field_validator("kpis")
    @classmethod
    def _kpi_names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", n)]
        if bad:
            raise ValueError(f"KPI names are lower-case identifiers (a-z, 0-9, _): {bad}")
        return names


class GuardPolicy(_Section):
    """Input and output checks one request runs under (serving/guards.py). Several policies can
    apply to one request (the default, its adapter's, its key's): each runs, the strictest wins."""

    max_prompt_chars: int | None = Field(None, ge=1, description="Longer prompts (all messages) are refused (400).")
    max_output_tokens: int | None = Field(None, ge=1, description="Requests asking for more are refused (400); "
                                                                  "requests asking for none get at most this.")
    denied_topics: dict[str, list[str]] = Field(
        default_factory=dict, description="Topic -> regular expressions (case-insensitive, matched on word "
                                          "boundaries). A question on a topic is refused (400); an answer on one "
                                          "is replaced by the refusal.")
    pii: Literal["off", "redact", "block"] = Field(
        "off", description="Emails, phone numbers and card numbers in prompts: replaced by [EMAIL], [PHONE], "
                           "[CARD] before retrieval, the model and the records see them (redact), or refused "
                           "(block). Answers are redacted under both.")
    sources: list[str] | None = Field(None, description="Shell patterns of document sources answers may use and "
                                                        "cite (e.g. 'handbook/*'); other passages are dropped "
                                                        "before the prompt. Null: all.")
    refusal: str = Field("I can't help with that.", min_length=1, max_length=1000,
                         description="The answer that replaces one an output check refused.")

    @field_validator("denied_topics")
    @classmethod
    def _patterns_compile(cls, topics: dict[str, list[str]]) -> dict[str, list[str]]:
        for topic, patterns in topics.items():
            if not patterns:
                raise ValueError(f"topic {topic!r} has no patterns")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"topic {topic!r}: pattern {pattern!r} is not a regular expression ({exc})")
        return topics


class GuardsConfig(_Section):
    policies: dict[str, GuardPolicy] = Field(default_factory=dict, description="Named guard policies.")
    default: str | None = Field(None, description="The policy every request runs under (null: none).")
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> the policy its requests "
                                                                       "also run under.")
    hold_back_chars: int = Field(64, ge=8, le=4096, description="Streams with output checks send text this many "
                                                                "characters behind the model: a denied phrase or "
                                                                "PII up to this long never reaches the client.")

    @model_validator(mode="after")
    def _named_policies_exist(self):
        for where, name in [("default", self.default), *((f"adapters.{a}", p) for a, p in self.adapters.items())]:
            if name is not None and name not in self.policies:
                raise ValueError(f"{where}: no policy named {name!r} (policies: {sorted(self.policies)})")
        return self


class GovernanceConfig(_Section):
    require_approval: bool = Field(False, description="Serving a version as stable, and promoting a canary, need "
                                                      "a valid approval record.")
    approval_requires_eval: bool = Field(False, description="`approve` needs --eval DIR whose report covers the "
                                                            "version and passes the thresholds.")
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"ft.exact_match": 0.5},
        description="Minimums an eval report must reach, as MODE.METRIC of results.json (e.g. hybrid.f1).")
    approval_ttl_days: float = Field(90, gt=0, description="Approvals expire after this many days.")
    policy_version: str = Field("1", description="Approvals name the policy they were granted under; changing it "
                                                 "invalidates them.")
    card_file: Path | None = Field(None, description="YAML with the system card fields only a person can write "
                                                     "(owners, intended_use, limitations, ethical_considerations, "
                                                     "contact).")
    canary: CanaryPolicy = CanaryPolicy()
    monitor: MonitorConfig = MonitorConfig()
    guards: GuardsConfig = GuardsConfig()


class TunefetchConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFETCH_", env_nested_delimiter="__", extra="forbid",
                                      validate_default=True)

    home: Path = Field(Path(".tunefetch"), description="Directory holding models, adapters, stores, provenance.")
    ray: RayConfig = RayConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    registry: RegistryConfig = RegistryConfig()
    serving: ServingConfig = ServingConfig()
    governance: GovernanceConfig = GovernanceConfig()
    client: ClientConfig = ClientConfig()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Overrides > environment > the YAML file (handed over by load_config) > defaults.
        return init_settings, env_settings, InitSettingsSource(settings_cls, _FILE_DATA.get())

    @property
    def paths(self) -> "HomePaths":
        return HomePaths(self.home, self.serving.keys_file)

    @property
    def base_model_dir(self) -> Path:
        """The served base model: serving.engine.model, else the home's local model."""
        return Path(self.serving.engine.model or self.paths.local_model)

    def registry_settings(self) -> RegistryConfig:
        """The registry section with the home's defaults filled in (what a deployment needs)."""
        return self.registry.model_copy(update={"uri": self.registry.uri or str(self.paths.adapters),
                                                "cache_dir": self.registry.cache_dir or self.paths.adapter_cache})

    @property
    def local_url(self) -> str:
        """The server of this config as seen from its own machine (loopback for a wildcard bind)."""
        host = "127.0.0.1" if self.serving.host in ("0.0.0.0", "::", "") else self.serving.host
        return f"http://{host}:{self.serving.port}"

    @property
    def server_url(self) -> str:
        """Where the CLI finds a running server: client.url, else the local one."""
        return self.client.url or self.local_url

    def public_dump(self) -> dict:
        """The config for manifests and people: no secrets, no machine-local home."""
        return _without_secrets(self.model_dump(mode="json", exclude={"home"}), self)


_FILE_DATA: ContextVar[dict] = ContextVar("tunefetch_config_file", default={})


class HomePaths:
    """Where each kind of state lives inside the home directory."""

    def __init__(self, home: Path, keys_file: Path | None = None):
        self.home = Path(home).resolve()
        self._keys_file = keys_file

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
    def refusals(self) -> Path:
        """Requests a guard refused (no answer, so no provenance record): who, which policy, why."""
        return self.home / "provenance" / "refusals"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def releases(self) -> Path:
        """Per adapter name: the stable version, the canary and every decision."""
        return self.home / "releases"

    @property
    def approvals(self) -> Path:
        return self.home / "approvals"

    @property
    def server(self) -> Path:
        """The running `tunefetch serve` of this home: its URL and pid (gone when it stops)."""
        return self.home / "server.json"

    @property
    def feedback(self) -> Path:
        """Feedback and KPI events per answer (append-only; the latest per answer and key wins)."""
        return self.home / "feedback"

    @property
    def reviews(self) -> Path:
        """Decisions of the review queue (resolved with a correction, or dismissed)."""
        return self.home / "reviews"

    @property
    def keys(self) -> Path:
        """API keys (salted hashes of their tokens, never the tokens)."""
        return self.home / "keys.json" if self._keys_file is None else self.home / self._keys_file


def load_config(path: Path | None = None, **overrides: Any) -> TunefetchConfig:
    """Reads and validates the config: `path` (else $TUNEFETCH_CONFIG, else none), the
    TUNEFETCH_* environment, then `overrides` (nested dicts, e.g. serving={"port": 9000})."""
    path = path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    token = _FILE_DATA.set(read_yaml(path) if path is not None else {})
    try:
        config = TunefetchConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise UserError(f"{path or 'config'}: {describe_validation_error(exc)}") from None
    finally:
        _FILE_DATA.reset(token)
    return config.model_copy(update={"home": config.home.resolve()})


def config_from_mapping(data: dict) -> TunefetchConfig:
    """A config from a mapping (Serve's app args in a pod) plus the pod's TUNEFETCH_* environment,
    which carries the secrets the mapping never holds."""
    token = _FILE_DATA.set(dict(data))
    try:
        return TunefetchConfig()
    except ValidationError as exc:
        raise UserError(f"config: {describe_validation_error(exc)}") from None
    finally:
        _FILE_DATA.reset(token)


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


def _without_secrets(dumped: dict, model: BaseModel) -> dict:
    """`dumped` (a model_dump of `model`) with every SecretStr field removed, at any depth."""
    out = {}
    for key, value in dumped.items():
        info = type(model).model_fields.get(key)
        if info is not None and SecretStr in (get_args(info.annotation) or (info.annotation,)):
            continue  # set or not: a manifest never even names a secret
        field = getattr(model, key, None)
        out[key] = _without_secrets(value, field) if isinstance(value, dict) and isinstance(field, BaseModel) else value
    return out


def secret_value(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None
