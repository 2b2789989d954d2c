"""The system card: what a running deployment serves, rendered for people and for SBOM tools.

Pure functions of one `facts` dict (collected by the gateway; any key may be missing or None),
so the card can be rendered, hashed and checked without a cluster:

- `render_markdown(facts)`: the card people read.
- `render_cyclonedx(facts)`: the same facts as a CycloneDX 1.6 ML-BOM (JSON), for audit tooling.
- `card_hash(facts)`: sha256 of the canonical facts without `generated_at`, so two cards of an
  unchanged deployment hash alike and any change of what is served changes the hash.

Owners, intended use, limitations, ethical considerations and contact cannot be derived from the
deployment: they come from `facts["human"]` (the YAML of governance.card_file). A missing one is
shown as such in the Markdown and listed under `tunefetch:human.missing` in the BOM, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from urllib.parse import quote

SPEC_VERSION = "1.6"
HUMAN_FIELDS = {  # facts["human"] key -> Markdown section title
    "owners": "Owners",
    "intended_use": "Intended use",
    "limitations": "Limitations",
    "ethical_considerations": "Ethical considerations",
    "contact": "Contact",
}
NOT_WRITTEN = "_not written yet: set it in the card file (governance.card_file)_"
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


# -- reading facts that may be partial --------------------------------------------------------------
def _d(value) -> dict:
    """A dict whatever the facts hold there: a missing or malformed section renders as empty."""
    return value if isinstance(value, dict) else {}


def _items(value) -> list[dict]:
    """The dict entries of a list-valued fact; None, scalars and stray entries are skipped."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, (list, tuple)) else []


def _iso(value) -> str | None:
    """RFC 3339 UTC (`...Z`) from epoch seconds or an ISO string; None when it is neither, so a
    bad timestamp drops out instead of failing the schema's date-time format."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, timezone.utc)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value.strip())
            moment = moment.replace(tzinfo=moment.tzinfo or timezone.utc).astimezone(timezone.utc)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _str(value) -> str | None:
    """A fact as BOM text: booleans lowercase, containers as compact JSON, None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _lines(value) -> list[str]:
    """A human field as a list of non-empty texts (the card file may hold a string or a list)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def _known(value) -> str:
    return "?" if value is None else str(value)


def _short(digest) -> str:
    return digest[:12] if isinstance(digest, str) and digest else "-"


def card_hash(facts: dict | None) -> str:
    """sha256 of the facts as canonical JSON (sorted keys, no whitespace) without `generated_at`:
    the identity of what is deployed, independent of when the card was rendered."""
    rest = {k: v for k, v in _d(facts).items() if k != "generated_at"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- Markdown -----------------------------------------------------------------------------------------
def _cell(value) -> str:
    """A table cell: '-' for nothing, pipes escaped and newlines folded so rows stay rows."""
    text = "-" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    if not rows:
        return ["_none_"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _bullets(pairs: dict) -> list[str]:
    shown = [f"- {k}: `{v}`" for k, v in pairs.items() if v is not None and v != ""]
    return shown or ["_none_"]


def _approval_state(approval: dict) -> str:
    return "valid" if approval.get("valid") else f"invalid: {approval.get('reason') or 'no reason given'}"


def _approval_text(approval) -> str:
    approval = _d(approval)
    if not approval:
        return "not approved"
    return f"{approval.get('approval_id') or '?'} by {approval.get('approved_by') or '?'} ({_approval_state(approval)})"


def _md_base(base: dict) -> list[str]:
    return ["## Base model", *_bullets(base)]


def _md_adapters(adapters: list[dict]) -> list[str]:
    rows = [[a.get("ref"), a.get("role"), _short(a.get("content_hash")), _d(a.get("dataset")).get("rows"),
             _approval_text(a.get("approval"))] for a in adapters]
    return ["## Adapters", *_table(["ref", "role", "hash", "dataset rows", "approval"], rows)]


def _md_eval_rows(adapter: dict) -> list[list]:
    """One row per metric: training metrics, then the approval's eval results against thresholds."""
    approval = _d(adapter.get("approval"))
    thresholds, results = _d(approval.get("thresholds")), _d(approval.get("results"))
    rows = [[adapter.get("ref"), name, value, "-", "training"] for name, value in
            sorted(_d(adapter.get("metrics")).items())]
    for name in sorted(set(results) | set(thresholds)):
        rows.append([adapter.get("ref"), name, results.get(name), thresholds.get(name), "evaluation"])
    return rows


def _md_approval_row(adapter: dict) -> list:
    approval = _d(adapter.get("approval"))
    return [adapter.get("ref"), approval.get("approval_id"), approval.get("approved_by"),
            _iso(approval.get("approved_at")), _iso(approval.get("expires_at")), _approval_state(approval),
            _short(approval.get("eval_report_sha256"))]


def _md_evaluation(adapters: list[dict]) -> list[str]:
    rows = [row for a in adapters for row in _md_eval_rows(a)]
    approvals = [_md_approval_row(a) for a in adapters if _d(a.get("approval"))]
    return ["## Evaluation & approvals", *_table(["adapter", "metric", "value", "threshold", "kind"], rows), "",
            *_table(["adapter", "approval", "by", "at", "expires", "state", "eval report"], approvals)]


def _md_stores(stores: list[dict]) -> list[str]:
    rows = [[s.get("name"), s.get("version"), s.get("collection"), s.get("documents"), s.get("chunks"),
             ", ".join(_lines(s.get("sources"))) or None] for s in stores]
    return ["## Knowledge stores", *_table(["name", "version", "collection", "documents", "chunks", "sources"], rows)]


def _md_canaries(canaries: list[dict]) -> list[str]:
    def decision(c):
        last = _d(c.get("last_decision"))
        return f"{last.get('action')}: {last.get('reason') or ''} ({_iso(last.get('at')) or '?'})" if last else None
    rows = [[c.get("name"), c.get("stable"), c.get("candidate"), c.get("weight"), c.get("state"), decision(c)]
            for c in canaries]
    return ["## Canary", *_table(["name", "stable", "candidate", "weight", "state", "last decision"], rows)]


def _md_human(human: dict) -> list[str]:
    out = []
    for key, title in HUMAN_FIELDS.items():
        texts = _lines(human.get(key))
        body = [NOT_WRITTEN] if not texts else texts if len(texts) == 1 else [f"- {t}" for t in texts]
        out += [f"## {title}", *body, ""]
    return out


def render_markdown(facts: dict | None) -> str:
    """The card for people: every section is always present, so a missing fact reads as missing."""
    facts = _d(facts)
    base, adapters = _d(facts.get("base_model")), _items(facts.get("adapters"))
    software = sorted(_d(facts.get("software")).items())
    sections = [
        [f"# System card: {base.get('id') or 'unknown base model'}",
         f"Generated {facts.get('generated_at') or '-'} by tunefetch {facts.get('tunefetch_version') or '-'}.",
         f"Card hash: `{card_hash(facts)}`"],
        _md_base(base), _md_adapters(adapters), _md_evaluation(adapters),
        _md_stores(_items(facts.get("knowledge_stores"))), _md_canaries(_items(facts.get("canaries"))),
        ["## Guards", *_bullets(_d(facts.get("guards")))], ["## Telemetry", *_bullets(_d(facts.get("telemetry")))],
        ["## Software", *_table(["package", "version"], [list(kv) for kv in software])],
    ]
    body = "\n\n".join("\n".join(s) for s in sections)
    return body + "\n\n" + "\n".join(_md_human(_d(facts.get("human")))).rstrip() + "\n"


# -- CycloneDX 1.6 ------------------------------------------------------------------------------------
def _props(prefix: str, values: dict) -> list[dict]:
    """`tunefetch:` properties (CycloneDX values are strings); None values are left out."""
    return [{"name": f"tunefetch:{prefix}{k}", "value": _str(v)} for k, v in values.items() if v is not None]


def _hashes(digest) -> list[dict]:
    """A SHA-256 hash entry only for a real hex digest: the schema rejects anything else."""
    return [{"alg": "SHA-256", "content": digest.lower()}] if isinstance(digest, str) and _SHA256.match(digest) else []


def _component(kind: str, name, ref: str, **fields) -> dict:
    """A component with its empty fields dropped (the schema rejects empty strings and nulls)."""
    comp = {"type": kind, "bom-ref": ref, "name": str(name) if name not in (None, "") else "unknown"}
    return comp | {k.replace("_", "-"): v for k, v in fields.items() if v not in (None, "", [], {})}


def _base_ref(base: dict) -> str:
    return f"model:{base.get('id') or 'unknown'}"


def _metrics(values: dict, slice_: str | None = None) -> list[dict]:
    return [{"type": str(k), "value": _str(v)} | ({"slice": slice_} if slice_ else {})
            for k, v in sorted(values.items()) if v is not None]


def _considerations(human: dict) -> dict:
    """The human-written fields that CycloneDX's model card has places for."""
    return {k: v for k, v in {
        "useCases": _lines(human.get("intended_use")),
        "technicalLimitations": _lines(human.get("limitations")),
        "ethicalConsiderations": [{"name": t} for t in _lines(human.get("ethical_considerations"))],
    }.items() if v}


def _base_component(base: dict, adapters: list[dict], human: dict) -> dict:
    """The base model with a model card: its parameters, every adapter's eval results (sliced by
    adapter ref, as the system is evaluated through its adapters) and the human considerations."""
    evals = [m for a in adapters for m in _metrics(_d(_d(a.get("approval")).get("results")), _str(a.get("ref")))]
    params = {"task": "text-generation"} | ({"modelArchitecture": str(base["architecture"])}
                                             if base.get("architecture") else {})
    card = {"modelParameters": params, "quantitativeAnalysis": {"performanceMetrics": evals} if evals else None,
            "considerations": _considerations(human) or None}
    return _component("machine-learning-model", base.get("id"), _base_ref(base), hashes=_hashes(base.get("sha256")),
                      modelCard={k: v for k, v in card.items() if v},
                      properties=_props("", {k: v for k, v in base.items() if k != "id"}))


def _adapter_props(adapter: dict) -> list[dict]:
    approval, dataset = _d(adapter.get("approval")), _d(adapter.get("dataset"))
    lineage = {"adapter.ref": adapter.get("ref"), "role": adapter.get("role"), "run_id": adapter.get("run_id"),
               "trace_id": adapter.get("trace_id"), "author": adapter.get("author"),
               "created_at": _iso(adapter.get("created_at")), "content_hash": adapter.get("content_hash"),
               "dataset.sha256": dataset.get("sha256"), "dataset.rows": dataset.get("rows")}
    approved = {"approval.id": approval.get("approval_id"), "approval.approved_by": approval.get("approved_by"),
                "approval.approved_at": _iso(approval.get("approved_at")),
                "approval.expires_at": _iso(approval.get("expires_at")), "approval.valid": approval.get("valid"),
                "approval.reason": approval.get("reason") or None,
                "approval.eval_report_sha256": approval.get("eval_report_sha256"), "approval.kb": approval.get("kb")}
    thresholds = {f"approval.threshold.{k}": v for k, v in sorted(_d(approval.get("thresholds")).items())}
    hyper = {f"hyperparameter.{k}": v for k, v in sorted(_d(adapter.get("hyperparameters")).items())}
    return _props("", lineage | approved | thresholds | hyper) + (
        [] if approval else [{"name": "tunefetch:approval.id", "value": "none"}])


def _adapter_component(adapter: dict, base: dict) -> dict:
    """A LoRA adapter: its own hash, lineage as properties and the base model as its ancestor."""
    own_base = _d(adapter.get("base_model")) or base
    # No bom-ref: the base model's is on its own component, and bom-refs are unique per BOM.
    ancestor = {"type": "machine-learning-model", "name": str(own_base.get("id") or "unknown")} | (
        {"hashes": _hashes(own_base.get("sha256"))} if _hashes(own_base.get("sha256")) else {})
    metrics = _metrics(_d(adapter.get("metrics"))) + _metrics(_d(_d(adapter.get("approval")).get("results")))
    card = {"modelParameters": {"approach": {"type": "supervised"}, "task": "text-generation",
                                "architectureFamily": "LoRA adapter"}} | (
        {"quantitativeAnalysis": {"performanceMetrics": metrics}} if metrics else {})
    return _component("machine-learning-model", adapter.get("name") or adapter.get("ref"),
                      f"adapter:{adapter.get('ref')}", version=_str(adapter.get("version")),
                      hashes=_hashes(adapter.get("content_hash")), pedigree={"ancestors": [ancestor]},
                      modelCard=card, properties=_adapter_props(adapter))


def _store_component(store: dict) -> dict:
    """A knowledge store as data: the Milvus collection, then one entry per source document."""
    collection = {"type": "dataset", "name": str(store.get("collection") or store.get("name") or "unknown"),
                  "description": f"{_known(store.get('documents'))} documents, {_known(store.get('chunks'))} chunks"}
    sources = [{"type": "dataset", "name": s} for s in _lines(store.get("sources"))]
    props = _props("kb.", {k: store.get(k) for k in ("collection", "documents", "chunks")}) + _props(
        "kb.", {"created_at": _iso(store.get("created_at"))})
    return _component("data", store.get("name"), f"kb:{store.get('name')}@v{store.get('version')}",
                      version=_str(store.get("version")), data=[collection, *sources], properties=props)


def _purl(name: str, version) -> str:
    """pkg:pypi purl: the name normalised as the purl spec asks, the version percent-encoded."""
    normalized = re.sub(r"[-_.]+", "-", name).lower()
    return f"pkg:pypi/{quote(normalized)}" + (f"@{quote(str(version), safe='')}" if version else "")


def _software_component(name: str, version) -> dict:
    if name.lower() == "python":  # the interpreter is no PyPI package
        return _component("platform", name, "platform:python", version=_str(version))
    purl = _purl(name, version)
    return _component("library", name, purl, version=_str(version), purl=purl)


def _canary_props(canaries: list[dict]) -> list[dict]:
    """`tunefetch:canary.NAME.KEY` for each canary, its last decision flattened beside it."""
    flat = {}
    for c in canaries:
        last = _d(c.get("last_decision"))
        flat |= {f"{c.get('name')}.{k}": v for k, v in c.items() if k != "last_decision"}
        flat |= {f"{c.get('name')}.last_decision.{k}": (_iso(v) if k == "at" else v) for k, v in last.items()}
    return _props("canary.", flat)


def _system_props(facts: dict) -> list[dict]:
    """Deployment state that has no component of its own: canaries, guards, telemetry, missing fields."""
    human = _d(facts.get("human"))
    written = {k: "; ".join(_lines(human.get(k))) for k in ("owners", "contact") if _lines(human.get(k))}
    missing = [k for k in HUMAN_FIELDS if not _lines(human.get(k))]
    return (_props("card.", {"sha256": card_hash(facts), "generated_at": facts.get("generated_at")})
            + _canary_props(_items(facts.get("canaries"))) + _props("guard.", _d(facts.get("guards")))
            + _props("telemetry.", _d(facts.get("telemetry"))) + _props("human.", written)
            + _props("human.", {"missing": ",".join(missing) or None}))


def _unique_refs(components: list[dict]) -> list[dict]:
    """bom-refs must be unique in a BOM: a repeated one (two adapters without a ref) gets #N."""
    seen: dict[str, int] = {}
    for comp in components:
        ref = comp["bom-ref"]
        seen[ref] = seen.get(ref, 0) + 1
        comp["bom-ref"] = ref if seen[ref] == 1 else f"{ref}#{seen[ref]}"
    return components


def render_cyclonedx(facts: dict | None) -> dict:
    """The card as a CycloneDX 1.6 ML-BOM. The serial number derives from the card hash, so an
    unchanged deployment renders the same BOM (up to the timestamp)."""
    facts = _d(facts)
    base, adapters, human = _d(facts.get("base_model")), _items(facts.get("adapters")), _d(facts.get("human"))
    base_comp = _base_component(base, adapters, human)
    adapter_comps = [_adapter_component(a, base) for a in adapters]
    stores = [_store_component(s) for s in _items(facts.get("knowledge_stores"))]
    software = [_software_component(str(k), v) for k, v in sorted(_d(facts.get("software")).items())]
    components = _unique_refs([base_comp, *adapter_comps, *stores, *software])
    dependencies = [{"ref": "system", "dependsOn": [c["bom-ref"] for c in components]}] + [
        {"ref": comp["bom-ref"], "dependsOn": [base_comp["bom-ref"]]} for a, comp in zip(adapters, adapter_comps)
        if _base_ref(_d(a.get("base_model")) or base) == base_comp["bom-ref"]]
    version = _str(facts.get("tunefetch_version"))
    metadata = {"timestamp": _iso(facts.get("generated_at")),
                "tools": {"components": [_component("application", "tunefetch", "tool:tunefetch", version=version)]},
                "component": _component("application", f"tunefetch system: {base.get('id') or 'unknown'}", "system",
                                        version=version),
                "properties": _system_props(facts)}
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:tunefetch:card:{card_hash(facts)}")
    return {"bomFormat": "CycloneDX", "specVersion": SPEC_VERSION, "serialNumber": f"urn:uuid:{serial}", "version": 1,
            "metadata": {k: v for k, v in metadata.items() if v}, "components": components,
            "dependencies": dependencies}
