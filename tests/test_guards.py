"""Guards and attribution logic: the PII detector, topics, the stream hold-back window, quote
verification, policy resolution and the config's checks (no server: the pure functions the
request stages call). The served behaviour is in test_guards_serving.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from pydantic import ValidationError

from cluster.config import GuardsConfig, TunefetchConfig
from serving import pii
from serving.attribution import cite_schema, schema_valid, verify_quotes
from serving.guards import CONTENT_FILTER, GuardBook, GuardInput, HoldBack, feedback_text
from serving.protocol import APIError
from serving.refusals import RefusalLog

DETECTED = [
    ("Mail me at jane.doe+x@example.co.uk please", {"email": 1}, "Mail me at [EMAIL] please"),
    ("card 4111 1111 1111 1111 exp", {"card": 1}, "card [CARD] exp"),
    ("card 4111-1111-1111-1111", {"card": 1}, "card [CARD]"),
    ("amex 3782 822463 10005.", {"card": 1}, "amex [CARD]."),
    ("call +44 20 7946 0958 today", {"phone": 1}, "call [PHONE] today"),
    ("call (555) 123-4567", {"phone": 1}, "call [PHONE]"),
    ("call 555-123-4567.", {"phone": 1}, "call [PHONE]."),
    ("ring +4915112345678", {"phone": 1}, "ring [PHONE]"),
    ("tel 030 1234 5678 or a@b.io", {"phone": 1, "email": 1}, "tel [PHONE] or [EMAIL]"),
]
# Numbers an answer about products is full of: none of them is personal data.
NOT_PII = [
    "The K-40 payload is 1200 kg and costs 12,500.00 EUR",
    "released on 2026-12-03 as version 1.2.3, or 03/12/2026",
    "order 4111 1111 1111 1112 (fails the card checksum)",
    "ISBN 978-3-16-148410-0",
    "chunk kestrel-3 v12 id 0123456789abcdef",
    "the sum of 1234 5678 is large",
    "ip 192.168.100.200 port 8080",
    "user@localhost is not an address",
    "between 14 and 53 minutes, 2 kg",
    "timestamp 1733212345",
]


@pytest.mark.parametrize("text,counts,redacted", DETECTED)
def test_pii_is_found_and_replaced(text, counts, redacted):
    assert pii.redact(text) == (redacted, counts)


@pytest.mark.parametrize("text", NOT_PII)
def test_numbers_that_are_not_pii_stay(text):
    assert pii.redact(text) == (text, {})


def test_luhn_checksum():
    assert pii.luhn("4111111111111111") and pii.luhn("378282246310005")
    assert not pii.luhn("4111111111111112")


# -- policies ---------------------------------------------------------------------------------
def guards(**policies) -> GuardsConfig:
    return GuardsConfig(policies=policies, default=next(iter(policies)), hold_back_chars=16)


def test_policies_apply_by_default_adapter_and_key():
    config = GuardsConfig(policies={"base": {}, "legal": {}, "tenant": {}}, default="base", adapters={"legal": "legal"})
    book = GuardBook(config)
    key = SimpleNamespace(key_id="k1", policy="tenant")
    assert [n for n, _ in book.for_request("legal", key).policies] == ["base", "legal", "tenant"]
    assert [n for n, _ in book.for_request("other", None).policies] == ["base"]
    assert GuardBook(GuardsConfig()).for_request("legal", None) is None
    with pytest.raises(APIError) as refused:  # a key bound to a policy this server lacks fails closed
        book.for_request(None, SimpleNamespace(key_id="k2", policy="gone"))
    assert refused.value.status == 403 and "'gone'" in refused.value.message


def test_config_names_its_problems():
    with pytest.raises(ValidationError, match="no policy named 'missing'"):
        GuardsConfig(policies={}, default="missing")
    with pytest.raises(ValidationError, match="not a regular expression"):
        GuardsConfig(policies={"p": {"denied_topics": {"t": ["(unclosed"]}}})
    with pytest.raises(ValidationError, match="has no patterns"):
        GuardsConfig(policies={"p": {"denied_topics": {"t": []}}})
    parsed = TunefetchConfig(governance={"guards": {"policies": {"p": {"pii": "redact"}}, "default": "p"}})
    assert parsed.governance.guards.policies["p"].pii == "redact"


def test_topics_match_words_not_substrings():
    guarded = GuardBook(guards(p={"denied_topics": {"weapons": ["weapons?", "explosives?"]}})).for_request(None, None)
    topics = guarded.topics["p"]
    assert topics.match("How are EXPLOSIVES stored?") == "weapons"
    assert topics.match("The weapon locker") == "weapons"
    assert topics.match("weaponsmith guild and nonexplosive paint") is None


# -- streams: the hold-back window ------------------------------------------------------------
def _stream(texts, finish="stop"):
    async def items():
        for i, text in enumerate(texts):
            yield {"index": 0, "text": text, "finish_reason": finish if i == len(texts) - 1 else None}
        yield {"usage": {"prompt_tokens": 3, "completion_tokens": len(texts)}}
    return items()


def _run(policy: dict, texts: list[str]) -> tuple[list[dict], list]:
    guarded = GuardBook(guards(p=policy)).for_request(None, None)
    answer = SimpleNamespace(n=1, span=SimpleNamespace(add_event=lambda *a: None))

    async def collect():
        return [item async for item in HoldBack(guarded, answer).filter(_stream(texts))]

    return asyncio.run(collect()), guarded.decisions


def test_stream_text_leaves_only_behind_the_window_and_whole_at_the_end():
    texts = ["The dock ", "station charges ", "in two hours ", "when the light is green."]
    guarded = GuardBook(guards(p={"pii": "redact"})).for_request(None, None)
    hold = HoldBack(guarded, SimpleNamespace(n=1, span=SimpleNamespace(add_event=lambda *a: None)))
    raw = sent = ""
    for i, text in enumerate(texts):
        raw += text
        last = i == len(texts) - 1
        out = hold._step({"index": 0, "text": text, "finish_reason": "stop" if last else None})
        sent += out["text"] if out else ""
        if not last:
            assert len(raw) - len(sent) >= min(16, len(raw))  # never closer to the model than the window
    assert sent == raw and out["finish_reason"] == "stop"
    assert [d.action for d in guarded.decisions] == ["pass"]
    out, _ = _run({"pii": "redact"}, texts)
    assert out[-1] == {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}


def test_pii_split_over_deltas_never_leaves_the_gateway():
    texts = ["Write to jane", ".doe@exam", "ple.com or call +44 20 ", "7946 0958 for help."]
    out, decisions = _run({"pii": "redact"}, texts)
    sent = "".join(o.get("text", "") for o in out)
    assert sent == "Write to [EMAIL] or call [PHONE] for help."
    assert [(d.guard, d.action, d.detail) for d in decisions] == [("pii", "redact", "1 email, 1 phone")]


def test_denied_topic_in_a_stream_ends_it_with_the_refusal():
    texts = ["A long harmless opening sentence about docks. ", "Then it turns to ", "explosives and more."]
    out, decisions = _run({"denied_topics": {"weapons": ["explosives?"]}, "refusal": "Withheld."}, texts)
    sent = "".join(o.get("text", "") for o in out)
    assert "explos" not in sent and sent.endswith("Withheld.")
    assert out[-1]["finish_reason"] == CONTENT_FILTER
    assert [(d.stage, d.guard, d.action, d.detail) for d in decisions] == [("output", "topic", "refuse", "weapons")]


# -- attribution ------------------------------------------------------------------------------
PASSAGES = ["The K-40 carries 12 kg over 40 km.", "Batteries last  800 cycles\nat 20 C.", "Docks charge in 2 hours."]
IDS = ["c1", "c2", "c3"]


def test_quotes_are_verified_against_the_passage_they_cite():
    output = json.dumps({"answer": "12 kg", "citations": [
        {"id": 1, "quote": "carries 12 kg"},  # verbatim
        {"id": 2, "quote": "last 800 cycles at 20 C."},  # verbatim once whitespace is normalised
        {"id": 3, "quote": "carries 12 kg"},  # true, but of passage 1: misattributed
        {"id": 1, "quote": "Carries 12 KG"},  # case differs: not verbatim
        {"id": 3, "quote": "charge in 3 hours"},  # not in any passage
        {"id": 2, "quote": ""},  # nothing quoted
        {"id": 7, "quote": "x"},  # not a retrieved passage (impossible under the grammar)
    ]})
    report = verify_quotes(output, PASSAGES, IDS)
    assert [c["verified"] for c in report["citations"]] == [True, True, False, False, False, False]
    assert report["citations"][2]["found_in"] == 1 and "found_in" not in report["citations"][4]
    assert [c["chunk_id"] for c in report["citations"]] == ["c1", "c2", "c3", "c1", "c3", "c2"]
    assert (report["verified"], report["unverified"], report["unknown"]) == (2, 4, 1)
    assert verify_quotes('{"answer": "truncated', PASSAGES, IDS)["parsed"] is False


def test_cite_schema_admits_only_retrieved_passages():
    schema = cite_schema(3, None, 100, 50)
    good = json.dumps({"answer": "yes", "citations": [{"id": 3, "quote": "Docks"}]})
    assert schema_valid(good, schema)
    assert not schema_valid(json.dumps({"answer": "yes", "citations": [{"id": 4, "quote": "x"}]}), schema)
    assert not schema_valid(json.dumps({"answer": "y" * 101, "citations": []}), schema)
    wrapped = cite_schema(2, {"type": "object", "properties": {"kg": {"type": "integer"}}, "required": ["kg"]}, 100, 50)
    assert schema_valid(json.dumps({"answer": {"kg": 12}, "citations": [{"id": 1, "quote": "12 kg"}]}), wrapped)
    assert not schema_valid(json.dumps({"answer": "12", "citations": []}), wrapped)
    assert schema_valid("{}", None) and not schema_valid("[1]", None) and not schema_valid("{", None)


def test_structured_output_is_compact_json_by_default():
    from cluster.config import EngineConfig

    assert EngineConfig().vllm_args()["structured_outputs_config"] == {"backend": "xgrammar",
                                                                       "disable_any_whitespace": True}
    assert EngineConfig(json_whitespace=True).vllm_args()["structured_outputs_config"]["disable_any_whitespace"] is False


def test_control_characters_in_structured_output_are_escaped_not_lost():
    from serving.generator import json_escaped

    raw = '{"product":"dock\x08 station\n","kg":3}'  # what xgrammar let a byte-fallback token produce
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    assert json.loads(json_escaped(raw)) == {"product": "dock\x08 station\n", "kg": 3}


def _request(config: GuardsConfig, log: RefusalLog, prompt: str, max_tokens=None, adapter=None, key=None):
    """Runs GuardInput on a request as the gateway would (`failed` on a refusal); the answer."""
    answer = SimpleNamespace(adapter=adapter, key=key, request=SimpleNamespace(max_tokens=max_tokens, model="m", stream=False),
                             prompt={"messages": [{"role": "user", "content": prompt}]}, query=prompt, model="m",
                             span=trace.INVALID_SPAN)
    stage = GuardInput(GuardBook(config), 64, log)
    try:
        asyncio.run(stage.before(answer))
    except APIError as error:
        asyncio.run(stage.failed(answer, error))
        raise
    return answer


def test_the_strictest_output_limit_wins_and_a_lowered_default_is_not_an_ask(tmp_path):
    config = GuardsConfig(policies={"wide": {"max_output_tokens": 100}, "narrow": {"max_output_tokens": 20}},
                          default="wide", adapters={"a": "narrow"})
    adapter = SimpleNamespace(name="a")

    def run(max_tokens):
        return _request(config, RefusalLog(tmp_path), "hi", max_tokens, adapter).request.max_tokens

    assert run(None) == 20 and run(10) == 10
    with pytest.raises(APIError, match="policy 'narrow' \\(output_length\\): max_tokens 50 exceeds the limit of 20"):
        run(50)


def test_guards_bench_times_the_guard_code():
    from conftest import bench_module

    cost = bench_module("guards_bench").guard_code_cost(reps=5)
    assert cost["us_per_answer_check"] > 0 and cost["us_per_prompt_check"] > 0


def test_metrics_count_each_configured_guard_from_zero():
    from serving.metrics import Measure

    measure = Measure()
    measure.known_guards(GuardsConfig(policies={"a": {"pii": "redact", "max_prompt_chars": 10}, "b": {}}))
    series = {line.split(" ")[0] for line in measure.text().splitlines() if line.startswith("tunefetch_guard_decisions_total")}
    assert series == {'tunefetch_guard_decisions_total{action="pass",guard="%s",policy="%s"}' % pair
                      for pair in [("prompt_length", "a"), ("pii", "a"), ("checks", "a"), ("checks", "b")]}


# -- refusals and feedback text ---------------------------------------------------------------
MIXED = GuardsConfig(policies={"soft": {"pii": "redact"}, "hard": {"pii": "block"}, "topics":
                               {"denied_topics": {"weapons": ["explosives?"]}}}, default="soft")


def test_a_blocking_policy_refuses_personal_data_another_would_only_redact(tmp_path):
    log = RefusalLog(tmp_path)
    prompt = "Mail jane.roe@example.org about the dock"
    soft = _request(MIXED, log, prompt)  # the default alone redacts
    assert soft.prompt["messages"][0]["content"] == "Mail [EMAIL] about the dock" and log.recent() == []
    key = SimpleNamespace(key_id="k1", tenant="acme", policy="hard")
    with pytest.raises(APIError, match="policy 'hard' \\(pii\\)"):  # redacting first must not hide it from "hard"
        _request(MIXED, log, prompt, key=key)
    [refusal] = log.recent()
    assert (refusal.policy, refusal.guard, refusal.detail, refusal.key_id, refusal.tenant) == ("hard", "pii", "1 email",
                                                                                              "k1", "acme")
    assert [(d.policy, d.action) for d in refusal.guards] == [("hard", "block")]
    assert refusal.prompt_chars == len(prompt) and "jane" not in (tmp_path / next(tmp_path.iterdir()).name).read_text()


def test_refusals_are_listed_newest_first_and_a_bad_line_is_skipped(tmp_path):
    log = RefusalLog(tmp_path)
    key = SimpleNamespace(key_id="k2", tenant="t", policy="topics")
    for question in ["How are explosives stored?", "Explosive cargo rules?"]:
        with pytest.raises(APIError):
            _request(MIXED, log, question, key=key)
    _request(MIXED, log, "How are batteries stored?", key=key)  # passes: not logged
    with next(tmp_path.iterdir()).open("a") as fh:
        fh.write("{not json\n")
    refusals = log.recent()
    assert [r.guard for r in refusals] == ["topic", "topic"] and refusals[0].time >= refusals[1].time
    assert refusals[0].prompt_sha256 != refusals[1].prompt_sha256 and log.recent(1) == refusals[:1]


def test_feedback_text_follows_the_pii_policy_of_its_request():
    book = GuardBook(MIXED)
    text = {"correction": "Call +44 20 7946 0958", "comment": None}
    assert feedback_text(book.for_request(None, None), dict(text)) == {"correction": "Call [PHONE]", "comment": None}
    hard = book.for_request(None, SimpleNamespace(key_id="k", policy="hard"))
    with pytest.raises(APIError, match="policy 'hard' \\(pii\\): the feedback contains personal data \\(1 phone\\)"):
        feedback_text(hard, dict(text))
    assert feedback_text(hard, {"correction": "explosives are not stocked", "comment": "ok"}) == {
        "correction": "explosives are not stocked", "comment": "ok"}  # topics do not apply to feedback
    assert feedback_text(None, dict(text)) == text
