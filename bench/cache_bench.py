"""Retrieval cache benchmark: the retriever deployment's code with the cache on vs off, one run.

    .venv/bin/python bench/cache_bench.py [--chunks 2000] [--requests 2000] [--distinct 400] [--out FILE]

A replay of questions with repeats (Zipf over `distinct` questions, as support traffic looks)
goes through the Retriever class that Serve runs (embed, resolve the alias, search), in-process:
- hit p50 vs miss p50, and both against the uncached path;
- hit rate of the replay;
- staleness: halfway through, the store is re-ingested with changed content (the alias moves);
  every cached answer is compared with what the uncached retriever returns at that moment. A
  hit that differs, or that names a collection the alias no longer points at, is stale.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)
from retrieval_bench import WORDS, make_corpus, percentile  # noqa: E402

from cluster.config import TelemetryConfig, load_config  # noqa: E402
from retrieval.embedding import Embedder  # noqa: E402
from retrieval.ingest import ingest  # noqa: E402
from retrieval.milvus_endpoint import milvus_endpoint  # noqa: E402
from retrieval.store import KnowledgeStores  # noqa: E402
from serving.retriever import Retriever  # noqa: E402

KB = "bench"


def questions(n_distinct: int, n_requests: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(WORDS) for _ in range(8)) + "?" for _ in range(n_distinct)]
    weights = np.array([1 / (rank + 1) ** 1.1 for rank in range(n_distinct)])
    picks = np.random.default_rng(seed).choice(n_distinct, size=n_requests, p=weights / weights.sum())
    # Callers type the same question differently: case and spacing vary, the hit must not.
    return [pool[i].upper() if rng.random() < 0.2 else pool[i] for i in picks]


async def replay(cached, uncached, stores, asked: list[str], reingest) -> dict:
    hit_ms, miss_ms, plain_ms, stale, hits = [], [], [], 0, 0
    for i, question in enumerate(asked):
        if i == len(asked) // 2:
            reingest()
        t0 = time.perf_counter()
        result = await cached.retrieve(KB, question, 3, None, {})
        elapsed = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        truth = await uncached.retrieve(KB, question, 3, None, {})
        plain_ms.append((time.perf_counter() - t0) * 1000)
        (hit_ms if result.cached else miss_ms).append(elapsed)
        hits += result.cached
        current, _ = stores.current(KB)
        if [h.chunk_id for h in result.hits] != [h.chunk_id for h in truth.hits] or result.collection != current:
            stale += 1
    return {"hit_ms": hit_ms, "miss_ms": miss_ms, "plain_ms": plain_ms, "stale": stale, "hits": hits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "docs").mkdir()
        make_corpus(tmp / "docs", args.chunks)
        config = load_config(home=tmp / "home")
        embedder = Embedder()
        with milvus_endpoint(config) as address:
            stores = KnowledgeStores(address)
            ingest([str(tmp / "docs")], KB, stores, embedder, config.retrieval, incremental=False)

            def reingest() -> None:  # every document changes: new chunk ids, new vectors
                for path in (tmp / "docs").glob("*.txt"):
                    path.write_text(path.read_text() + " Revised edition.")
                ingest([str(tmp / "docs")], KB, stores, embedder, config.retrieval, incremental=False)

            retriever = Retriever.func_or_class
            cached = retriever(address, 3, TelemetryConfig(), None, cache_entries=4096)
            uncached = retriever(address, 3, TelemetryConfig(), None, cache_entries=None)
            asked = questions(args.distinct, args.requests)
            asyncio.run(uncached.retrieve(KB, asked[0], 3, None, {}))  # warm both paths
            run = asyncio.run(replay(cached, uncached, stores, asked, reingest))

    hit_p50, miss_p50 = percentile(run["hit_ms"], 50), percentile(run["miss_ms"], 50)
    report = {
        "chunks": args.chunks, "requests": args.requests, "distinct_questions": args.distinct,
        "hit_rate": run["hits"] / args.requests,
        "hit_p50_ms": hit_p50, "miss_p50_ms": miss_p50, "uncached_p50_ms": percentile(run["plain_ms"], 50),
        "hit_p99_ms": percentile(run["hit_ms"], 99), "miss_p99_ms": percentile(run["miss_ms"], 99),
        "miss_over_hit_p50": miss_p50 / hit_p50,
        "stale_hits_after_reingest": run["stale"],
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
