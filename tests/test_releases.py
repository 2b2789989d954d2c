"""The release book and approvals through their Python API, on a real registry directory:
routing, the analysis acting on recorded answers, and evidence checks (the server-side
behaviour is in test_governance.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.config import GovernanceConfig
from cluster.errors import UserError
from conftest import lineage
from serving.canary import CANARY, STABLE, Outcome, assign
from serving.releases import NotApproved, ReleaseBook
from training.approvals import ApprovalStore
from training.registry import AdapterRegistry


@pytest.fixture
def book(tmp_path: Path):
    def make(**policy) -> ReleaseBook:
        governance = GovernanceConfig(**policy)
        return ReleaseBook(tmp_path / "releases", registry, ApprovalStore(tmp_path / "approvals", governance),
                           governance)

    registry = AdapterRegistry(tmp_path / "adapters")
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"base")
    for i in (1, 2, 3):
        files = tmp_path / f"files{i}"
        files.mkdir()
        (files / "adapter_config.json").write_text("{}")
        (files / "adapter_model.safetensors").write_bytes(bytes([i]) * 64)
        registry.register("faq", files, lineage(f"run-{i}").model_copy(update={"author": "ana"}))
    make.model = model
    return make


def test_the_newest_version_is_stable_until_one_is_set(book):
    releases = book()
    assert releases.route("faq", "k").ref == "faq@v3"
    releases.rollback("faq", "ops", to="v1")
    assert releases.route("faq", "k").ref == "faq@v1" and releases.route("faq@v2", "k").ref == "faq@v2"


def test_assignment_is_a_fixed_point_per_caller(book):
    keys = [f"user:{i}" for i in range(10_000)]
    at = {w: {k for k in keys if assign("faq", k, w) == CANARY} for w in (0.1, 0.3)}
    assert abs(len(at[0.1]) - 1000) < 4 * (10_000 * 0.09) ** 0.5
    assert at[0.1] <= at[0.3]  # raising the weight only moves callers to the canary
    assert {k for k in keys if assign("other", k, 0.1) == CANARY} != at[0.1]  # independent per adapter


def test_a_harmful_canary_is_rolled_back_and_a_clean_one_promoted_from_recorded_answers(book):
    releases = book()
    releases.rollback("faq", "ops", to="v1")
    canary = releases.start("faq", "v2", 0.5, "ops").canary
    for i in range(40):
        for arm, cited in ((STABLE, True), (CANARY, i % 5 == 0)):
            releases.record("faq", canary.id, Outcome(arm=arm, ok=True, latency_ms=50, abstained=False, cited=cited,
                                                      time=time.time()))
        decision = releases.decide("faq")
        if decision:
            break
    assert decision.action == "rollback" and "uncited_rate" in decision.reason and 20 <= i < 40
    assert releases.get("faq").canary is None and releases.route("faq", "k").ref == "faq@v1"

    canary = releases.start("faq", "v3", 0.5, "ops", steps=[0.8], promote_after=25).canary
    actions = []
    for _ in range(60):
        for arm in (STABLE, CANARY):
            releases.record("faq", canary.id, Outcome(arm=arm, ok=True, latency_ms=50, time=time.time()))
        if decision := releases.decide("faq"):
            actions.append((decision.action, decision.weight))
    assert actions == [("step", 0.8), ("promote", 1.0)]
    assert releases.route("faq", "k").ref == "faq@v3"


def test_approvals_need_a_second_person_and_break_on_any_evidence_change(book, tmp_path):
    strict = book(require_approval=True, approval_ttl_days=1)
    version = strict.registry.get("faq@v2")
    with pytest.raises(UserError, match="four-eyes"):
        strict.approvals.approve(version, strict.registry.local_dir(version), book.model, "ana")
    with pytest.raises(NotApproved, match="no approved version"):
        strict.route("faq", "k")
    approval = strict.approvals.approve(version, strict.registry.local_dir(version), book.model, "ben")
    assert strict.route("faq", "k").ref == "faq@v2" and strict.route("faq", "k").approval_id == approval.approval_id

    (book.model / "weights.bin").write_bytes(b"BASE")
    assert strict.verdict("faq@v2")[1].reason == "the base model's files changed"
    with pytest.raises(NotApproved):
        strict.route("faq", "k")
    (book.model / "weights.bin").write_bytes(b"base")
    assert strict.verdict("faq@v2")[1].valid

    assert book(require_approval=True, policy_version="2").verdict("faq@v2")[1].reason.startswith("granted under")
    later = strict.approvals.policy.model_copy(update={"approval_ttl_days": 1e-9})
    expired = ApprovalStore(tmp_path / "approvals", later)
    assert expired.approve(version, strict.registry.local_dir(version), book.model, "ben") and time.sleep(0.01) is None
    assert expired.verify(expired.all()[-1], strict.registry.local_dir(version)).reason == "expired"


def test_promotion_waits_for_an_approval_where_one_is_required(book):
    strict = book(require_approval=True)
    version = strict.registry.get("faq@v1")
    strict.approvals.approve(version, strict.registry.local_dir(version), book.model, "ben")
    strict.rollback("faq", "ops", to="v1")
    canary = strict.start("faq", "v2", 0.5, "ops", promote_after=10).canary
    for _ in range(25):
        for arm in (STABLE, CANARY):
            strict.record("faq", canary.id, Outcome(arm=arm, ok=True, latency_ms=50, time=time.time()))
        strict.decide("faq")
    decisions = [d.action for d in strict.get("faq").decisions]
    assert decisions.count("hold") == 1 and strict.get("faq").canary is not None  # held once, still running
    with pytest.raises(NotApproved, match="cannot be promoted"):
        strict.promote("faq", "ops")
