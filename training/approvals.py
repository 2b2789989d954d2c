"""Approval records: a person binds one adapter version to the evidence it was judged on.

An approval names who approved, when, under which policy version, until when, and the sha256
of every piece of evidence: the adapter's files, the base model's files, the eval report
(`eval compare`'s results.json, with the thresholds it passed) and the knowledge store version
that report used. `verify` hashes the evidence again: one changed byte, an expired date or a
changed policy makes the approval invalid, and a version without a valid approval cannot serve
as stable where the policy requires one. Records are immutable JSON files
(HOME/approvals/appr-*.json); a new approval never edits an old one.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cluster.config import GovernanceConfig
from cluster.errors import NotFound, UserError
from cluster.files import replace_text
from training.local_model import directory_hash
from training.registry import ADAPTER_FILES, AdapterVersion, files_hash


class Evidence(BaseModel):
    model_config = ConfigDict(extra="ignore")
    adapter_sha256: str
    base_model_id: str
    base_model_sha256: str
    base_model_path: str
    eval_report: str | None = None  # path of results.json
    eval_report_sha256: str | None = None
    kb: str | None = None  # NAME@vN the report's retrieval used
    kb_collection: str | None = None
    thresholds: dict[str, float] = {}
    results: dict[str, float] = {}  # the report's values for each threshold


class Approval(BaseModel):
    model_config = ConfigDict(extra="ignore")
    approval_id: str
    ref: str  # NAME@vN
    approved_by: str
    approved_at: float
    expires_at: float
    policy_version: str
    note: str = ""
    evidence: Evidence


class Verdict(BaseModel):
    valid: bool
    reason: str = ""


class _StatCache:
    """Hashes of files and directories, recomputed only when a file's size or mtime changed:
    verifying on every request must not re-read gigabytes of weights."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hashes: dict[tuple, str] = {}

    @staticmethod
    def _signature(paths: list[Path]) -> tuple:
        return tuple((str(p), st.st_size, st.st_mtime_ns) for p in paths for st in [p.stat()])

    def get(self, key: str, paths: list[Path], compute) -> str:
        signature = (key, self._signature(paths))
        with self._lock:
            if signature in self._hashes:
                return self._hashes[signature]
        value = compute()
        with self._lock:
            self._hashes[signature] = value
        return value


_cache = _StatCache()


def adapter_hash(directory: Path) -> str:
    directory = Path(directory)
    return _cache.get("adapter", [directory / f for f in ADAPTER_FILES], lambda: files_hash(directory, ADAPTER_FILES))


def model_hash(directory: Path) -> str:
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "tunefetch_model.json")
    return _cache.get("model", files, lambda: directory_hash(directory))


def file_hash(path: Path) -> str:
    path = Path(path)
    return _cache.get("file", [path], lambda: hashlib.sha256(path.read_bytes()).hexdigest())


def eval_evidence(eval_dir: Path, ref: str, thresholds: dict[str, float]) -> dict:
    """What an `eval compare` report proves about `ref`: refused unless it evaluated exactly
    that version and every threshold (MODE.METRIC >= minimum) is met."""
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{eval_dir}: no results.json (write one with `tunefetch eval compare --out DIR`)")
    try:
        results = json.loads(path.read_text())
        versions = results["versions"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not an `eval compare` report") from None
    if versions.get("adapter") != ref:
        raise UserError(f"{path} evaluated {versions.get('adapter')}, not {ref}")
    reached: dict[str, float] = {}
    for key, minimum in thresholds.items():
        mode, _, metric = key.partition(".")
        value = (results.get("modes", {}).get(mode) or {}).get(metric)
        if not isinstance(value, (int, float)):
            raise UserError(f"{path}: no value for threshold {key}")
        if value < minimum:
            raise UserError(f"{ref} does not pass {key} >= {minimum:g} (the report says {value:.3f})")
        reached[key] = round(float(value), 6)
    return {"eval_report": str(path.resolve()), "eval_report_sha256": file_hash(path), "kb": versions.get("kb"),
            "kb_collection": versions.get("collection"), "thresholds": dict(thresholds), "results": reached}


class ApprovalStore:
    def __init__(self, root: Path, policy: GovernanceConfig):
        self.root = Path(root)
        self.policy = policy
        self._listing: tuple[int, list[Approval]] | None = None

    def approve(self, version: AdapterVersion, adapter_dir: Path, base_model_path: Path, approved_by: str,
                eval_dir: Path | None = None, note: str = "") -> Approval:
        author = version.record.author
        if author and approved_by == author:
            raise UserError(f"{approved_by} trained {version.ref}: an approval needs a second person (four-eyes)")
        if self.policy.approval_requires_eval and eval_dir is None:
            raise UserError("governance.approval_requires_eval: pass --eval DIR (an `eval compare --adapter "
                            f"{version.ref}` report)")
        actual = adapter_hash(adapter_dir)
        if actual != version.content_hash:
            raise UserError(f"{version.ref}: its files no longer match the registry's content hash")
        base = Path(base_model_path)
        if version.record.base_model.id != base.name and version.record.base_model.id != _model_id(base):
            raise UserError(f"{version.ref} was trained on {version.record.base_model.id}, not on the model at {base}")
        evidence = Evidence(adapter_sha256=actual, base_model_id=version.record.base_model.id,
                            base_model_sha256=model_hash(base), base_model_path=str(base.resolve()),
                            **(eval_evidence(eval_dir, version.ref, self.policy.thresholds) if eval_dir else {}))
        now = time.time()
        approval = Approval(approval_id=f"appr-{uuid.uuid4().hex[:16]}", ref=version.ref, approved_by=approved_by,
                            approved_at=now, expires_at=now + self.policy.approval_ttl_days * 86400,
                            policy_version=self.policy.policy_version, note=note, evidence=evidence)
        self._write(approval)
        return approval

    def _write(self, approval: Approval) -> None:
        replace_text(self.root / f"{approval.approval_id}.json", approval.model_dump_json(indent=2))

    def all(self) -> list[Approval]:
        """Every readable approval, oldest first (re-read only when the directory changed)."""
        try:
            mtime = self.root.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if self._listing and self._listing[0] == mtime:
            return self._listing[1]
        approvals = []
        for path in sorted(self.root.glob("appr-*.json")):
            try:
                approvals.append(Approval.model_validate_json(path.read_text()))
            except ValueError:
                continue  # a damaged record approves nothing; `approvals list` still shows the rest
        approvals.sort(key=lambda a: a.approved_at)
        self._listing = (mtime, approvals)
        return approvals

    def get(self, approval_id: str) -> Approval:
        for approval in self.all():
            if approval.approval_id == approval_id:
                return approval
        raise NotFound(f"no approval {approval_id!r} (see `tunefetch approvals list`)")

    def verify(self, approval: Approval, adapter_dir: Path) -> Verdict:
        """Valid only while every piece of evidence hashes as it did when approved."""
        e = approval.evidence
        if time.time() > approval.expires_at:
            return Verdict(valid=False, reason="expired")
        if approval.policy_version != self.policy.policy_version:
            return Verdict(valid=False, reason=f"granted under policy {approval.policy_version}, "
                                               f"the policy is now {self.policy.policy_version}")
        try:
            if adapter_hash(adapter_dir) != e.adapter_sha256:
                return Verdict(valid=False, reason="the adapter's files changed")
            if model_hash(Path(e.base_model_path)) != e.base_model_sha256:
                return Verdict(valid=False, reason="the base model's files changed")
            if e.eval_report and file_hash(Path(e.eval_report)) != e.eval_report_sha256:
                return Verdict(valid=False, reason="the eval report changed")
        except OSError as exc:
            return Verdict(valid=False, reason=f"evidence missing ({exc.__class__.__name__}: {exc.filename})")
        if self.policy.approval_requires_eval and not e.eval_report:
            return Verdict(valid=False, reason="the policy requires an eval report and this approval has none")
        return Verdict(valid=True)


def _model_id(path: Path) -> str:
    meta = Path(path) / "tunefetch_model.json"
    return json.loads(meta.read_text())["id"] if meta.is_file() else Path(path).name
