"""Builds the Serve application from the one validated config.

gateway (ingress, FastAPI) --handle--> retriever (embedder + Milvus client)
                           --handle--> generator (vLLM engine, multi-LoRA)

Each deployment gets the config sections it uses, nothing else: the generator the engine, the
registry and telemetry; the retriever the Milvus address; the gateway the serving policy.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ray import serve
from ray.serve import Application

from cluster.config import DeploymentOptions, EngineConfig, TunefetchConfig, config_from_mapping
from cluster.errors import UserError
from retrieval.milvus_endpoint import MilvusAddress
from serving.gateway import Gateway
from serving.generator import Generator
from serving.keys import KeyRing
from serving.retriever import Retriever
from training.local_model import model_identity


def build_app(config: TunefetchConfig, milvus: MilvusAddress) -> Application:
    serving = config.serving
    check_engine_placement(serving.engine, serving.generator)
    model_path = base_model_path(config)
    base_model = model_identity(model_path)
    registry, telemetry = config.registry_settings(), config.telemetry
    generator = Generator.options(**deployment_options(serving.generator, engine_env(serving))).bind(
        serving.engine, serving.generator, registry, telemetry, str(model_path), base_model.id)
    retriever = Retriever.options(**deployment_options(serving.retriever)).bind(
        milvus, config.retrieval.top_k, telemetry, serving.rag.search_timeout_s,
        serving.cache.max_entries if serving.cache.retrieval else None)
    paths = config.paths
    home = {"provenance": str(paths.provenance), "releases": str(paths.releases), "approvals": str(paths.approvals),
            "keys": str(paths.keys), "feedback": str(paths.feedback), "refusals": str(paths.refusals)}
    return Gateway.options(**deployment_options(serving.gateway)).bind(
        serving, registry, telemetry, config.governance, home, base_model, retriever, generator)


def base_model_path(config: TunefetchConfig) -> Path:
    path = config.base_model_dir
    if not (path / "config.json").is_file():
        raise UserError(f"serving.engine.model: no model at {path} (run `tunefetch demo` first or set the path)")
    return path


def check_engine_placement(engine: EngineConfig, generator: DeploymentOptions) -> None:
    """A GPU generator replica holds exactly the GPUs its engine shards the model over."""
    if generator.num_gpus and generator.num_gpus != engine.tensor_parallel_size:
        raise UserError(f"serving.generator.num_gpus ({generator.num_gpus:g}) must equal "
                        f"serving.engine.tensor_parallel_size ({engine.tensor_parallel_size}): each replica "
                        "shards the model over the GPUs it holds")


def engine_env(serving) -> dict[str, str]:
    """Environment vLLM reads at engine start, for the generator replica's runtime_env."""
    # The engine core runs inside the replica's process (no extra process per replica).
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not serving.generator.num_gpus:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(serving.engine.kv_cache_gib)
    return env


def app_builder(args: dict) -> Application:
    """Serve's `import_path` entry (`serving.app:app_builder`) for declarative deploys (KubeRay
    RayService): `args.config` is the public config; secrets come from the pod's TUNEFETCH_*
    environment (a Kubernetes Secret)."""
    config = config_from_mapping(args["config"])
    if not config.retrieval.milvus_uri:
        raise UserError("a declarative deploy needs retrieval.milvus_uri: Milvus Lite lives in one process's home")
    return build_app(config, MilvusAddress(config.retrieval.milvus_uri, config.retrieval.milvus_token))


def serve_config(config: TunefetchConfig) -> dict:
    """The Serve config (ServeDeploySchema) a RayService deploys, built from the same config as
    `tunefetch serve`: same deployments, resources and engine environment; no secrets and no
    machine-local home (the pod sets TUNEFETCH_HOME and the secrets in its environment)."""
    serving = config.serving
    check_engine_placement(serving.engine, serving.generator)
    deployments = [
        {"name": "Gateway", **deployment_options(serving.gateway)},
        {"name": "Retriever", **deployment_options(serving.retriever)},
        {"name": "Generator", **deployment_options(serving.generator, engine_env(serving))},
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": serving.port},
        "applications": [{
            "name": serving.app_name,
            "route_prefix": "/",
            "import_path": "serving.app:app_builder",
            "args": {"config": config.public_dump()},
            "deployments": deployments,
        }],
    }


def deployment_options(deployment: DeploymentOptions, env: dict[str, str] | None = None) -> dict:
    actor_options: dict = {"num_cpus": deployment.num_cpus}
    if deployment.num_gpus:
        actor_options["num_gpus"] = deployment.num_gpus
    if env:
        actor_options["runtime_env"] = {"env_vars": env}
    # Serve takes either a fixed replica count or an autoscaling policy, never both.
    replicas = ({"autoscaling_config": deployment.autoscaling.model_dump()} if deployment.autoscaling
                else {"num_replicas": deployment.num_replicas})
    return {
        **replicas,
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_queued_requests": deployment.max_queued_requests,
        "ray_actor_options": actor_options,
    }


def run_app(config: TunefetchConfig, milvus: MilvusAddress) -> str:
    """Deploys the app on the connected Ray cluster; returns the base URL once it answers."""
    check_exposure(config)
    serve.start(http_options={"host": config.serving.host, "port": config.serving.port})
    serve.run(build_app(config, milvus), name=config.serving.app_name, route_prefix="/")
    return config.local_url


def check_exposure(config: TunefetchConfig) -> None:
    """A server reachable from other machines must require API keys, unless told otherwise."""
    host = config.serving.host
    if host == "localhost" or config.serving.allow_unauthenticated:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass  # a host name: treated as reachable
    if not KeyRing(config.paths.keys).required():
        raise UserError(f"serving.host is {host}, reachable from other machines, and no API key exists: create one "
                        "with `tunefetch keys create --tenant NAME`, or set serving.allow_unauthenticated: true")
