"""Feedback on answers (POST /v1/feedback) and the review queue (`tunefetch review`), as a
service and a reviewer use them on the session server: feedback lands on exactly the answer it
names (also while the answer is still streaming, also when repeated), the queue holds the
answers a person should see, and resolved reviews export into eval cases and training rows
that `eval retrieval` and the trainer read."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import KB
from serving.feedback import FeedbackLog

BASE = "tiny-llama"
QUESTION = "What is the payload capacity of the K-40?"


def ask(server: str, question: str = QUESTION, **retrieval) -> httpx.Response:
    body = {"model": BASE, "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
            "retrieval": {"kb": KB, "top_k": 1, **retrieval}}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def feedback(server: str, **body) -> httpx.Response:
    return httpx.post(f"{server}/v1/feedback", json=body, timeout=60)


def series(server: str, name: str, **labels) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{server}/metrics", timeout=30).text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def test_feedback_on_a_streaming_answer_before_its_record_exists_links_to_that_answer(server, home):
    body = {"model": BASE, "messages": [{"role": "user", "content": QUESTION}], "stream": True, "temperature": 0,
            "max_tokens": 1500, "min_tokens": 1500}  # long enough that the record lands well after the post
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=300) as stream:
        lines = stream.iter_lines()  # held: a dropped iterator closes the stream
        provenance_id = json.loads(next(lines).removeprefix("data: "))["provenance_id"]
        posted = feedback(server, provenance_id=provenance_id, score=0.1, label="wrong")
        assert posted.status_code == 200, posted.text
        assert posted.json()["recorded"] is False and posted.json()["model"] == BASE
        assert [line for line in lines if line][-1] == "data: [DONE]"
    record = httpx.get(f"{server}/v1/provenance/{provenance_id}", timeout=30).json()
    assert record["question"] == QUESTION and record["usage"]["completion_tokens"] == 1500
    # the same feedback after the record landed is the same entry, now linked to the record
    again = feedback(server, provenance_id=provenance_id, score=0.1, label="wrong").json()
    assert again["recorded"] is True and again["replaced"] is True
    assert again["feedback_id"] == posted.json()["feedback_id"]
    events = [e for e in FeedbackLog(home / "feedback").latest().values() if e.provenance_id == provenance_id]
    assert [(e.score, e.label) for e in events] == [(0.1, "wrong")]


def test_a_repeat_upserts_a_trace_id_finds_the_answer_and_counts_stay_exact(server, home):
    response = ask(server)
    provenance_id = response.json()["provenance_id"]
    trace_id = response.headers["traceparent"].split("-")[1]
    negatives = series(server, "tunefetch_feedback_total", model=BASE, sentiment="negative")
    positives = series(server, "tunefetch_feedback_total", model=BASE, sentiment="positive")
    log = FeedbackLog(home / "feedback")
    lines_before = sum(len(p.read_text().splitlines()) for p in (home / "feedback").glob("*.jsonl"))

    first = feedback(server, trace_id=trace_id, score=0.0, comment="not the K-40").json()
    assert first["provenance_id"] == provenance_id and first["replaced"] is False
    for _ in range(3):  # a client retrying: no new line, no new count
        assert feedback(server, provenance_id=provenance_id, score=0.0, comment="not the K-40").json()["replaced"]
    assert sum(len(p.read_text().splitlines()) for p in (home / "feedback").glob("*.jsonl")) == lines_before + 1
    changed = feedback(server, provenance_id=provenance_id, score=0.9, label="fine after all").json()
    assert changed["feedback_id"] == first["feedback_id"]
    assert log.get(first["feedback_id"]).model_dump(include={"score", "label", "comment"}) == {
        "score": 0.9, "label": "fine after all", "comment": None}
    assert series(server, "tunefetch_feedback_total", model=BASE, sentiment="negative") == negatives + 1
    assert series(server, "tunefetch_feedback_total", model=BASE, sentiment="positive") == positives


@pytest.mark.parametrize("body, status, needle", [
    ({"provenance_id": "prov-" + "0" * 32, "score": 1}, 404, "no answer"),
    ({"trace_id": "f" * 32, "score": 1}, 404, "no answer"),
    ({"provenance_id": "prov-xyz", "score": 1}, 400, "prov-<32 hex digits>"),
    ({"score": 1}, 400, "exactly one of provenance_id and trace_id"),
    ({"provenance_id": "prov-" + "0" * 32}, 400, "needs a score"),
    ({"provenance_id": "prov-" + "0" * 32, "score": 1.5}, 400, "score"),
    ({"provenance_id": "prov-" + "0" * 32, "score": 1, "rating": 5}, 400, "rating"),
    ({"provenance_id": "prov-" + "0" * 32, "kpis": {"escalated": 1}}, 400, "not a configured KPI"),
])
def test_bad_feedback_is_an_openai_error_and_stores_nothing(server, home, body, status, needle):
    before = sorted((p.name, p.stat().st_size) for p in (home / "feedback").glob("*.jsonl"))
    response = feedback(server, **body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert sorted((p.name, p.stat().st_size) for p in (home / "feedback").glob("*.jsonl")) == before


def test_the_review_queue_exports_eval_cases_and_training_rows_with_lineage(server, cli, tmp_path):
    abstained = ask(server, "Which wine goes with grilled trout?", min_score=0.99, no_context="abstain").json()
    assert abstained["abstained"] is True
    wrong = ask(server, "How much does the K-40 weigh when empty?").json()
    assert feedback(server, provenance_id=wrong["provenance_id"], score=0.0, label="wrong",
                    correction="The K-40 weighs 80 kg empty.").status_code == 200

    queue = {item["provenance_id"]: item for item in json.loads(cli("review", "list", "--json", "--limit", "1000").stdout)}
    assert queue[abstained["provenance_id"]]["reasons"] == ["abstained"]
    assert set(queue[wrong["provenance_id"]]["reasons"]) >= {"negative_feedback", "correction"}
    assert queue[wrong["provenance_id"]]["question"] == "How much does the K-40 weigh when empty?"

    gold = wrong["citations"][0]["doc_id"]
    cli("review", "resolve", wrong["provenance_id"], "--gold", gold, "--by", "reviewer-1")  # the posted correction
    cli("review", "resolve", abstained["provenance_id"], "--dismiss", "--note", "out of scope")
    open_ids = {i["provenance_id"] for i in json.loads(cli("review", "list", "--json", "--limit", "1000").stdout)}
    assert not open_ids & {wrong["provenance_id"], abstained["provenance_id"]}
    unresolvable = cli("review", "resolve", abstained["provenance_id"], check=False)  # no correction anywhere
    assert unresolvable.returncode == 2 and "--correction" in unresolvable.stderr

    out = tmp_path / "reviewed"
    cli("review", "export", "--out", str(out))
    from retrieval.evaluation import load_qrels  # the loaders `eval retrieval` and `train` use
    from training.datasets import read_rows

    cases = {q.id: q for q in load_qrels(out / "eval_cases.jsonl")}
    assert cases[wrong["provenance_id"]].relevant == {gold: 1}
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["lineage"]["provenance_id"] == wrong["provenance_id"]]
    assert len(mine) == 1 and mine[0]["lineage"]["reviewed_by"] == "reviewer-1"
    assert mine[0]["lineage"]["answered_by"] == BASE and mine[0]["lineage"]["retrieved"] == [gold]
    assert read_rows(out / "train.jsonl", "auto")[rows.index(mine[0])] == [
        {"role": "user", "content": "How much does the K-40 weigh when empty?"},
        {"role": "assistant", "content": "The K-40 weighs 80 kg empty."}]
    assert abstained["provenance_id"] not in cases  # dismissed: exported nowhere
    cli("eval", "retrieval", "--kb", KB, "--qrels", str(out / "eval_cases.jsonl"), "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_queries"] == len(cases) and {q["id"] for q in report["per_query"]} == set(cases)


def test_kpis_posted_per_answer_appear_in_the_metrics(server):
    answers = [ask(server).json()["provenance_id"] for _ in range(2)]
    reports = series(server, "tunefetch_kpi_reports_total", model=BASE, kpi="resolved")
    value = series(server, "tunefetch_kpi_value_total", model=BASE, kpi="resolved")
    for provenance_id, resolved in zip(answers, (1, 0)):
        assert feedback(server, provenance_id=provenance_id, kpis={"resolved": resolved}).status_code == 200
    assert series(server, "tunefetch_kpi_reports_total", model=BASE, kpi="resolved") == reports + 2
    assert series(server, "tunefetch_kpi_value_total", model=BASE, kpi="resolved") == value + 1


def test_negative_feedback_and_missed_kpis_on_the_canary_arm_roll_it_back():
    """The canary analysis counts feedback outcomes as evidence, not as answers."""
    from cluster.config import CanaryPolicy
    from serving.canary import CANARY, STABLE, Outcome, Tally, analyse

    policy = CanaryPolicy(min_samples=20, promote_after=1000)
    tally = Tally(policy, kpis=("resolved",))
    for i in range(60):
        for arm in (STABLE, CANARY):
            tally.add(Outcome(arm=arm, latency_ms=50, abstained=False, cited=True))
            bad = arm == CANARY and i % 2 == 0
            tally.add(Outcome(arm=arm, kind="feedback", feedback=0.0 if bad else 1.0, kpis={"resolved": 0 if bad else 1}))
    assert tally.answers == {STABLE: 60, CANARY: 60}  # feedback is not an answer
    verdict = analyse(tally, 60)
    assert verdict.action == "rollback" and ("negative_feedback_rate" in verdict.reason
                                             or "kpi_missed:resolved" in verdict.reason)
    rows = {c.metric: c for c in verdict.comparisons}
    assert rows["negative_feedback_rate"].canary == 0.5 and rows["negative_feedback_rate"].stable == 0.0
    assert rows["kpi_missed:resolved"].canary == 0.5
