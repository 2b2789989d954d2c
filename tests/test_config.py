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
