"""The adapter registry on a local directory and on S3 (a real S3 API server on 127.0.0.1)."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import CLI, ROOT, free_port, lineage, s3_uri


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    from training.registry import AdapterRegistry

    if request.param == "local":
        return AdapterRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache")
    return AdapterRegistry(s3_uri(request.getfixturevalue("s3_endpoint"), uuid.uuid4().hex),
                           cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def trained(home, adapter) -> Path:
    """The files of the suite's trained adapter (support@v1)."""
    from training.registry import AdapterRegistry

    registry = AdapterRegistry(home / "adapters")
    return registry.local_dir(registry.get(adapter))


def test_versions_are_numbered_in_order_and_never_change(registry, trained):
    from training.registry import files_hash

    v1 = registry.register("support", trained, lineage("run-1"))
    v2 = registry.register("support", trained, lineage("run-2"))
    assert (v1.ref, v2.ref) == ("support@v1", "support@v2")
    assert registry.get("support").ref == "support@v2" and registry.names() == ["support"]
    again = registry.get("support@v1")
    assert again.record.run_id == "run-1" and again.content_hash == files_hash(trained, ("adapter_config.json",
                                                                                     "adapter_model.safetensors"))
    assert "# Adapter support@v1" in registry.read_text(again.location, "MODEL_CARD.md")
    assert files_hash(registry.local_dir(again), ("adapter_model.safetensors",)) == \
        files_hash(trained, ("adapter_model.safetensors",))


def test_a_version_that_never_committed_is_invisible_and_its_number_unused(registry, trained):
    from cluster.errors import NotFound

    version, location = registry._claim("support")  # a run that died after claiming v1...
    registry._write(f"{location}/adapter_model.safetensors", b"half")  # ...and writing part of it
    assert registry.versions("support") == [] and registry.names() == []
    with pytest.raises(NotFound):
        registry.get(f"support@v{version}")
    assert registry.register("support", trained, lineage()).version == version + 1


def test_concurrent_registrations_get_distinct_committed_versions(registry, trained):
    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda i: registry.register("race", trained, lineage(f"run-{i}")), range(6)))
    numbers = [v.version for v in versions]
    assert len(set(numbers)) == 6 and sorted(numbers) == registry.versions("race")
    for v in versions:  # each number holds the record of the run that won it
        assert registry.get(v.ref).record.run_id == v.record.run_id


def test_a_remote_version_whose_bytes_changed_is_refused(s3_endpoint, trained, tmp_path):
    from training.registry import AdapterRegistry

    uri = s3_uri(s3_endpoint, uuid.uuid4().hex)
    version = AdapterRegistry(uri, cache_dir=tmp_path / "a").register("support", trained, lineage())
    tampered = AdapterRegistry(uri, cache_dir=tmp_path / "b")
    with tampered.fs.open_output_stream(f"{version.location}/adapter_model.safetensors") as out:
        out.write(b"not the weights that were registered")
    with pytest.raises(RuntimeError, match="does not match its content hash"):
        tampered.local_dir(tampered.get(version.ref))
    assert not list((tmp_path / "b").rglob("adapter_model.safetensors"))  # nothing half-cached


def s3_config(tmp_path: Path, uri: str) -> Path:
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump({"registry": {"uri": uri}}))
    return path


def test_cli_lists_and_shows_an_s3_registry(cli, s3_endpoint, trained, tmp_path):
    from training.registry import AdapterRegistry

    uri = s3_uri(s3_endpoint, uuid.uuid4().hex)
    from training.registry import AdapterRecord, TrainingLineage

    record = AdapterRecord.model_validate_json((trained / "metadata.json").read_text())
    AdapterRegistry(uri).register("support", trained, TrainingLineage.model_validate(record.model_dump()))
    s3_cli = CLI(cli.home, s3_config(tmp_path, uri))
    listing = s3_cli("adapters", "list").stdout
    assert "support@v1" in listing and "tiny-llama" in listing
    assert json.loads(s3_cli("adapters", "show", "support", "--json").stdout)["ref"] == "support@v1"
    assert "# Adapter support@v1" in s3_cli("adapters", "show", "support").stdout


def test_an_unreachable_registry_fails_training_before_it_starts(cli, tmp_path):
    uri = s3_uri(f"127.0.0.1:{free_port()}", "nowhere")
    proc = CLI(cli.home, s3_config(tmp_path, uri))("train", str(ROOT / "examples" / "train.yaml"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "registry.uri: cannot read" in lines[0], proc.stderr
    assert "secret" not in proc.stderr  # credentials never reach the terminal
