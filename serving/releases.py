"""What serves for each adapter name: its stable version, its canary, every decision about them.

One JSON file per adapter name (HOME/releases/NAME.json), changed only under an exclusive lock
and replaced whole (write, fsync, rename), so the CLI, the admin API and the gateway's own
analysis can all change it while the server runs: the gateway re-reads it when its mtime
moves, which is how a new weight takes effect without a restart, and why it survives one.
Each canary's answers are appended to HOME/releases/NAME/<canary id>.jsonl (`Outcome`s).
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from cluster.config import GovernanceConfig
from cluster.errors import NotFound, UserError
from cluster.files import append_line, locked, replace_text
from serving.canary import CANARY, NONE, STABLE, Outcome, Tally, analyse, assign
from training.approvals import ApprovalStore, Verdict
from training.registry import AdapterRegistry, parse_ref


class NotApproved(UserError):
    """The policy requires an approval that this version does not have (HTTP 403)."""


class Decision(BaseModel):
    at: float = Field(default_factory=time.time)
    action: str  # start | weight | step | hold | promote | rollback
    by: str  # a person, or "analysis"
    reason: str = ""
    stable: str | None = None
    candidate: str | None = None
    weight: float | None = None
    canary_id: str | None = None  # the canary it is about (its outcome log: NAME/<canary_id>.jsonl)
    numbers: list[dict] = []  # the analysis behind an automatic decision


class Canary(BaseModel):
    id: str
    candidate: str  # NAME@vN
    weight: float
    steps: list[float] = []
    automatic: bool = True  # False: the analysis is shown, people decide
    shadow: bool = False  # the candidate answers a copy of its callers' requests; they get stable's answer
    promote_after: int | None = None  # canary answers that pass a step (None: the policy's)
    started_at: float
    started_by: str
    step_started_at: float  # canary answers since then count towards passing the step


class Release(BaseModel):
    name: str
    stable: str | None = None  # None: the newest version (newest approved one where approval is required)
    canary: Canary | None = None
    decisions: list[Decision] = []


@dataclass(frozen=True)
class Route:
    ref: str  # NAME@vN that answers
    arm: str  # stable | canary | none (exact version, or no canary)
    approval_id: str | None = None
    shadow: str | None = None  # a candidate answering a copy of the request (the caller gets `ref`'s answer)
    canary_id: str | None = None  # the canary whose analysis this answer feeds


class _OutcomeCursor:
    """A canary's outcome log read incrementally into running tallies."""

    def __init__(self, path: Path, policy, kpis: tuple[str, ...] = (), negative_below: float = 0.5):
        self.path, self.offset = path, 0
        self.tally = Tally(policy, kpis=kpis, negative_below=negative_below)
        self.canary_times: list[float] = []  # when each canary-arm answer came, in log order

    def read_new(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        for line in complete.splitlines():
            if line.strip():
                outcome = Outcome.model_validate_json(line)
                self.tally.add(outcome)
                if outcome.arm == CANARY and outcome.kind == "answer":
                    self.canary_times.append(outcome.time)

    def canary_answers_since(self, started: float) -> int:
        return sum(t >= started for t in self.canary_times)


class ReleaseBook:
    def __init__(self, root: Path, registry: AdapterRegistry, approvals: ApprovalStore, policy: GovernanceConfig):
        self.root = Path(root)
        self.registry = registry
        self.approvals = approvals
        self.policy = policy
        self._cache: dict[str, tuple[int, Release]] = {}
        self._cursors: dict[str, _OutcomeCursor] = {}  # canary id -> what its log has shown so far
        self._analysis_lock = threading.RLock()

    # -- state -----------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if parse_ref(name)[1] is not None:  # also refuses names that are no adapter name at all
            raise UserError(f"{name!r}: give the adapter name, without a version")
        return self.root / f"{name}.json"

    def get(self, name: str) -> Release:
        path = self._path(name)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return Release(name=name)
        cached = self._cache.get(name)
        if cached and cached[0] == mtime:
            return cached[1]
        release = Release.model_validate_json(path.read_text())
        self._cache[name] = (mtime, release)
        return release

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []

    @contextmanager
    def _editing(self, name: str):
        """The release, locked against every other writer; written back whole on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self._path(name).with_suffix(".lock")):
            self._cache.pop(name, None)
            release = self.get(name).model_copy(deep=True)
            yield release
            replace_text(self._path(name), release.model_dump_json(indent=1))
            self._cache.pop(name, None)

    # -- resolution ------------------------------------------------------------------------
    def stable(self, name: str) -> tuple[str, str | None]:
        """The stable version of `name` and the approval behind it (None where none is needed)."""
        release = self.get(name)
        if release.stable:
            return release.stable, self._required_approval(release.stable)
        versions = self.registry.versions(name)
        if not versions:
            raise NotFound(f"unknown adapter {name!r} (see `tunefetch adapters list`)")
        if not self.policy.require_approval:
            return f"{name}@v{versions[-1]}", None
        for version in reversed(versions):
            approval_id = self.approval_of(f"{name}@v{version}")
            if approval_id:
                return f"{name}@v{version}", approval_id
        raise NotApproved(f"{name} has no approved version: governance.require_approval is on "
                        f"(`tunefetch approve {name}@v{versions[-1]}`)")

    def _required_approval(self, ref: str) -> str | None:
        approval_id = self.approval_of(ref)
        if self.policy.require_approval and not approval_id:
            _, verdict = self.verdict(ref)
            raise NotApproved(f"{ref} cannot serve as stable: {verdict.reason} (governance.require_approval)")
        return approval_id

    def verdict(self, ref: str):
        """`ref`'s newest approval and whether its evidence still holds (files are only
        looked at when there is an approval to check)."""
        approvals = [a for a in self.approvals.all() if a.ref == ref]
        if not approvals:
            return None, Verdict(valid=False, reason="not approved")
        version = self.registry.get(ref)
        return approvals[-1], self.approvals.verify(approvals[-1], self.registry.local_dir(version))

    def approval_of(self, ref: str) -> str | None:
        """The id of `ref`'s valid approval, else None."""
        approval, verdict = self.verdict(ref)
        return approval.approval_id if approval and verdict.valid else None

    def route(self, model: str, key: str) -> Route:
        """`NAME@vN` exactly (no canary), or `NAME`: its canary or stable version for this caller."""
        name, version = parse_ref(model)
        if version is not None:
            ref = self.registry.get(model).ref
            return Route(ref, NONE, self.approval_of(ref))
        stable, approval_id = self.stable(name)
        canary = self.get(name).canary
        if canary is None:
            return Route(stable, NONE, approval_id)
        if assign(name, key, canary.weight) == STABLE:
            return Route(stable, STABLE, approval_id, canary_id=canary.id)
        if canary.shadow:
            return Route(stable, STABLE, approval_id, shadow=canary.candidate, canary_id=canary.id)
        return Route(canary.candidate, CANARY, self.approval_of(canary.candidate), canary_id=canary.id)

    # -- operations (CLI, admin API) ---------------------------------------------------------
    def start(self, name: str, candidate: str, weight: float, by: str, steps: list[float] | None = None,
              automatic: bool = True, promote_after: int | None = None, shadow: bool = False) -> Release:
        if not 0 < weight < 1:
            raise UserError(f"--weight must be between 0 and 1 (exclusive), not {weight:g}")
        cand_name, cand_version = parse_ref(candidate if "@" in candidate else f"{name}@{candidate}")
        if cand_name != name or cand_version is None:
            raise UserError(f"the candidate must be a version of {name} (e.g. --to v2), not {candidate!r}")
        candidate = self.registry.get(f"{name}@v{cand_version}").ref
        stable, _ = self.stable(name)
        if candidate == stable:
            raise UserError(f"{candidate} is already {name}'s stable version")
        steps = [s for s in (steps if steps is not None else self.policy.canary.steps) if s > weight]
        with self._editing(name) as release:
            now = time.time()
            running = release.canary
            if running and running.candidate != candidate:
                raise UserError(f"{name} already has a canary to {running.candidate} (promote or roll it back first)")
            if running:  # a new weight for the running canary: callers only move stable -> canary
                running.weight, running.steps, running.shadow = weight, steps, shadow
                release.decisions.append(Decision(action="weight", by=by, stable=stable, candidate=candidate,
                                                  weight=weight, reason="set by hand"))
                return release
            release.stable = stable
            release.canary = Canary(id=f"{int(now)}-{uuid.uuid4().hex[:8]}", candidate=candidate, weight=weight,
                                    steps=steps, automatic=automatic, promote_after=promote_after, shadow=shadow,
                                    started_at=now,
                                    started_by=by, step_started_at=now)
            release.decisions.append(Decision(action="start", by=by, stable=stable, candidate=candidate,
                                              weight=weight, canary_id=release.canary.id, reason=", ".join(r for r, on in (("manual: no automatic decisions", not automatic),
                                                                               ("shadow", shadow)) if on)))
        return release

    def promote(self, name: str, by: str, reason: str = "promoted by hand", numbers: list[dict] | None = None) -> Release:
        with self._editing(name) as release:
            if release.canary is None:
                raise UserError(f"{name} has no canary to promote")
            candidate = release.canary.candidate
            if self.policy.require_approval and not self.approval_of(candidate):
                _, verdict = self.verdict(candidate)
                raise NotApproved(f"{candidate} cannot be promoted: {verdict.reason} (governance.require_approval)")
            release.decisions.append(Decision(action="promote", by=by, stable=release.stable, candidate=candidate,
                                              weight=1.0, canary_id=release.canary.id, reason=reason, numbers=numbers or []))
            release.stable, release.canary = candidate, None
        return release

    def rollback(self, name: str, by: str, reason: str = "rolled back by hand", numbers: list[dict] | None = None,
                 to: str | None = None) -> Release:
        """Ends the canary (stable keeps all traffic); with `to`, also makes that version stable."""
        target = self.registry.get(f"{name}@{to}" if to and "@" not in to else to).ref if to else None
        if target and parse_ref(target)[0] != name:
            raise UserError(f"--to must be a version of {name}, not {to!r}")
        if target:
            self._required_approval(target)
        with self._editing(name) as release:
            if release.canary is None and target is None:
                raise UserError(f"{name} has no canary to roll back (--to vN sets the stable version)")
            release.decisions.append(Decision(action="rollback", by=by, stable=target or release.stable,
                                              candidate=release.canary.candidate if release.canary else None,
                                              canary_id=release.canary.id if release.canary else None,
                                              weight=0.0, reason=reason, numbers=numbers or []))
            release.canary = None
            release.stable = target or release.stable
        return release

    # -- analysis ----------------------------------------------------------------------------
    def outcomes_path(self, name: str, canary_id: str) -> Path:
        return self.root / name / f"{canary_id}.jsonl"

    def record(self, name: str, canary_id: str, outcome: Outcome) -> None:
        append_line(self.outcomes_path(name, canary_id), outcome.model_dump_json())

    def analysis(self, name: str):
        """The current canary's analysis (None without a canary). Each look reads only the
        answers appended since the last one: a look costs the same after 10 or 10,000."""
        canary = self.get(name).canary
        if canary is None:
            return None
        with self._analysis_lock:
            cursor = self._cursors.get(canary.id)
            if cursor is None:
                policy = self.policy.canary
                if canary.promote_after:
                    policy = policy.model_copy(update={"promote_after": canary.promote_after})
                monitor = self.policy.monitor
                cursor = self._cursors[canary.id] = _OutcomeCursor(self.outcomes_path(name, canary.id), policy,
                                                                   tuple(monitor.kpis), monitor.negative_feedback_below)
            cursor.read_new()
            return analyse(cursor.tally, cursor.canary_answers_since(canary.step_started_at))

    def decide(self, name: str) -> Decision | None:
        """Acts on the analysis: roll back on harm; a passed step moves to the next weight or
        promotes (holds, once, while an approval is required and missing)."""
        with self._analysis_lock:
            canary = self.get(name).canary
            if canary is None or not canary.automatic:
                return None
            verdict = self.analysis(name)
            if verdict is None or verdict.action == "continue":
                return None
            numbers = [c.to_json() for c in verdict.comparisons]
            if verdict.action == "rollback":
                return self.rollback(name, "analysis", verdict.reason, numbers).decisions[-1]
            following = [s for s in canary.steps if s > canary.weight]
            if following:
                with self._editing(name) as release:
                    release.canary.weight, release.canary.step_started_at = following[0], time.time()
                    release.decisions.append(Decision(action="step", by="analysis", stable=release.stable,
                                                      candidate=canary.candidate, weight=following[0],
                                                      reason=verdict.reason, numbers=numbers))
                return release.decisions[-1]
            if self.policy.require_approval and not self.approval_of(canary.candidate):
                return self._hold(name, canary.candidate, f"{verdict.reason}; promotion waits for an approval of "
                                                          f"{canary.candidate}", numbers)
            return self.promote(name, "analysis", verdict.reason, numbers).decisions[-1]

    def _hold(self, name: str, candidate: str, reason: str, numbers: list[dict]) -> Decision | None:
        release = self.get(name)
        last = release.decisions[-1] if release.decisions else None
        if last and last.action == "hold" and last.candidate == candidate:
            return None
        with self._editing(name) as release:
            release.decisions.append(Decision(action="hold", by="analysis", stable=release.stable,
                                              candidate=candidate, weight=release.canary.weight, reason=reason,
                                              numbers=numbers))
        return release.decisions[-1]
