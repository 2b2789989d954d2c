"""The Helm chart, validated without a cluster: `helm lint --strict`, `helm template` of every
ci/ values file, every rendered object against Kubernetes' schemas (built-in kinds) and
KubeRay's CRD schemas (tests/schemas/kuberay), the RayService's serveConfigV2 against what
`tunefetch serve --print-serve-config` builds, and bad values refused with the reason."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tunefetch"
HELM = Path(sys.executable).parent / "helm"  # `make helm` puts it there
KUBE_VERSION = "1.31.0"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
# Kinds without a schema here: the prometheus-operator CRD is checked by hand below.
KUBERAY = {"RayService", "RayJob", "RayCluster"}
SECRET_KEYS = {"milvus_token", "access_key", "secret_key", "headers", "api_key"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode:
        raise AssertionError(f"helm {' '.join(args)}: {result.stderr}")
    return result


@cache
def render(values: Path | None = None, *sets: str) -> tuple[dict, ...]:
    args = ["template", "rel", str(CHART), "--namespace", "ml", "--kube-version", KUBE_VERSION]
    args += ["-f", str(values)] if values else []
    for item in sets:
        args += ["--set", item]
    return tuple(d for d in yaml.safe_load_all(helm(*args).stdout) if d)


def objects(values: Path, kind: str) -> list[dict]:
    return [o for o in render(values) if o["kind"] == kind]


def serve_config(values: Path) -> dict:
    (service,) = objects(values, "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


@cache
def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    crd = json.loads((Path(__file__).parent / "schemas" / "kuberay" / f"{kind.lower()}.json").read_text())
    return jsonschema.Draft202012Validator(_strict(crd["schema"]))


def _strict(schema):
    """The CRD's schema with unknown fields refused (the API server would silently prune them:
    a typo in a template would vanish instead of failing)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    return schema


def validate(obj: dict) -> None:
    if obj["kind"] in KUBERAY:
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=str)
        assert not errors, f"{obj['kind']}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
    elif obj["kind"] == "ServiceMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]["endpoints"]
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the object makes."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        return [(obj["metadata"]["name"], spec)]
    if obj["kind"] in {"StatefulSet", "Deployment"}:
        return [(obj["metadata"]["name"], spec["template"]["spec"])]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
    if cluster is None:
        return []
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(f"{obj['metadata']['name']}/{name}", group["template"]["spec"]) for name, group in groups]


# -- every values file ------------------------------------------------------------------------

@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_each_values_file_lints_strictly_and_renders_valid_objects(values):
    lint = helm("lint", "--strict", str(CHART), "-f", str(values), "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in lint.stdout
    rendered = render(values)
    assert {"RayService", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= {o["kind"] for o in rendered}
    for obj in rendered:
        validate(obj)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_every_container_has_resources_probes_and_no_nested_mounts(values):
    for obj in render(values):
        is_test_hook = obj["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
        for where, pod in pod_specs(obj):
            for container in pod["containers"]:
                resources = container.get("resources", {})
                assert {"cpu", "memory"} <= set(resources.get("requests", {})) <= set(resources.get("limits", {})), where
                if not is_test_hook:  # a run-to-completion pod has nothing to probe
                    assert container.get("readinessProbe") and container.get("livenessProbe"), where
                mounts = sorted(m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", []))
                for outer, inner in zip(mounts, mounts[1:]):  # a mount inside a Secret or ConfigMap fails
                    assert not inner.startswith(outer), f"{where}: {inner} inside {outer}"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_the_serve_config_is_what_tunefetch_builds_from_the_same_config(values, tmp_path):
    """serveConfigV2 equals `tunefetch serve --print-serve-config` for the config it carries
    (deployments, replicas, autoscaling, resources, engine environment), key for key."""
    rendered = serve_config(values)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(rendered["applications"][0]["args"]["config"]))
    cli = subprocess.run([str(Path(sys.executable).parent / "tunefetch"), "--home", str(tmp_path / "home"), "serve",
                          "--print-serve-config", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    expected = yaml.safe_load(cli.stdout)
    ServeDeploySchema.model_validate(expected)  # and Ray Serve takes it (autoscaling, resources)
    # Helm drops null values (a null in values deletes the key); tunefetch fills them in again.
    rendered["applications"][0]["args"]["config"] = expected["applications"][0]["args"]["config"]
    assert rendered == expected


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_no_secret_value_reaches_a_manifest(values):
    """Secrets reach pods only as secretKeyRefs; the Serve config carries none of their keys."""
    args = serve_config(values)["applications"][0]["args"]["config"]
    assert not SECRET_KEYS & set(_keys(args))
    for obj in render(values):
        for where, pod in pod_specs(obj):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if re.search(r"TOKEN|KEY|SECRET|HEADERS|PASSWORD", env["name"]):
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{where}: {env['name']}"
        assert obj["kind"] != "Secret", "the chart never writes a Secret: it reads existing ones"


def _keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keys(item)


# -- what each optional path renders ------------------------------------------------------------

def test_the_cpu_path_serves_from_cpu_workers_with_the_bundled_milvus_and_keys_from_a_secret():
    values = CHART / "ci" / "cpu-values.yaml"
    config = serve_config(values)["applications"][0]
    args = config["args"]["config"]
    assert args["retrieval"]["milvus_uri"] == "http://rel-tunefetch-milvus:19530"
    assert args["serving"]["keys_file"] == "/etc/tunefetch/keys/keys.json"
    generator = next(d for d in config["deployments"] if d["name"] == "Generator")
    assert generator["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "4"
    (service,) = objects(values, "RayService")
    groups = {g["groupName"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups == {"cpu"} and objects(values, "StatefulSet")
    keys_volume = next(v for _, pod in pod_specs(service) for v in pod["volumes"] if v["name"] == "api-keys")
    assert keys_volume["secret"]["secretName"] == "tunefetch-keys"
    (test_pod,) = objects(values, "Pod")
    assert test_pod["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "test-token"


def test_the_gpu_path_puts_generators_on_gpu_workers_and_autoscales_them():
    values = CHART / "ci" / "gpu-values.yaml"
    config = serve_config(values)["applications"][0]
    generator = next(d for d in config["deployments"] if d["name"] == "Generator")
    assert generator["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in generator
    assert generator["autoscaling_config"]["max_replicas"] == 4
    assert "VLLM_CPU_KVCACHE_SPACE" not in generator["ray_actor_options"]["runtime_env"]["env_vars"]
    (service,) = objects(values, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and "nvidia.com/gpu.product" in pod["nodeSelector"]
    assert pod["containers"][0]["image"].endswith("-gpu") and (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)


def test_the_external_milvus_path_takes_its_uri_and_every_secret_from_secrets():
    values = CHART / "ci" / "external-milvus-values.yaml"
    args = serve_config(values)["applications"][0]["args"]["config"]
    assert args["retrieval"]["milvus_uri"] == "http://milvus.vector-db.svc:19530"
    assert args["registry"]["uri"].startswith("s3://") and args["telemetry"]["exporter"] == "otlp"
    assert not objects(values, "StatefulSet")
    (service,) = objects(values, "RayService")
    env = {e["name"]: e for e in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("TUNEFETCH_RETRIEVAL__MILVUS_TOKEN", "TUNEFETCH_REGISTRY__ACCESS_KEY", "TUNEFETCH_REGISTRY__SECRET_KEY",
                 "TUNEFETCH_TELEMETRY__HEADERS"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "tunefetch-secrets"
    (policy, *_) = objects(values, "NetworkPolicy")
    serve, metrics = policy["spec"]["ingress"][1:]
    assert serve["ports"][0]["port"] == 8000 and serve["from"][0]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": "apps"}
    assert metrics["ports"][0]["port"] == 8080 and metrics["from"][0]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": "monitoring"}


def test_the_bundled_milvus_path_is_reachable_only_from_the_release_and_scraped_with_a_key():
    values = CHART / "ci" / "bundled-milvus-values.yaml"
    (milvus,) = objects(values, "StatefulSet")
    assert milvus["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    policies = {p["metadata"]["name"]: p for p in objects(values, "NetworkPolicy")}
    assert policies["rel-tunefetch-milvus"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    (monitor,) = objects(values, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"]["key"] == "scrape-token"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar():
    (config_map,) = [c for c in objects(CHART / "ci" / "cpu-values.yaml", "ConfigMap")
                     if c["metadata"]["name"] == "rel-tunefetch-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "tunefetch.json").read_text())
    assert json.loads(config_map["data"]["tunefetch.json"]) == shipped


def test_the_training_path_runs_tunefetch_train_as_a_rayjob_with_shared_checkpoints():
    from training.config import TrainConfig

    values = CHART / "ci" / "training-values.yaml"
    (job,) = objects(values, "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("tunefetch train /etc/tunefetch/train/train.yaml --config /etc/tunefetch/train/")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2 and workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    config_map = next(c for c in objects(values, "ConfigMap") if c["metadata"]["name"] == job["metadata"]["name"])
    train = TrainConfig.model_validate(yaml.safe_load(config_map["data"]["train.yaml"]))  # what `train` reads
    assert train.deepspeed.zero_stage == 3 and train.precision == "bf16"
    config = yaml.safe_load(config_map["data"]["tunefetch.yaml"])
    assert config["ray"]["storage_path"] == "s3://ml-checkpoints/tunefetch" and config["registry"]["uri"].startswith("s3://")
    assert not any(o["kind"] == "RayJob" for o in render(CHART / "ci" / "cpu-values.yaml"))


# -- bad values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sets, message", [
    (["image.variant=tpu"], "variant"),
    (["config.serving.port=70000"], "port"),
    (["config.serving.engine.max_lora=2"], "max_lora"),
    (["config.retrieval.milvus_token=hunter2"], "milvus_token"),  # secrets are never values
    (["milvus.external.uri=ftp://x"], "uri"),
    (["ray.workers.cpu.resources.limits=null"], "limits"),
    (["home.mountPath=relative"], "mountPath"),
    (["unknownSection.x=1"], "unknownSection"),
])
def test_bad_values_fail_with_the_schema_message(sets, message):
    args = ["template", "rel", str(CHART), "--set", "apiKeys.existingSecret=k"]
    for item in sets:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr


def test_what_the_schema_cannot_judge_tunefetch_refuses_at_deploy():
    from cluster.config import config_from_mapping
    from cluster.errors import UserError

    rendered = render(None, "apiKeys.existingSecret=k", "config.serving.generator.autoscaling.min_replicas=5",
                      "config.serving.generator.autoscaling.max_replicas=2")
    (service,) = [o for o in rendered if o["kind"] == "RayService"]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    with pytest.raises(UserError, match="min_replicas"):
        config_from_mapping(args["config"])


@pytest.mark.parametrize("sets, message", [
    ([], "apiKeys.existingSecret: the API is reachable"),
    (["apiKeys.existingSecret=k", "milvus.external.uri=http://m:19530"], "not both"),
    (["apiKeys.existingSecret=k", "ray.workers.gpu.enabled=true"], "image.variant: gpu"),
    (["apiKeys.existingSecret=k", "config.serving.generator.num_gpus=2", "ray.workers.gpu.enabled=true",
      "image.variant=gpu"], "tensor_parallel_size"),
    (["apiKeys.existingSecret=k", "training.enabled=true"], "training.train"),
    (["apiKeys.existingSecret=k", "metrics.serviceMonitor.enabled=true"], "bearerTokenSecret"),
])
def test_values_that_cannot_serve_fail_with_the_reason(sets, message):
    args = ["template", "rel", str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_validators_themselves_refuse_a_typo():
    """The checks above can fail: a misspelt field is caught in a KubeRay and a built-in object."""
    service, = objects(CHART / "ci" / "cpu-values.yaml", "RayService")
    bad = json.loads(json.dumps(service))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        validate(bad)
    milvus, = objects(CHART / "ci" / "cpu-values.yaml", "StatefulSet")
    bad = json.loads(json.dumps(milvus))
    bad["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


# -- the chart's documentation ---------------------------------------------------------------------

def test_values_and_schema_follow_the_config_model():
    """values.yaml's `config` block and the schema's `config` are generated from the config model
    (helm/sync_config.py); a changed model without a re-run fails here."""
    result = subprocess.run([sys.executable, str(ROOT / "helm" / "sync_config.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    from cluster.config import TunefetchConfig

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    assert set(_keys(defaults)) == set(_keys(TunefetchConfig().public_dump()))


def test_every_value_is_commented():
    """Each key of values.yaml outside `config` (documented by the config model) has a comment on
    its line, just above it, or on the line of the section holding it."""
    lines = (CHART / "values.yaml").read_text().split("# BEGIN config")[0].splitlines()
    commented: dict[int, bool] = {}  # indent -> is the current section at that indent commented
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        has = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        inherited = any(v for k, v in commented.items() if k < indent)
        commented = {k: v for k, v in commented.items() if k < indent} | {indent: has}
        if not (has or inherited):
            undocumented.append(line.strip())
    assert not undocumented, undocumented


def test_notes_name_the_next_commands():
    notes = helm("install", "rel", str(CHART), "--dry-run=client", "--set", "apiKeys.existingSecret=k").stdout
    assert "kubectl -n default port-forward svc/rel-tunefetch 8000:8000" in notes
    assert "helm test rel" in notes and "Authorization: Bearer" in notes
