"""The typed config: examples stay in sync with the defaults, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import TunefetchConfig, load_config
from cluster.errors import UserError
from training.config import load_train_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_serve_example_is_the_default_config_in_full():
    example = load_config(EXAMPLES / "serve.yaml")
    assert example.model_dump(exclude={"home"}) == TunefetchConfig().model_dump(exclude={"home"})


def test_train_example_is_valid_and_resolves_datasets():
    train = load_train_config(EXAMPLES / "train.yaml")
    assert train.name == "support" and all(spec.path.is_file() for spec in train.datasets)


@pytest.mark.parametrize("yaml_text, key", [
    ("serving: {port: 70000}", "serving.port"),
    ("retrieval: {chunk_tokens: 64, chunk_overlap: 64}", "retrieval.chunk_overlap"),
    ("telemetry: {exporter: jaeger}", "telemetry.exporter"),
    ("serving: {engine: {max_lora: 2}}", "serving.engine.max_lora"),
])
def test_config_errors_name_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(path)


def test_home_override_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("home: /somewhere\n")
    assert load_config(path, home=tmp_path).home == tmp_path.resolve()


def test_the_serve_config_for_kuberay_is_valid_and_builds_the_same_app(tmp_path, local_model):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from conftest import CLI
    from serving.app import app_builder

    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump({"retrieval": {"milvus_uri": "http://milvus:19530"},
                                      "serving": {"host": "0.0.0.0", "engine": {"model": str(local_model)},
                                                  "generator": {"num_replicas": 2, "num_gpus": 1, "num_cpus": 4}}}))
    out = CLI(tmp_path / "home")("serve", "--print-serve-config", "--config", str(config)).stdout
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out))  # Ray's own validation
    app = schema.applications[0]
    generator = next(d for d in app.deployments if d.name == "Generator")
    assert generator.num_replicas == 2 and generator.ray_actor_options.num_gpus == 1
    assert "VLLM_CPU_KVCACHE_SPACE" not in generator.ray_actor_options.runtime_env["env_vars"]
    assert isinstance(app_builder(app.args), Application)
    with pytest.raises(UserError, match="milvus_uri"):
        app_builder({"config": {}})


def test_the_vm_cluster_launcher_files_are_valid_for_ray_and_tunefetch():
    """cluster/launcher: Ray's own schema accepts the launcher YAML, tunefetch's config model the
    config every node reads, and the two agree on where state lives."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = Path(__file__).resolve().parents[1] / "cluster" / "launcher"
    cluster = yaml.safe_load((launcher / "aws.yaml").read_text())
    validate_config(prepare_config(cluster))
    config = load_config(launcher / "tunefetch.yaml")
    assert config.ray.address == "auto" and config.ray.storage_path.startswith("s3://")
    assert str(config.home).startswith("/mnt/shared/") and config.serving.generator.num_gpus == 1
    assert "/etc/tunefetch/tunefetch.yaml" in cluster["file_mounts"]
    assert any("/mnt/shared:/mnt/shared" in option for option in cluster["docker"]["run_options"])
