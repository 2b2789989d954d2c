"""Structured output, strict citations and guard policies on the session server, as clients use
them: `response_format`, `retrieval.cite: "strict"`, and API keys bound to the guard policies of
the suite's config (conftest.GUARDS). The keys file is removed at the end, so the rest of the
suite runs keyless."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from jsonschema import Draft202012Validator

from conftest import KB, session_files

BASE = "tiny-llama"
PRODUCT = {"type": "object", "additionalProperties": False, "required": ["product", "kg", "in_stock"],
           "properties": {"product": {"type": "string", "maxLength": 24}, "kg": {"type": "integer", "minimum": 0,
                                                                                "maximum": 500},
                          "in_stock": {"type": "boolean"}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "product", "schema": PRODUCT, "strict": True}}


def post(url: str, path: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=180)


def chat_body(question: str, **extra) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": question}], "temperature": 0, **extra}


def streamed(url: str, path: str, body: dict, key: str | None = None) -> tuple[list[str], dict, list[dict]]:
    """A stream's text per choice, its finish reasons, and every chunk."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    chunks = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, headers=headers, timeout=180) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    texts, reasons = {}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content", "") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
            reasons[choice["index"]] = choice["finish_reason"] or reasons.get(choice["index"])
    return [texts[i] for i in sorted(texts)], reasons, chunks


def content(response: httpx.Response) -> str:
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


# -- structured output ------------------------------------------------------------------------
def test_a_batch_of_schema_requests_is_all_valid_and_the_engine_lives_on(server, adapter):
    """Chat and completions, whole and streamed, base model and adapter, at once: every output
    satisfies the schema; free-text requests in the same batches still answer."""
    questions = ["What does the K-40 carry?", "Is the dock station in stock?", "How heavy is a battery pack?",
                 "Name a product and its weight."]

    def one(i: int):
        model = adapter if i % 2 else BASE
        extra = {"model": model, "max_tokens": 64, "seed": i, "temperature": 0.8, "response_format": JSON_SCHEMA}
        if i % 4 == 3:  # a plain request in the same batch
            extra.pop("response_format")
        if i % 3 == 0:
            body = {"prompt": f"Q: {questions[i % 4]}\nA:", **extra}
            path = "/v1/completions"
        else:
            body, path = chat_body(questions[i % 4], **extra), "/v1/chat/completions"
        if i % 5 == 0:
            texts, reasons, _ = streamed(server, path, body)
            return "response_format" in body, texts[0], reasons[0]
        response = post(server, path, body)
        assert response.status_code == 200, response.text
        return "response_format" in body, content(response), response.json()["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    validator = Draft202012Validator(PRODUCT)
    constrained = [(text, reason) for structured, text, reason in results if structured]
    assert len(constrained) == 12
    for text, reason in constrained:
        assert reason == "stop", text
        assert validator.is_valid(json.loads(text)), text
    assert post(server, "/v1/chat/completions", chat_body("Hello", max_tokens=4)).status_code == 200
    assert httpx.get(f"{server}/healthz").status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    assert re.search(r'tunefetch_structured_outputs_total\{.*format="json_schema".*valid="true"\} \d', metrics)
    assert not re.search(r'tunefetch_structured_outputs_total\{.*valid="false"\}', metrics)


def test_json_object_mode_answers_an_object_and_a_cut_off_one_says_so(server):
    response = post(server, "/v1/chat/completions", chat_body("Describe the K-40.", max_tokens=48,
                                                              response_format={"type": "json_object"}))
    assert response.status_code == 200, response.text
    record = httpx.get(f"{server}/v1/provenance/{response.json()['provenance_id']}").json()
    assert record["output_format"] == "json_object"
    if response.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content(response)), dict) and record["schema_valid"] == [True]
    cut = post(server, "/v1/completions", {"model": BASE, "prompt": "Q: K-40?\nA:", "max_tokens": 3,
                                           "response_format": JSON_SCHEMA})
    assert cut.json()["choices"][0]["finish_reason"] == "length"  # reported, not hidden
    record = httpx.get(f"{server}/v1/provenance/{cut.json()['provenance_id']}").json()
    assert record["output_format"] == "json_schema" and record["schema_valid"] == [False]


def test_a_schema_the_grammar_cannot_enforce_is_a_400_and_harms_nothing(server):
    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}
    for stream in (False, True):
        response = post(server, "/v1/chat/completions", chat_body("Hi", max_tokens=8, response_format=unsupported,
                                                                  stream=stream))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_response_format"
        assert "not supported by xgrammar" in response.json()["error"]["message"]
    assert post(server, "/v1/chat/completions", chat_body("Hi", max_tokens=4)).status_code == 200


# -- strict citations -------------------------------------------------------------------------
def _normalised(text: str) -> str:
    return " ".join(text.split())


def test_strict_citations_name_only_retrieved_chunks_and_flag_quotes_truly(server):
    """Over a batch: no citation names a passage that was not retrieved for its request; each
    quote's `verified` flag agrees with the passage text POST /v1/retrieve returns."""
    questions = ["How should spare battery packs be stored?", "How do I install the dock station?",
                 "What is the warranty period?", "How do I update the firmware?", "What are the API rate limits?",
                 "What does the code of conduct say?"]
    retrieval = {"kb": KB, "top_k": 3, "cite": "strict"}

    def one(question: str):
        return question, post(server, "/v1/chat/completions", chat_body(question, max_tokens=160, retrieval=retrieval))

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, questions))
    cited = 0
    for question, response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        retrieved = {c["chunk_id"]: c for c in body["citations"]}
        passages = post(server, "/v1/retrieve", {"query": question, "retrieval": {"kb": KB, "top_k": 3}}).json()
        texts = {p["chunk_id"]: _normalised(p["text"]) for p in passages["data"]}
        (report,) = body["attribution"]
        if body["choices"][0]["finish_reason"] == "stop":
            assert report["parsed"] and report["unknown"] == 0
            output = json.loads(content(response))
            assert set(output) == {"answer", "citations"}
            assert all(1 <= c["id"] <= len(retrieved) for c in output["citations"])
        for citation in report["citations"]:
            cited += 1
            assert citation["chunk_id"] in retrieved  # never a chunk that was not retrieved
            assert body["citations"][citation["index"] - 1]["chunk_id"] == citation["chunk_id"]
            quote = _normalised(citation["quote"])
            assert citation["verified"] == (bool(quote) and quote in texts[citation["chunk_id"]])
        record = httpx.get(f"{server}/v1/provenance/{body['provenance_id']}").json()
        assert record["attribution"] == body["attribution"] and record["output_format"] == "cite_strict"
        assert record["prompt_template"] == "rag-cite-strict-v1"
    assert cited > 0


def test_query_cli_prints_strict_citations_with_their_verification(server, cli):
    shown = cli("query", "How should spare battery packs be stored?", "--kb", KB, "--cite", "--max-tokens", "160",
                "--url", server).stdout
    quotes = re.search(r"\n  quotes: (\d+) verified, (\d+) not\n", shown)
    assert quotes and "provenance prov-" in shown, shown
    listed = re.findall(r"\n  cites \[\d\] (verified|NOT verified): ", shown)
    assert (listed.count("verified"), listed.count("NOT verified")) == tuple(map(int, quotes.groups()))
    failed = cli("query", "Hi", "--cite", "--url", server, check=False)
    assert failed.returncode == 2 and failed.stderr.strip().endswith("--cite needs --kb: citations name retrieved passages")


def test_strict_citations_wrap_the_callers_schema_and_stream(server):
    body = chat_body("How should spare battery packs be stored?", max_tokens=160, response_format=JSON_SCHEMA,
                     retrieval={"kb": KB, "top_k": 2, "cite": "strict"})
    texts, reasons, chunks = streamed(server, "/v1/chat/completions", body)
    assert chunks[-1]["attribution"][0]["parsed"] is (reasons[0] == "stop")
    if reasons[0] == "stop":
        output = json.loads(texts[0])
        assert Draft202012Validator(PRODUCT).is_valid(output["answer"])
        assert all(c["id"] in (1, 2) for c in output["citations"])


# -- guard policies, bound to API keys --------------------------------------------------------
@pytest.fixture(scope="module")
def keys(cli, server):
    def create(*args: str) -> str:
        return json.loads(cli("keys", "create", "--tenant", "guarded", *args, "--json").stdout)["token"]

    yield {name: create("--policy", name) for name in ("strict", "nopii", "handbook", "nodigits")} | {
        "plain": create(), "admin": create("--admin")}
    cli.home.joinpath("keys.json").unlink()  # the operator opens the server again


def refused(response: httpx.Response, policy: str, guard: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "policy_violation" and f"policy {policy!r} ({guard})" in error["message"], error
    return error["message"]


def test_a_key_bound_to_an_unknown_policy_cannot_be_created(cli):
    failed = cli("keys", "create", "--tenant", "x", "--policy", "nope", check=False)
    assert failed.returncode != 0 and "no guard policy 'nope'" in failed.stderr and "strict" in failed.stderr


def test_input_guards_refuse_what_they_should_and_pass_the_rest(server, keys, collector, cli):
    strict, started = keys["strict"], time.time()
    too_long = post(server, "/v1/chat/completions", chat_body("x" * 401, max_tokens=4), strict)
    refused(too_long, "strict", "prompt_length")
    [span] = collector.wait_for(lambda s: s.name == "chat" and s.trace_id == too_long.headers["traceparent"].split("-")[1])
    assert ("tunefetch.guard", {"stage": "input", "policy": "strict", "guard": "prompt_length", "action": "block",
                                "detail": "the prompt has 401 characters; the limit is 400"}) in span.events
    refused(post(server, "/v1/chat/completions", chat_body("Hi", max_tokens=100), strict), "strict", "output_length")
    message = refused(post(server, "/v1/completions", {"model": BASE, "prompt": "How are EXPLOSIVES made?",
                                                         "max_tokens": 4}, strict), "strict", "topic")
    assert "'weapons'" in message
    # Near misses pass: a long-enough prompt, words that contain a topic's word, a key without the policy.
    for question in ("x" * 400, "Is the weaponsmith guild on the nonexplosive list?"):
        response = post(server, "/v1/chat/completions", chat_body(question, max_tokens=4), strict)
        assert response.status_code == 200, response.text
    assert post(server, "/v1/chat/completions", chat_body("explosives?", max_tokens=4), keys["plain"]).status_code == 200
    unbounded = post(server, "/v1/chat/completions", chat_body("Tell me everything about docks."), strict)
    assert unbounded.json()["usage"]["completion_tokens"] <= 48  # the policy's cap on requests that set none
    record = httpx.get(f"{server}/v1/provenance/{unbounded.json()['provenance_id']}",
                       headers={"Authorization": f"Bearer {keys['admin']}"}).json()
    assert {(d["guard"], d["action"]) for d in record["guards"]} >= {("prompt_length", "pass"), ("topic", "pass"),
                                                                     ("output_length", "pass"), ("pii", "pass")}
    card = httpx.get(f"{server}/v1/admin/card", headers={"Authorization": f"Bearer {keys['admin']}"}).json()
    assert card["facts"]["guards"]["guards.policy.strict"] == ("max_prompt_chars=400; max_output_tokens=48; "
                                                               "denied_topics=weapons; pii=redact")
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {keys['admin']}"}).text
    assert re.search(r'tunefetch_guard_decisions_total\{action="block",guard="topic",policy="strict"\} 1', metrics)
    # Each refusal is in the audit trail under the trace id its 400 carried; the passes are not.
    trail = json.loads(cli("provenance", "refusals", "--limit", "50", "--json").stdout)
    mine = {r["trace_id"]: r for r in trail if r["policy"] == "strict" and r["time"] >= started}
    long_refusal = mine[too_long.headers["traceparent"].split("-")[1]]
    assert (long_refusal["guard"], long_refusal["prompt_chars"], long_refusal["tenant"]) == ("prompt_length", 401, "guarded")
    assert sorted(r["guard"] for r in mine.values()) == ["output_length", "prompt_length", "topic"]
    assert "strict/topic\tweapons\t" in cli("provenance", "refusals").stdout


PERSONAL = {"jane.roe@example.org": "[EMAIL]", "+44 20 7946 0958": "[PHONE]", "4111 1111 1111 1111": "[CARD]"}


def test_pii_is_redacted_before_retrieval_the_model_and_every_record(server, home, cli, keys):
    question = ("My email is jane.roe@example.org, phone +44 20 7946 0958, card 4111 1111 1111 1111. "
                "The K-40 order 2026-12-03 weighs 1200 kg: how do I store spare battery packs?")
    responses = [post(server, "/v1/chat/completions", chat_body(question, max_tokens=16,
                                                                retrieval={"kb": KB, "top_k": 2}), keys["strict"]),
                 post(server, "/v1/completions", {"model": BASE, "prompt": question, "max_tokens": 8, "stream": False},
                      keys["strict"])]
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    for response in responses:
        assert response.status_code == 200, response.text
        record = httpx.get(f"{server}/v1/provenance/{response.json()['provenance_id']}", headers=admin).json()
        assert all(placeholder in record["question"] for placeholder in PERSONAL.values())
        assert "The K-40 order 2026-12-03 weighs 1200 kg" in record["question"]  # not personal data: kept
        assert {"stage": "input", "policy": "strict", "guard": "pii", "action": "redact",
                "detail": "1 card, 1 email, 1 phone"} in record["guards"]
    assert responses[0].json()["guards"] == [{"stage": "input", "policy": "strict", "guard": "pii", "action": "redact",
                                              "detail": "1 card, 1 email, 1 phone"}]
    shown = cli("provenance", "show", responses[0].json()["provenance_id"]).stdout
    assert "; input strict/pii redact (1 card, 1 email, 1 phone)" in shown, shown
    refused(post(server, "/v1/chat/completions", chat_body(question, max_tokens=4), keys["nopii"]), "nopii", "pii")
    # Feedback about an answer goes through its request's PII policy: redacted here ...
    about = {"provenance_id": responses[0].json()["provenance_id"], "score": 0.2}
    sent = post(server, "/v1/feedback", about | {"comment": "Reply to jane.roe@example.org",
                                                  "correction": "Card 4111 1111 1111 1111 is on file"}, keys["strict"])
    assert sent.status_code == 200, sent.text
    stored = [json.loads(line) for f in sorted((home / "feedback").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert {"comment": "Reply to [EMAIL]", "correction": "Card [CARD] is on file"}.items() <= stored[-1].items()
    # ... and refused, with nothing stored, for a key whose policy blocks personal data.
    plain = post(server, "/v1/chat/completions", chat_body("How do I store battery packs?", max_tokens=4), keys["nopii"])
    refused(post(server, "/v1/feedback", {"provenance_id": plain.json()["provenance_id"], "score": 0.1,
                                          "comment": "call +44 20 7946 0958"}, keys["nopii"]), "nopii", "pii")
    leaks = [str(p) for p in session_files(home) for value in PERSONAL
             if value.encode() in p.read_bytes()]
    assert leaks == []  # provenance, feedback, logs (ours, Serve's, vLLM's): none holds the raw values


def test_a_source_allow_list_keeps_other_documents_out_of_the_answer(server, keys):
    body = chat_body("How long is the warranty and how do I store battery packs?", max_tokens=8,
                     retrieval={"kb": KB, "top_k": 5})
    open_sources = {c["source"] for c in post(server, "/v1/chat/completions", body, keys["plain"]).json()["citations"]}
    assert any(not s.endswith("/battery-care.md") for s in open_sources)  # without the policy, other docs come back
    response = post(server, "/v1/chat/completions", body, keys["handbook"])
    assert response.status_code == 200, response.text
    citations = response.json()["citations"]
    assert citations and all(c["source"].endswith("/battery-care.md") for c in citations)
    assert response.json()["guards"][0]["action"] == "filter" and "dropped" in response.json()["guards"][0]["detail"]


def test_an_output_guard_replaces_the_answer_and_streams_hold_back(server, keys):
    question = chat_body("How many cycles does a battery pack last?", max_tokens=48, retrieval={"kb": KB, "top_k": 2})
    free = post(server, "/v1/chat/completions", question, keys["plain"])
    assert re.search(r"\d", content(free)), content(free)  # the unguarded answer states numbers (the prompt: none)
    guarded = post(server, "/v1/chat/completions", question, keys["nodigits"])
    assert content(guarded) == "That answer is withheld by policy."
    assert guarded.json()["choices"][0]["finish_reason"] == "content_filter"
    assert guarded.json()["guards"] == [{"stage": "output", "policy": "nodigits", "guard": "topic", "action": "refuse",
                                         "detail": "numbers"}]
    texts, reasons, _ = streamed(server, "/v1/chat/completions", question, keys["nodigits"])
    assert reasons[0] == "content_filter" and texts[0].endswith("That answer is withheld by policy.")
    assert not re.search(r"\d", texts[0])  # the digits never left the gateway
    plain_stream, _, _ = streamed(server, "/v1/chat/completions", question, keys["plain"])
    assert plain_stream == [content(free)]  # without output checks, the stream is the whole answer
