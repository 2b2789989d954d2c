"""Canary analysis: detection speed and false rollbacks, simulated from recorded answers.

    .venv/bin/python bench/canary_bench.py --home HOME [--name helpdesk] [--runs 2000] [--out FILE]

HOME holds canary outcome logs written by a running server (HOME/releases/NAME/*.jsonl; the
suite's tests/test_governance.py leaves a home with a good and a deliberately bad candidate).
Both arms are drawn from the recorded outcomes, and the analysis looks after every answer, as
the gateway does:
- A/A: stable and canary both from the stable arm's answers: how often is an equal candidate
  rolled back (the configured bound is alpha)?
- bad: the canary from the answers of the candidate the analysis rolled back: how many canary
  answers until the rollback, at each weight?
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)

from cluster.config import CanaryPolicy  # noqa: E402
from serving.canary import CANARY, STABLE, Outcome, Tally, analyse  # noqa: E402
from serving.releases import Release  # noqa: E402


def recorded(home: Path, name: str) -> tuple[list[Outcome], list[Outcome]]:
    """(stable answers of every canary, canary answers of the canaries the analysis rolled back)."""
    release = Release.model_validate_json((home / "releases" / f"{name}.json").read_text())
    rolled_back = {d.canary_id for d in release.decisions if d.action == "rollback" and d.by == "analysis"}
    stable, bad = [], []
    for path in (home / "releases" / name).glob("*.jsonl"):
        outcomes = [Outcome.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
        stable += [o for o in outcomes if o.arm == STABLE and o.cited is not None]
        if path.stem in rolled_back:
            bad += [o for o in outcomes if o.arm == CANARY and o.cited is not None]
    return stable, bad


def simulate(stable: list[Outcome], canary: list[Outcome], policy: CanaryPolicy, weight: float, seed: int):
    rng, tally, canary_answers = random.Random(seed), Tally(policy), 0
    arms = {STABLE: [o.model_copy(update={"arm": STABLE}) for o in stable],
            CANARY: [o.model_copy(update={"arm": CANARY}) for o in canary]}
    while True:
        arm = CANARY if rng.random() < weight else STABLE
        tally.add(rng.choice(arms[arm]))
        canary_answers += arm == CANARY
        verdict = analyse(tally, canary_answers)
        if verdict.action != "continue":
            return verdict.action, canary_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--name", default="helpdesk")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stable, bad = recorded(args.home, args.name)
    policy = CanaryPolicy()
    started = time.perf_counter()
    aa = [simulate(stable, stable, policy, 0.5, seed)[0] for seed in range(args.runs)]
    report = {"recorded": {"stable_answers": len(stable), "bad_candidate_answers": len(bad)},
              "policy": policy.model_dump(),
              "a_a": {"runs": args.runs, "false_rollback_rate": aa.count("rollback") / args.runs,
                      "promoted": aa.count("pass") / args.runs}}
    for weight in (0.1, 0.5):
        if not bad:
            break
        runs = [simulate(stable, bad, policy, weight, seed) for seed in range(min(args.runs, 500))]
        counts = sorted(n for action, n in runs if action == "rollback")
        report[f"bad_weight_{weight}"] = {
            "runs": len(runs), "rolled_back": len(counts) / len(runs),
            "canary_answers_to_rollback": {"median": statistics.median(counts) if counts else None,
                                           "p90": counts[int(0.9 * (len(counts) - 1))] if counts else None,
                                           "max": counts[-1] if counts else None}}
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)


if __name__ == "__main__":
    main()
