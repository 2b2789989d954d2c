"""Governance on the running server: canary splits between adapter versions (sticky, bypassable,
judged automatically from the answers), approvals bound to evidence, metrics per arm.

The adapter `helpdesk` gets three versions: v1 and v2 are byte-copies of the trained support@v1
(a candidate as good as stable), v3 carries garbled LoRA weights (a deliberately bad one).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import KB, SAMPLE

NAME = "helpdesk"
FACTS = [json.loads(line) for line in (SAMPLE / "facts.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def helpdesk(home: Path, cli, adapter: str, second_adapter: str, tmp_path_factory) -> dict[str, str]:
    from training.registry import AdapterRegistry

    registry = AdapterRegistry(home / "adapters")
    refs = {}
    for label, source in (("stable", adapter), ("equal", adapter), ("bad", second_adapter)):
        version = registry.get(source)
        work = tmp_path_factory.mktemp(label)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(registry.local_dir(version) / file, work)
        record = version.record.model_copy(update={"run_id": f"{label}-copy-of-{source}"})
        refs[label] = registry.register(NAME, work, record).ref
    assert refs == {"stable": f"{NAME}@v1", "equal": f"{NAME}@v2", "bad": f"{NAME}@v3"}
    # Newer versions do not serve by being newer once a stable version is set.
    assert "stable helpdesk@v1" in cli("canary", "rollback", NAME, "--to", "v1").stdout
    return refs


def ask(server: str, user: str, model: str = NAME, rag: bool = False, question: str | None = None,
        max_tokens: int = 1) -> dict:
    body = {"model": model, "user": user, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question or "What is the return window for unused hardware?"}]}
    if rag:
        body["retrieval"] = {"kb": KB, "top_k": 1}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def ask_many(server: str, users: list[str], **kwargs) -> dict[str, str]:
    """user -> the version that answered, for many callers at once."""
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(users, pool.map(lambda u: ask(server, u, **kwargs)["model"], users)))


def status(cli) -> dict:
    return json.loads(cli("canary", "status", NAME, "--json").stdout)


def test_split_is_sticky_raises_only_move_callers_to_canary_and_exact_versions_bypass(server, cli, helpdesk):
    from serving.canary import assign

    cli("canary", "start", NAME, "--to", "v2", "--weight", "0.2", "--manual")
    users = [f"caller-{i}" for i in range(1000)]
    arms = ask_many(server, users)
    on_canary = {u for u, model in arms.items() if model == helpdesk["equal"]}
    assert set(arms.values()) == {helpdesk["stable"], helpdesk["equal"]}
    # Within 4 standard deviations of the weight, and exactly the callers the hash assigns.
    assert abs(len(on_canary) / 1000 - 0.2) <= 4 * math.sqrt(0.2 * 0.8 / 1000)
    assert on_canary == {u for u in users if assign(NAME, f"user:{u}", 0.2) == "canary"}

    # A new weight through the admin API, on the running server: callers only move stable -> canary.
    raised = httpx.post(f"{server}/v1/admin/canary/{NAME}/start", json={"to": "v2", "weight": 0.5, "manual": True,
                                                                         "by": "ops"}, timeout=30)
    assert raised.status_code == 200, raised.text
    assert raised.json()["canary"]["weight"] == 0.5
    again = ask_many(server, users[:300])
    assert all(again[u] == helpdesk["equal"] for u in users[:300] if u in on_canary)
    moved = sum(again[u] == helpdesk["equal"] for u in users[:300])
    assert abs(moved / 300 - 0.5) <= 4 * math.sqrt(0.25 / 300)
    assert ask_many(server, users[:40]) == {u: again[u] for u in users[:40]}  # the same caller, the same arm

    # An exact version is never split, and the response and provenance name what answered.
    canary_user = next(iter(on_canary))
    body = ask(server, canary_user, model=helpdesk["stable"])
    assert body["model"] == helpdesk["stable"]
    record = json.loads(cli("provenance", "show", body["provenance_id"], "--json").stdout)
    assert record["canary_arm"] == "none" and record["adapter"]["ref"] == helpdesk["stable"]
    record = json.loads(cli("provenance", "show", ask(server, canary_user)["provenance_id"], "--json").stdout)
    assert record["canary_arm"] == "canary" and record["adapter"]["ref"] == helpdesk["equal"]

    # Per-version, per-arm series that vLLM cannot label.
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    canary_count = _sample(metrics, "tunefetch_requests_total", model=helpdesk["equal"], arm="canary")
    assert canary_count >= len(on_canary) + moved
    assert _sample(metrics, "tunefetch_requests_total", model=helpdesk["stable"], arm="none") >= 1
    assert _sample(metrics, "tunefetch_request_latency_seconds_count", model=helpdesk["equal"], arm="canary") == canary_count
    assert "vllm:e2e_request_latency_seconds_bucket" in metrics and "ray_serve_" in metrics  # the engine's, Serve's

    shown = status(cli)
    assert shown["canary"]["automatic"] is False and [d["action"] for d in shown["decisions"]][-2:] == ["start", "weight"]
    assert shown["analysis"]["metrics"][0]["n_canary"] > 0  # analysed, though people decide
    cli("canary", "rollback", NAME)
    assert {ask(server, u)["model"] for u in list(on_canary)[:5]} == {helpdesk["stable"]}


def _sample(metrics: str, name: str, **labels) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


def _rag_traffic(server: str, cli, candidate: str, until, limit: int, seed: int) -> tuple[dict, int]:
    """Retrieval questions from fresh callers until `until(status)` holds; returns the status
    and how many answers came from the candidate."""
    rng = random.Random(seed)
    candidate_answers = 0
    for batch in range(limit // 8):
        users = [f"rag-{seed}-{batch}-{i}" for i in range(8)]
        questions = [rng.choice(rng.choice(FACTS)["questions"]) for _ in users]
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda uq: ask(server, uq[0], rag=True, question=uq[1], max_tokens=16),
                                   zip(users, questions)))
        candidate_answers += sum(b["model"] == candidate for b in bodies)
        shown = status(cli)
        if until(shown):
            return shown, candidate_answers
    raise AssertionError(f"no decision after {limit} requests: {status(cli)}")


def test_a_bad_candidate_is_rolled_back_by_the_analysis(server, cli, helpdesk):
    cli("canary", "start", NAME, "--to", "v3", "--weight", "0.5")
    shown, canary_answers = _rag_traffic(server, cli, helpdesk["bad"], lambda s: s["canary"] is None, limit=400,
                                          seed=1)
    decision = shown["decisions"][-1]
    assert decision["action"] == "rollback" and decision["by"] == "analysis", decision
    assert "uncited_rate" in decision["reason"] or "abstain_rate" in decision["reason"]
    worst = {m["metric"]: m for m in decision["numbers"]}
    assert worst["uncited_rate"]["canary"] > worst["uncited_rate"]["stable"]
    assert canary_answers <= 80, f"rollback took {canary_answers} canary answers"
    assert shown["stable"] == helpdesk["stable"]
    assert ask(server, "after-rollback", rag=True)["model"] == helpdesk["stable"]


def test_a_good_candidate_is_promoted_by_the_analysis_and_serves(server, cli, helpdesk):
    cli("canary", "start", NAME, "--to", "v2", "--weight", "0.5", "--promote-after", "30")
    shown, _ = _rag_traffic(server, cli, helpdesk["equal"], lambda s: s["canary"] is None, limit=400, seed=2)
    decision = shown["decisions"][-1]
    assert decision["action"] == "promote" and decision["by"] == "analysis", decision
    assert shown["stable"] == helpdesk["equal"]
    # The promotion took effect: every caller now gets the new stable version.
    assert set(ask_many(server, [f"after-{i}" for i in range(16)]).values()) == {helpdesk["equal"]}


def test_a_shadow_candidate_answers_copies_that_callers_never_see(server, cli, helpdesk):
    import time

    from serving.canary import assign

    cli("canary", "start", NAME, "--to", "v3", "--weight", "0.5", "--shadow", "--manual")
    users = [f"shadow-{i}" for i in range(24)]
    stable = status(cli)["stable"]
    assert set(ask_many(server, users, rag=True, max_tokens=8).values()) == {stable}
    mirrored = sum(assign(NAME, f"user:{u}", 0.5) == "canary" for u in users)
    deadline = time.monotonic() + 60
    while status(cli)["analysis"]["metrics"][0]["n_canary"] < mirrored and time.monotonic() < deadline:
        time.sleep(1)
    shown = status(cli)
    assert shown["analysis"]["metrics"][0]["n_canary"] == mirrored > 0
    assert shown["analysis"]["metrics"][0]["n_stable"] == len(users)
    records = json.loads(cli("provenance", "list", "--limit", "60", "--json").stdout)
    shadows = [r for r in records if r["canary_arm"] == "shadow"]
    assert len(shadows) == mirrored and {r["adapter"]["ref"] for r in shadows} == {helpdesk["bad"]}
    cli("canary", "rollback", NAME)


def test_canary_bad_input_is_one_line(cli, helpdesk):
    for args, needle in ((("--to", "v2", "--weight", "1.5"), "between 0 and 1"),
                         (("--to", "v9", "--weight", "0.1"), "no version v9"),
                         (("--to", "echo@v1", "--weight", "0.1"), "must be a version of helpdesk")):
        proc = cli("canary", "start", NAME, *args, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = cli("canary", "promote", NAME, check=False)
    assert proc.returncode == 2 and "no canary" in proc.stderr


def test_false_rollbacks_of_an_equal_candidate_stay_under_alpha(home, helpdesk):
    """A/A from recorded answers: both arms drawn from the stable arm's real outcomes, the
    analysis looking after every answer as the gateway does; rollbacks over many seeded runs
    stay at or under alpha."""
    from cluster.config import CanaryPolicy
    from serving.canary import CANARY, STABLE, Outcome, Tally, analyse

    recorded = [Outcome.model_validate_json(line) for path in (home / "releases" / NAME).glob("*.jsonl")
                for line in path.read_text().splitlines() if line.strip()]
    pool = [o for o in recorded if o.arm == STABLE and o.cited is not None]
    assert len(pool) >= 40, "the traffic tests recorded too few retrieval answers"
    policy = CanaryPolicy(promote_after=150)
    arms = {arm: [o.model_copy(update={"arm": arm}) for o in pool] for arm in (STABLE, CANARY)}
    runs, rollbacks = 300, 0
    for seed in range(runs):
        rng, tally, canary_answers = random.Random(seed), Tally(policy), 0
        while True:
            arm = CANARY if rng.random() < 0.5 else STABLE
            tally.add(rng.choice(arms[arm]))
            canary_answers += arm == CANARY
            verdict = analyse(tally, canary_answers)
            if verdict.action != "continue":
                rollbacks += verdict.action == "rollback"
                break
    # alpha plus three binomial standard deviations of the estimate
    assert rollbacks / runs <= policy.alpha + 3 * math.sqrt(policy.alpha * (1 - policy.alpha) / runs)


def test_approvals_are_four_eyes_bound_to_the_adapter_bytes_and_named_on_answers(server, cli, home, helpdesk,
                                                                                 tmp_path):
    from cluster.config import GovernanceConfig
    from cluster.errors import UserError
    from serving.releases import ReleaseBook
    from training.approvals import ApprovalStore
    from training.registry import AdapterRegistry

    registry = AdapterRegistry(home / "adapters")
    author = registry.get(helpdesk["equal"]).record.author
    proc = cli("approve", helpdesk["equal"], "--by", author, check=False)
    assert proc.returncode == 2 and "four-eyes" in proc.stderr

    strict = GovernanceConfig(require_approval=True)
    book = ReleaseBook(home / "releases", registry, ApprovalStore(home / "approvals", strict), strict)
    with pytest.raises(UserError, match="not approved"):
        book.route(NAME, "someone")
    approval_id = cli("approve", helpdesk["equal"], "--by", "reviewer-2", "--note", "A/A canary passed").stdout.strip()
    assert book.route(NAME, "someone").approval_id == approval_id
    body = ask(server, "approved-caller")
    assert body["model"] == helpdesk["equal"]
    record = json.loads(cli("provenance", "show", body["provenance_id"], "--json").stdout)
    assert record["approval_id"] == approval_id and record["card_hash"]
    shown = json.loads(cli("adapters", "show", helpdesk["equal"], "--json").stdout)
    assert [(a["approval_id"], a["approved_by"], a["valid"]) for a in shown["approvals"]] == [
        (approval_id, "reviewer-2", True)]

    # One changed byte in the adapter invalidates the approval: refused as stable, and answers
    # stop naming it; restoring the byte restores it.
    weights = registry.local_dir(registry.get(helpdesk["equal"])) / "adapter_model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(UserError, match="the adapter's files changed"):
            book.route(NAME, "someone")
        listed = {a["approval_id"]: a for a in json.loads(cli("approvals", "list", "--json").stdout)}
        assert listed[approval_id]["reason"] == "the adapter's files changed"
        record = json.loads(cli("provenance", "show", ask(server, "approved-caller")["provenance_id"], "--json").stdout)
        assert record["approval_id"] is None
    finally:
        weights.write_bytes(original)
    assert book.route(NAME, "someone").approval_id == approval_id

    # Promotion needs an approval where the policy says so.
    config = tmp_path / "strict.yaml"
    config.write_text(cli.config.read_text() + "governance:\n  require_approval: true\n")
    from conftest import CLI

    strict_cli = CLI(cli.home, config)
    strict_cli("canary", "start", NAME, "--to", "v1", "--weight", "0.1", "--manual")
    proc = strict_cli("canary", "promote", NAME, check=False)
    assert proc.returncode == 2 and "helpdesk@v1 cannot be promoted: not approved" in proc.stderr
    strict_cli("canary", "rollback", NAME)
    assert status(cli)["stable"] == helpdesk["equal"]


def test_the_system_card_describes_the_live_deployment_in_both_formats(server, cli, helpdesk, tmp_path):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    live = httpx.get(f"{server}/v1/admin/card", timeout=60).json()
    body = ask(server, "card-reader")
    record = json.loads(cli("provenance", "show", body["provenance_id"], "--json").stdout)
    assert record["card_hash"] == live["card_hash"]  # the card in force is stamped on the answer

    out = tmp_path / "bom.json"
    cli("card", "--format", "cyclonedx", "--out", str(out))
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(out.read_text()) is None
    bom = json.loads(out.read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    models = {f"{c['name']}@v{c['version']}" if c.get("version") else c["name"]: c
              for c in bom["components"] if c["type"] == "machine-learning-model"}
    assert {helpdesk["stable"], helpdesk["equal"], helpdesk["bad"], "tiny-llama"} <= set(models)
    facts = live["facts"]
    base_hash = next(h["content"] for h in models["tiny-llama"]["hashes"] if h["alg"] == "SHA-256")
    assert base_hash == facts["base_model"]["sha256"]
    data = [c for c in bom["components"] if c["type"] == "data"]
    assert any(c["name"].startswith(KB) for c in data)

    markdown = cli("card").stdout
    roles = {a["ref"]: a for a in facts["adapters"]}
    assert roles[helpdesk["equal"]]["role"] == "stable" and roles[helpdesk["equal"]]["approval"]["valid"]
    assert roles[helpdesk["equal"]]["approval"]["approval_id"] in markdown
    assert live["card_hash"] in markdown and facts["base_model"]["sha256"][:16] in markdown
    assert f"{KB}" in markdown and "not written yet" in markdown  # no card_file: the human fields are marked
