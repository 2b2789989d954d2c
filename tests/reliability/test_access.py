"""API keys and tenant isolation on the session server, as an operator and two tenants use it.

Keys are created with the CLI while the server runs (it picks them up on the next request). At
the end the keys file is removed, as an operator would to open the server again, so the rest
of the suite runs keyless.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import httpx
import pytest
import yaml

from conftest import CLI, KB, session_files

BASE = "tiny-llama"
OTHER_KB = "globex"


@dataclass
class Tenant:
    key_id: str
    token: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def create_key(cli, *args: str) -> Tenant:
    created = json.loads(cli("keys", "create", *args, "--json").stdout)
    return Tenant(created["key_id"], created["token"])


@pytest.fixture(scope="module")
def tenants(cli, server, tmp_path_factory):
    """acme may use `support` and the Kestrel store, globex `echo` and its own store, ops is admin."""
    docs = tmp_path_factory.mktemp("globex-docs")
    (docs / "globex-pricing.md").write_text("# Globex pricing\n\nThe Globex hover sled costs 9,999 credits "
                                            "and ships within 14 days to any moon base.\n")
    cli("ingest", str(docs), "--kb", OTHER_KB)
    yield {"acme": create_key(cli, "--tenant", "acme", "--adapters", "support", "--kbs", KB),
           "globex": create_key(cli, "--tenant", "globex", "--adapters", "echo", "--kbs", OTHER_KB),
           "ops": create_key(cli, "--tenant", "ops", "--admin")}
    cli.home.joinpath("keys.json").unlink()  # the operator opens the server again


def ask(server, tenant: Tenant | None, model: str = BASE, kb: str | None = None, **retrieval) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "What does the hover sled cost?"}],
            "max_tokens": 8, "temperature": 0}
    if kb:
        body["retrieval"] = {"kb": kb, "top_k": 3, **retrieval}
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=tenant.headers if tenant else None,
                      timeout=120)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


def test_without_a_valid_key_nothing_answers(server, tenants):
    bad = {"Authorization": "Bearer tfk_000000000000_" + "x" * 43}
    for headers in (None, bad, {"Authorization": "Basic YTpi"}):
        response = httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=30,
                              json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
        assert_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        for path in ("/v1/models", "/v1/admin/card", "/metrics", "/v1/provenance/prov-" + "0" * 32):
            assert_error(httpx.get(f"{server}{path}", headers=headers, timeout=30), 401, "invalid_api_key")
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200  # probes need no key
    # 401 comes before any parsing: garbage from a stranger learns nothing about the API
    assert_error(httpx.post(f"{server}/v1/chat/completions", content=b"{", timeout=30), 401, "invalid_api_key")


def test_a_tenant_uses_its_adapters_and_stores_and_nothing_else(server, tenants):
    acme = tenants["acme"]
    response = ask(server, acme, "support", kb=KB)
    assert response.status_code == 200, response.text
    assert {c["kb"] for c in response.json()["citations"]} == {KB}
    assert ask(server, acme, BASE).status_code == 200  # the base model needs no adapter scope
    for model, kb in (("echo", None), ("echo@v1", None), ("ghost", None), (BASE, OTHER_KB), ("support", "nokb")):
        error = assert_error(ask(server, acme, model, kb=kb), 403, "forbidden")
        assert acme.key_id in error["message"]
    # an adapter that does not exist reads the same as one outside the scope
    assert "ghost" in assert_error(ask(server, acme, "ghost"), 403, "forbidden")["message"]


def test_retrieval_only_requests_are_scoped_like_chat(server, tenants):
    def retrieve(tenant: Tenant | None, kb: str) -> httpx.Response:
        return httpx.post(f"{server}/v1/retrieve", headers=tenant.headers if tenant else None, timeout=60,
                          json={"query": "hover sled price", "retrieval": {"kb": kb}})

    assert_error(retrieve(None, KB), 401, "invalid_api_key")
    assert_error(retrieve(tenants["acme"], OTHER_KB), 403, "forbidden")
    assert retrieve(tenants["acme"], KB).json()["kb"] == KB
    assert "hover sled" in retrieve(tenants["globex"], OTHER_KB).json()["data"][0]["text"]


def test_a_tenant_never_sees_another_tenants_chunks(server, tenants):
    """globex's store answers globex with its own passage; acme asking the same question gets
    only Kestrel passages, whatever filters it sends."""
    globex = ask(server, tenants["globex"], "echo", kb=OTHER_KB).json()
    assert [c["doc_id"] for c in globex["citations"]] == ["globex-pricing"]
    for filters in ({"doc_id": "globex-pricing"}, {"source": {"gte": 0}}, {"doc_id": ['x" or doc_id != "']}):
        response = ask(server, tenants["acme"], "support", kb=KB, filters=filters)
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            assert all(c["kb"] == KB and c["doc_id"] != "globex-pricing" for c in response.json()["citations"])


def test_models_lists_only_what_the_key_may_use(server, tenants):
    ids = {m["id"] for m in httpx.get(f"{server}/v1/models", headers=tenants["acme"].headers).json()["data"]}
    assert BASE in ids and "support" in ids and "support@v1" in ids
    assert not any(i.startswith("echo") for i in ids)
    ids = {m["id"] for m in httpx.get(f"{server}/v1/models", headers=tenants["ops"].headers).json()["data"]}
    assert {"support", "echo@v1"} <= ids


def test_provenance_over_http_is_the_tenants_own(server, tenants, cli):
    answer = ask(server, tenants["acme"], "support", kb=KB).json()
    url = f"{server}/v1/provenance/{answer['provenance_id']}"
    record = httpx.get(url, headers=tenants["acme"].headers).json()
    assert record["tenant"] == "acme" and record["key_id"] == tenants["acme"].key_id
    assert record["adapter"]["ref"] == answer["model"] and record["retrieval"]["kb"] == KB
    # another tenant cannot tell it from a record that does not exist; the admin reads it
    assert_error(httpx.get(url, headers=tenants["globex"].headers), 404, "not_found")
    assert httpx.get(url, headers=tenants["ops"].headers).json() == record
    for hostile in ("..%2F..%2Fkeys.json", "prov-" + "0" * 32, "x" * 5000):
        assert_error(httpx.get(f"{server}/v1/provenance/{hostile}", headers=tenants["ops"].headers), 404,
                     "not_found")
    assert json.loads(cli("provenance", "show", answer["provenance_id"], "--json").stdout)["tenant"] == "acme"


def test_feedback_is_scoped_to_the_tenants_own_answers_and_kept_per_key(server, tenants, cli):
    answer = ask(server, tenants["acme"], "support", kb=KB).json()
    post = lambda tenant, **body: httpx.post(f"{server}/v1/feedback", headers=tenant.headers if tenant else None,  # noqa: E731
                                             json={"provenance_id": answer["provenance_id"], **body}, timeout=60)
    assert_error(post(None, score=1), 401, "invalid_api_key")
    # another tenant cannot score (or learn of) acme's answer; acme and the admin can, each once
    assert_error(post(tenants["globex"], score=0), 404, "not_found")
    mine = post(tenants["acme"], score=0.0, label="wrong").json()
    assert mine["provenance_id"] == answer["provenance_id"] and mine["model"] == answer["model"]
    admin = post(tenants["ops"], score=1.0).json()
    assert admin["feedback_id"] != mine["feedback_id"] and not admin["replaced"]
    assert post(tenants["acme"], score=0.2, label="wrong").json() == {**mine, "replaced": True}
    shown = json.loads(cli("review", "show", answer["provenance_id"], "--json").stdout)
    assert sorted((f["tenant"], f["score"]) for f in shown["feedback"]) == [("acme", 0.2), ("ops", 1.0)]
    assert "negative_feedback" in shown["reasons"]


def test_admin_actions_need_the_admin_scope(server, tenants):
    acme, ops = tenants["acme"].headers, tenants["ops"].headers
    for method, path in (("GET", "/v1/admin/card"), ("GET", "/v1/admin/canary"), ("GET", "/v1/admin/monitor"),
                         ("GET", "/metrics"),
                         ("POST", "/v1/admin/canary/support/rollback")):
        assert_error(httpx.request(method, f"{server}{path}", headers=acme, timeout=60), 403, "forbidden")
    assert httpx.get(f"{server}/v1/admin/card", headers=ops, timeout=60).status_code == 200
    assert "tunefetch_requests_total" in httpx.get(f"{server}/metrics", headers=ops, timeout=60).text


def test_the_cli_sends_its_configured_key(server, tenants, cli):
    env = {"TUNEFETCH_CLIENT__API_KEY": tenants["acme"].token}
    out = cli("query", "What is the payload capacity of the K-40?", "--model", "support", "--kb", KB,
              "--max-tokens", "8", env=env).stdout
    assert "[support@v" in out and tenants["acme"].token not in out
    denied = cli("query", "hi", "--model", "echo", env=env, check=False)
    assert denied.returncode != 0 and "403" in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
    listed = cli("keys", "list").stdout
    assert tenants["acme"].key_id in listed and "admin" in listed and "tfk_" not in listed


def test_the_charts_smoke_check_uses_its_key_and_reports_keys_in_force_without_one(server, tenants):
    """`python -m tunefetch.smoke URL`, what the Helm chart's `helm test` pod runs."""
    def smoke(url: str, token: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TUNEFETCH_CLIENT__API_KEY"}
        env |= {"TUNEFETCH_CLIENT__API_KEY": token} if token else {}
        return subprocess.run([sys.executable, "-m", "tunefetch.smoke", url], env=env, capture_output=True,
                              text=True, timeout=120)

    keyed = smoke(server, tenants["acme"].token)
    assert keyed.returncode == 0 and "ok: /healthz 200" in keyed.stdout, keyed.stderr
    assert re.search(r"ok: /v1/models 200: \d+ models \(tiny-llama first\)", keyed.stdout)
    keyless = smoke(server, None)
    assert keyless.returncode == 0 and "401 without a key" in keyless.stdout
    wrong = smoke(server, "tfk_000000000000_" + "x" * 43)
    assert wrong.returncode == 1 and "/v1/models answered 401" in wrong.stderr


def test_a_revoked_key_stops_at_the_next_request_and_a_broken_keys_file_fails_closed(server, tenants, cli):
    late = create_key(cli, "--tenant", "acme")
    assert ask(server, late).status_code == 200
    cli("keys", "revoke", late.key_id)
    assert "revoked" in assert_error(ask(server, late), 401, "invalid_api_key")["message"]
    path = cli.home / "keys.json"
    good = path.read_bytes()
    path.write_bytes(good[:40])
    try:
        assert_error(ask(server, tenants["ops"]), 503, "keys_unavailable")
    finally:
        path.write_bytes(good)
    assert ask(server, tenants["ops"]).status_code == 200


def test_tokens_appear_in_no_log_record_span_or_output(server, tenants, home, collector):
    tokens = [t.token for t in tenants.values()]
    secrets = [t.split("_")[-1].encode() for t in tokens]
    leaked = [str(p) for p in session_files(home) if any(s in p.read_bytes() for s in secrets)]
    assert leaked == []
    for span in collector.spans():
        assert not any(t in json.dumps(span.attributes, default=str) for t in tokens)
    assert any(s.attributes.get("tunefetch.tenant") == "acme" for s in collector.spans())


def test_a_server_open_to_the_network_refuses_to_start_without_keys(tmp_path, local_model, cli):
    config = tmp_path / "exposed.yaml"
    config.write_text(yaml.safe_dump({"serving": {"host": "0.0.0.0", "port": 1,
                                                  "engine": {"model": str(local_model)}}}))
    empty_home = tmp_path / "home"
    proc = CLI(empty_home, config)("serve", check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "keys create" in proc.stderr
    assert "0.0.0.0" in proc.stderr and not (empty_home / "milvus").exists()
