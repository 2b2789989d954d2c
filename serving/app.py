"""Builds the Serve application from the one validated config.

gateway (ingress, FastAPI) --handle--> retriever (embedder + Milvus client)
                           --handle--> generator (vLLM engine, multi-LoRA)
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application

from cluster.config import DeploymentOptions, TunefetchConfig
from cluster.errors import UserError
from retrieval.milvus_endpoint import MilvusAddress
from serving.gateway import Gateway
from serving.generator import Generator, engine_env
from serving.retriever import Retriever
from training.local_model import model_identity


def build_app(config: TunefetchConfig, milvus: MilvusAddress) -> Application:
    serving = config.serving
    model_path = base_model_path(config)
    base_model = model_identity(model_path)
    on_gpu = serving.generator.num_gpus > 0
    generator = Generator.options(
        **_options(serving.generator, runtime_env={"env_vars": engine_env(serving.engine, on_gpu)})
    ).bind(config, str(model_path), base_model["id"])
    retriever = Retriever.options(**_options(serving.retriever)).bind(config, milvus)
    return Gateway.options(**_options(serving.gateway)).bind(config, retriever, generator, base_model)


def base_model_path(config: TunefetchConfig) -> Path:
    path = Path(config.serving.engine.model or config.paths.local_model)
    if not (path / "config.json").is_file():
        raise UserError(f"serving.engine.model: no model at {path} (run `tunefetch demo` first or set the path)")
    return path


def app_builder(args: dict) -> Application:
    """Serve's `import_path` entry (`serving.app:app_builder`) for declarative deploys (KubeRay
    RayService): `args.config` is the tunefetch config as a mapping."""
    config = TunefetchConfig.model_validate(args["config"])
    if not config.retrieval.milvus_uri:
        raise UserError("a declarative deploy needs retrieval.milvus_uri: Milvus Lite lives in one process's home")
    return build_app(config, MilvusAddress(config.retrieval.milvus_uri, config.retrieval.milvus_token))


def serve_config(config: TunefetchConfig) -> dict:
    """The Serve config (ServeDeploySchema) a RayService deploys, built from the same config as
    `tunefetch serve`: same deployments, resources and engine environment."""
    serving = config.serving
    on_gpu = serving.generator.num_gpus > 0
    deployments = [
        {"name": "Gateway", **_options(serving.gateway)},
        {"name": "Retriever", **_options(serving.retriever)},
        {"name": "Generator", **_options(serving.generator,
                                         runtime_env={"env_vars": engine_env(serving.engine, on_gpu)})},
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": serving.host, "port": serving.port},
        "applications": [{
            "name": serving.app_name,
            "route_prefix": "/",
            "import_path": "serving.app:app_builder",
            "args": {"config": config.model_dump(mode="json")},
            "deployments": deployments,
        }],
    }


def _options(deployment: DeploymentOptions, runtime_env: dict | None = None) -> dict:
    actor_options: dict = {"num_cpus": deployment.num_cpus}
    if deployment.num_gpus:
        actor_options["num_gpus"] = deployment.num_gpus
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    return {
        "num_replicas": deployment.num_replicas,
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_queued_requests": deployment.max_queued_requests,
        "ray_actor_options": actor_options,
    }


def run_app(config: TunefetchConfig, milvus: MilvusAddress) -> str:
    """Deploys the app on the connected Ray cluster; returns the base URL once it answers."""
    serve.start(http_options={"host": config.serving.host, "port": config.serving.port})
    serve.run(build_app(config, milvus), name=config.serving.app_name, route_prefix="/")
    return f"http://{config.serving.host}:{config.serving.port}"
