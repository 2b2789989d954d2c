"""Faults on the session server, each injected for real and undone: the provenance log cannot be
written, a Serve replica is killed under load, the Milvus server hangs or dies. Callers get an
answer with its record or a clean retryable error, never a hang, and the server recovers
without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from conftest import KB, bench_module

load_bench = bench_module("load_bench")

BASE = "tiny-llama"


def chat(server: str, model: str = BASE, timeout: float = 120, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "What is the K-40 payload?"}], "max_tokens": 8,
            "temperature": 0, **extra}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=timeout)


def records(home) -> set[str]:
    return {json.loads(line)["provenance_id"] for p in (home / "provenance").glob("*.jsonl")
            for line in p.read_text().splitlines() if line.strip()}


# -- the provenance log -----------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["disk full", "directory not writable"])
def test_no_answer_leaves_without_its_record_and_the_log_recovers(server, home, fault):
    log = home / "provenance"
    today = log / time.strftime("%Y-%m-%d.jsonl", time.gmtime())
    aside = log.with_name("provenance.aside") if fault != "disk full" else today.with_name("today.aside")
    if fault == "disk full":  # every write to /dev/full fails with ENOSPC
        today.touch()
        today.rename(aside)
        today.symlink_to("/dev/full")
    else:  # the directory replaced by a file: nothing can be created in it
        log.rename(aside)
        log.write_text("")
    before = time.time()
    try:
        refused = chat(server)
        streamed = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
            "model": BASE, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        today.unlink() if fault == "disk full" else log.unlink()
        aside.rename(today if fault == "disk full" else log)
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    error = refused.json()["error"]
    assert error["code"] == "provenance_unavailable" and "withheld" in error["message"]
    assert "choices" not in refused.json()
    last = [line for line in streamed.text.splitlines() if line.startswith("data:")][-1]
    assert "provenance_unavailable" in last and "[DONE]" not in streamed.text  # the stream says it is void
    recovered = chat(server)
    assert recovered.status_code == 200 and recovered.json()["provenance_id"] in records(home)
    newest = [json.loads(line) for line in today.read_text().splitlines()][-1]
    assert newest["provenance_id"] == recovered.json()["provenance_id"] and newest["time"] > before


# -- replicas killed under load ----------------------------------------------------------------
def _replica_pids(home, deployment: str) -> set[int]:
    return {pid for pid, label in load_bench.serving_processes(home).items() if label.startswith(f"tunefetch:{deployment}")}


def _engine_cores(home) -> set[int]:
    return {pid for pid, label in load_bench.serving_processes(home).items() if label.startswith("vllm engine core")}


def _load_while(server: str, adapter: str, requests: int, action) -> tuple[load_bench.LoadReport, float]:
    """Runs mixed load, calls `action()` once a few requests are done; returns the report and
    the time `action` ran."""
    at: list[float] = []
    fired = threading.Event()

    def done(n: int) -> None:
        if n >= 8 and not fired.is_set():
            fired.set()
            at.append(time.monotonic())
            threading.Thread(target=action).start()

    report = asyncio.run(load_bench.run_load(server, requests, 8, BASE, adapter.split("@")[0], KB, timeout_s=180,
                                             on_done=done))
    return report, at[0]


def _first_200_after(server: str, killed_at: float, deadline_s: float = 240, **extra) -> float:
    while time.monotonic() - killed_at < deadline_s:
        try:
            if chat(server, timeout=60, **extra).status_code == 200:
                return time.monotonic() - killed_at
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"no answer within {deadline_s} s of the kill")


@pytest.mark.parametrize("deployment", ["Generator", "Retriever"])
def test_a_replica_killed_under_load_is_replaced_and_callers_get_clean_errors(server, home, adapter, ingested,
                                                                              deployment):
    before = _replica_pids(home, deployment)
    assert len(before) == 1, load_bench.serving_processes(home)
    engines_before = _engine_cores(home)
    victim = before.pop()
    report, killed_at = _load_while(server, adapter, 60, lambda: os.kill(victim, signal.SIGKILL))
    assert report.bad == [], report.summary()  # 200, or 429/503 with Retry-After, or a stream's error event
    assert sum(report.statuses.values()) == 60
    extra = {"retrieval": {"kb": KB}} if deployment == "Retriever" else {}
    recovery_s = _first_200_after(server, killed_at, **extra)
    replaced = _replica_pids(home, deployment)
    assert len(replaced) == 1 and victim not in replaced
    print(f"{deployment} replica killed: {report.statuses}, answering again after {recovery_s:.0f} s")
    if deployment == "Generator":  # the dead replica's engine core went with it
        deadline = time.monotonic() + 60
        while (engines_before & _engine_cores(home)) and time.monotonic() < deadline:
            time.sleep(1)
        assert not engines_before & _engine_cores(home) and len(_engine_cores(home)) == 1
    assert load_bench.missing_records(home, report.provenance_ids) == []


# -- the Milvus server -------------------------------------------------------------------------
def _milvus_pid(home) -> int:
    state = json.loads((home / "milvus" / "server.json").read_text())
    return state.get("server_pid") or state["pid"]


def test_a_hung_store_backend_opens_the_circuit_and_recovers_when_it_returns(server, home, ingested):
    pid = _milvus_pid(home)
    os.kill(pid, signal.SIGSTOP)  # hung: connections open, nothing answers
    try:
        timings, errors = [], []
        for _ in range(4):
            started = time.monotonic()
            response = chat(server, retrieval={"kb": KB})
            timings.append(time.monotonic() - started)
            errors.append(response.json().get("error", {}))
            assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1, response.text
        assert {e["code"] for e in errors} == {"retrieval_unavailable"}
        assert "circuit open" in errors[-1]["message"] and timings[-1] < 1.0 < timings[0]  # no more waiting
        fallback = chat(server, retrieval={"kb": KB, "on_unavailable": "answer"})
        body = fallback.json()
        assert fallback.status_code == 200 and body["grounded"] is False and body["citations"] == []
        assert "unavailable" in body["retrieval_error"]
        record = [json.loads(line) for p in (home / "provenance").glob("*.jsonl") for line in p.read_text().splitlines()
                  if body["provenance_id"] in line][0]
        assert record["retrieval"] is None and "unavailable" in record["retrieval_error"]
        assert chat(server).status_code == 200  # generation without retrieval is untouched
    finally:
        os.kill(pid, signal.SIGCONT)
    recovered = _first_200_after(server, time.monotonic(), 60, retrieval={"kb": KB})
    assert chat(server, retrieval={"kb": KB}).json()["citations"]
    print(f"store backend back: answering with citations after {recovered:.0f} s")


def test_a_killed_store_backend_is_restarted_and_serving_recovers(server, home, ingested):
    pid = _milvus_pid(home)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    recovery_s = _first_200_after(server, killed_at, 120, retrieval={"kb": KB})
    assert _milvus_pid(home) != pid
    assert chat(server, retrieval={"kb": KB}).json()["citations"]
    print(f"store backend killed: answering with citations again after {recovery_s:.0f} s")
