"""Bad input to every CLI verb: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import pytest

from conftest import CLI, SAMPLE


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> CLI:
    """A CLI on an empty home: nothing ingested, trained or served."""
    return CLI(tmp_path_factory.mktemp("bare-home"))


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tunefetch: error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_ingest_missing_path(bare):
    assert_one_line_error(bare("ingest", "no/such/dir", "--kb", "docs", check=False), "no/such/dir")


def test_ingest_invalid_store_name(bare):
    assert_one_line_error(bare("ingest", str(SAMPLE / "docs"), "--kb", "bad name!", check=False), "bad name!")


def test_ingest_without_kb_flag(bare):
    assert_one_line_error(bare("ingest", str(SAMPLE / "docs"), check=False), "--kb")


def test_unknown_store(bare):
    assert_one_line_error(bare("kb", "versions", "nothere", check=False), "nothere")
    assert_one_line_error(bare("search", "returns", "--kb", "nothere", check=False), "nothere")
    assert_one_line_error(bare("kb", "rollback", "nothere", check=False), "nothere")


def test_search_filter_on_unknown_field(bare):
    assert_one_line_error(bare("search", "x", "--kb", "k", "--where", "text=1", check=False), "text")


def test_train_missing_config(bare):
    assert_one_line_error(bare("train", "missing.yaml", check=False), "missing.yaml")


def test_train_malformed_config_names_the_key(bare, tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("name: support\ndatasets: [{path: x.jsonl}]\nlora: {rank: 8}\n")
    assert_one_line_error(bare("train", str(bad), check=False), "lora.rank")
    bad.write_text("name: support\ndatasets: [{path: nothere.jsonl}]\n")
    assert_one_line_error(bare("train", str(bad), check=False), "nothere.jsonl")
    bad.write_text("name: [unclosed\n")
    assert_one_line_error(bare("train", str(bad), check=False), "YAML")


def test_train_bad_dataset_rows(bare, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n{"prompt": "missing fields"}\n')
    config = tmp_path / "train.yaml"
    config.write_text(f"name: support\ndatasets: [{{path: {data}}}]\n")
    assert_one_line_error(bare("train", str(config), check=False), "rows.jsonl:2")


def test_unknown_adapter(bare):
    assert_one_line_error(bare("adapters", "show", "nothere@v3", check=False), "nothere")
    assert_one_line_error(bare("adapters", "show", "Bad Ref", check=False), "Bad Ref")


def test_query_without_server(bare):
    assert_one_line_error(bare("query", "hello", "--url", "http://127.0.0.1:9", check=False), "no tunefetch server")


def test_provenance_unknown_id(bare):
    assert_one_line_error(bare("provenance", "show", "prov-nope", check=False), "prov-nope")
    assert_one_line_error(bare("provenance", "refusals", "--limit", "0", check=False), "--limit")


def test_malformed_tunefetch_config(bare, tmp_path):
    config = tmp_path / "tunefetch.yaml"
    config.write_text("serving:\n  engine:\n    max_loras: zero\n")
    assert_one_line_error(bare("serve", "--config", str(config), check=False), "serving.engine.max_loras")
    config.write_text("retrievl: {}\n")
    assert_one_line_error(bare("kb", "list", "--config", str(config), check=False), "retrievl")


def test_serve_without_model(bare):
    assert_one_line_error(bare("serve", check=False), "serving.engine.model")


def test_unknown_command(bare):
    assert_one_line_error(bare("frobnicate", check=False), "frobnicate")
