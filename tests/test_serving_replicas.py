"""Two generator replicas serving adapters from an S3 registry: each adapter's requests go to a
replica that already holds it (Serve model multiplexing), answers stay exact, and load beyond
the bounded queue is shed with 429."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import CLI, free_port, running_server, s3_uri

ADAPTERS = ["support@v1", "echo@v1"]
RELAY = ["relay@v1", "relay@v2"]  # byte-copies of support@v1, only in this module's S3 registry


@pytest.fixture(scope="module")
def replicas(home, s3_endpoint, adapter, second_adapter, server, tmp_path_factory):
    """A second `tunefetch serve`: two generator replicas, max_loras 1, registry on S3. It joins
    the Milvus Lite of the session's server (which owns it and outlives this module)."""
    from training.registry import AdapterRegistry

    local = AdapterRegistry(home / "adapters")
    uri = s3_uri(s3_endpoint, uuid.uuid4().hex)
    remote = AdapterRegistry(uri)
    for ref in ADAPTERS:
        version = local.get(ref)
        remote.register(version.name, local.local_dir(version), version.record)
    for _ in RELAY:
        remote.register("relay", local.local_dir(local.get("support@v1")), local.get("support@v1").record)
    work = tmp_path_factory.mktemp("replicas")
    config = work / "replicas.yaml"
    config.write_text(yaml.safe_dump({
        "registry": {"uri": uri},
        "serving": {"port": free_port(), "app_name": "replicas",
                    # 2 x 2 in flight + 2 queued: a burst of BURST must be shed in part
                    "generator": {"num_replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 2,
                                  "max_queued_requests": 2},
                    "engine": {"max_loras": 1, "max_cpu_loras": 1}},
    }))
    cli = CLI(home, config)
    # A canary started before this server exists: its state is in the home, not in a process.
    cli("canary", "rollback", "relay", "--to", "v1")
    cli("canary", "start", "relay", "--to", "v2", "--weight", "0.5", "--manual")
    with running_server(home, config, work / "serve.log") as url:
        yield url, cli


def post(url: str, model: str, question: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def ask(url: str, model: str, question: str, **extra) -> dict:
    response = post(url, model, question, **extra)
    assert response.status_code == 200, response.text
    return response.json()


def replica_of(cli: CLI, answer: dict) -> str:
    record = json.loads(cli("provenance", "show", answer["provenance_id"], "--json").stdout)
    return record["generator_replica"]


def test_models_come_from_the_s3_registry(replicas):
    url, _ = replicas
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert ids == {"tiny-llama", "support", "echo", "relay", *ADAPTERS, *RELAY}  # exactly what the S3 registry holds


def test_each_adapter_stays_on_the_replica_that_holds_it(replicas, server):
    url, cli = replicas
    for model in ADAPTERS:  # first use loads it on some replica; the gateway's router learns
        ask(url, model, "warm up")  # which one from the controller within a fraction of a second
        time.sleep(1)
    seen: dict[str, set[str]] = {model: set() for model in ADAPTERS}
    reference: dict[str, str] = {}
    for _ in range(4):
        for model in ADAPTERS:
            answer = ask(url, model, "How do I reset a K-200?")
            seen[model].add(replica_of(cli, answer))
            assert answer["model"] == model
            text = answer["choices"][0]["message"]["content"]
            assert reference.setdefault(model, text) == text  # same replica, same greedy answer
    assert all(len(replicas_used) == 1 for replicas_used in seen.values()), seen
    # The same version through the single-replica app (local registry) answers identically.
    for model in ADAPTERS:
        assert ask(server, model, "How do I reset a K-200?")["choices"][0]["message"]["content"] == reference[model]


# Far beyond the 6 requests the app takes at once, and long enough that none finishes before the
# burst has arrived: 16 short ones (48 tokens) were all answered on a fast, quiet machine.
BURST, BURST_TOKENS = 32, 160


def test_a_burst_beyond_the_queue_is_shed_with_429_and_service_goes_on(replicas):
    url, _ = replicas
    with ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(lambda i: post(url, "tiny-llama", f"burst {i}", BURST_TOKENS,
                                                 min_tokens=BURST_TOKENS), range(BURST)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    for shed in (r for r in responses if r.status_code == 429):
        assert shed.json()["error"]["code"] == "server_overloaded" and shed.headers["retry-after"] == "1"
    assert ask(url, "support@v1", "still there?")["model"] == "support@v1"


def test_a_streaming_burst_is_shed_with_429_before_any_token(replicas):
    url, _ = replicas

    def stream(i: int) -> tuple[int, str]:
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": f"burst {i}"}],
                "max_tokens": BURST_TOKENS, "min_tokens": BURST_TOKENS, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            return response.status_code, response.read().decode()

    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(stream, range(BURST)))
    assert {status for status, _ in results} == {200, 429}, [status for status, _ in results]
    for status, text in results:
        if status == 429:  # an OpenAI error body, not an SSE stream that fails later
            assert json.loads(text)["error"]["code"] == "server_overloaded"
        else:
            assert text.rstrip().endswith("data: [DONE]")


def test_a_canary_set_before_the_server_started_splits_its_callers(replicas):
    from serving.canary import assign

    url, cli = replicas
    users = [f"restart-{i}" for i in range(12)]
    expected = {u: RELAY[1] if assign("relay", f"user:{u}", 0.5) == "canary" else RELAY[0] for u in users}
    assert set(expected.values()) == set(RELAY)
    assert {u: ask(url, "relay", "warm up", user=u)["model"] for u in users} == expected
    cli("canary", "rollback", "relay")


def _generator_replica_pids(app: str) -> list[int]:
    title = f"ray::ServeReplica:{app}:Generator".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_a_request_whose_generator_replica_dies_gets_503_and_retry_after(replicas):
    """Runs last in this module: it kills the app's generator replicas (Serve replaces them)."""
    url, _ = replicas
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(post, url, "tiny-llama", "a long answer", 1500, min_tokens=1500)
        time.sleep(3)  # the request is in the engine now
        pids = _generator_replica_pids("replicas")
        assert pids, "no generator replica process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        response = pending.result(timeout=120)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable" and response.headers["retry-after"] == "1"
