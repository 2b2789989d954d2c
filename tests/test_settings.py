"""Settings a platform team injects: every key from the environment, TUNEFETCH_CONFIG, secrets
that never print, and the standard OTEL_* variables."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from cluster.config import TunefetchConfig, load_config
from cluster.errors import UserError
from conftest import ROOT, TUNEFETCH

SECRET = "s3cr3t-value-that-must-never-print"


def run(*args: str, env: dict, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([TUNEFETCH, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, **env})


def test_environment_overrides_the_file_and_flags_override_both(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("serving: {port: 9100, engine: {max_loras: 3}}\nretrieval: {top_k: 4}\n")
    monkeypatch.setenv("TUNEFETCH_SERVING__PORT", "9200")
    monkeypatch.setenv("TUNEFETCH_SERVING__ENGINE__MAX_LORAS", "5")
    config = load_config(path)
    assert (config.serving.port, config.serving.engine.max_loras, config.retrieval.top_k) == (9200, 5, 4)
    assert load_config(path, serving={"port": 9300}).serving.port == 9300


def test_tunefetch_config_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("serving: {port: 9400}\n")
    monkeypatch.setenv("TUNEFETCH_CONFIG", str(path))
    assert load_config().serving.port == 9400


@pytest.mark.parametrize("name, value, key", [
    ("TUNEFETCH_SERVING__PORT", "not-a-port", "serving.port"),
    ("TUNEFETCH_RETRIEVAL__TOP_K", "0", "retrieval.top_k"),
])
def test_bad_environment_values_name_the_key(monkeypatch, name, value, key):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config()


def test_secrets_are_secret_strings_and_never_dumped(monkeypatch):
    monkeypatch.setenv("TUNEFETCH_RETRIEVAL__MILVUS_TOKEN", SECRET)
    monkeypatch.setenv("TUNEFETCH_REGISTRY__SECRET_KEY", SECRET)
    monkeypatch.setenv("TUNEFETCH_TELEMETRY__HEADERS", f"authorization=Bearer {SECRET}")
    config = load_config()
    assert config.retrieval.milvus_token.get_secret_value() == SECRET
    for text in (repr(config), str(config), str(config.public_dump()), config.model_dump_json()):
        assert SECRET not in text


def test_print_serve_config_has_no_secrets_no_home_and_binds_all_interfaces(tmp_path):
    env = {"TUNEFETCH_RETRIEVAL__MILVUS_URI": "http://milvus:19530", "TUNEFETCH_RETRIEVAL__MILVUS_TOKEN": SECRET,
           "TUNEFETCH_REGISTRY__ACCESS_KEY": SECRET, "TUNEFETCH_REGISTRY__SECRET_KEY": SECRET,
           "TUNEFETCH_TELEMETRY__HEADERS": f"x-api-key={SECRET}", "TUNEFETCH_SERVING__PORT": "9500"}
    home = tmp_path / "machine-local-home"
    proc = run("serve", "--print-serve-config", "--home", str(home), env=env)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr and str(home) not in proc.stdout
    app = yaml.safe_load(proc.stdout)
    assert app["http_options"] == {"host": "0.0.0.0", "port": 9500}
    config = app["applications"][0]["args"]["config"]
    assert "home" not in config and "milvus_token" not in config["retrieval"]
    assert config["retrieval"]["milvus_uri"] == "http://milvus:19530"


def test_the_pod_reads_its_secrets_from_the_environment(monkeypatch):
    from cluster.config import config_from_mapping

    public = TunefetchConfig().public_dump()
    monkeypatch.setenv("TUNEFETCH_RETRIEVAL__MILVUS_TOKEN", SECRET)
    assert config_from_mapping(public).retrieval.milvus_token.get_secret_value() == SECRET


def test_standard_otel_variables_apply_unless_the_config_sets_the_key(monkeypatch):
    from cluster.telemetry import exporter_kind, otlp_protocol

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert exporter_kind(load_config().telemetry) == "otlp"
    assert otlp_protocol(load_config().telemetry) == "http/protobuf"
    monkeypatch.setenv("TUNEFETCH_TELEMETRY__EXPORTER", "console")
    monkeypatch.setenv("TUNEFETCH_TELEMETRY__PROTOCOL", "grpc")
    assert exporter_kind(load_config().telemetry) == "console" and otlp_protocol(load_config().telemetry) == "grpc"


def test_otel_service_name_and_sampler_reach_the_tracer_provider(tmp_path):
    script = ("from cluster.config import load_config; from cluster.telemetry import setup_tracing;"
              "from opentelemetry import trace; setup_tracing(load_config().telemetry, 'test');"
              "p = trace.get_tracer_provider(); print(p.resource.attributes['service.name'], p.sampler.get_description())")
    env = {**os.environ, "OTEL_SERVICE_NAME": "rag-prod", "OTEL_TRACES_SAMPLER": "traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "rag-prod" and "0.25" in out.stdout
