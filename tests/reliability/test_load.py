"""A bounded smoke of bench/load_bench.py on the session server: mixed requests (base, adapter,
retrieval, streaming, completions) at concurrency 16, nothing but 200 or a retryable 429/503,
and a provenance record for every answer. The full run (2,000 at 32, memory slopes) is the
bench's."""

from __future__ import annotations

import asyncio

from conftest import KB, bench_module

load_bench = bench_module("load_bench")


def test_mixed_load_answers_everything_and_records_every_answer(server, home, adapter, ingested):
    report = asyncio.run(load_bench.run_load(server, 150, 16, "tiny-llama", adapter.split("@")[0], KB))
    assert report.bad == [] and sum(report.statuses.values()) == 150, report.summary()
    assert len(report.provenance_ids) == report.statuses.get("200", 0) >= 140
    assert len(set(report.provenance_ids)) == len(report.provenance_ids)
    assert load_bench.missing_records(home, report.provenance_ids) == []
    summary = report.summary()
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
