"""Retrieval benchmark: tunefetch's ingest and search paths vs the raw libraries, one run, one machine.

    .venv/bin/python bench/retrieval_bench.py [--chunks 10000] [--queries 300] [--out FILE]

- ingest throughput: `tunefetch ingest` path (load, chunk, embed, insert, flush, index, verify,
  alias switch) vs a raw `SentenceTransformer.encode()` of the same texts;
- search: KnowledgeStores.search (alias resolution, filters, hit mapping) vs a raw pymilvus
  `search` on the same physical collection with the same vectors and parameters: p50 and QPS;
- recall@10 of the default index (HNSW, ef=128) vs exact numpy search over the same vectors.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)

from cluster.config import load_config  # noqa: E402
from retrieval.embedding import Embedder  # noqa: E402
from retrieval.ingest import ingest  # noqa: E402
from retrieval.milvus_endpoint import milvus_endpoint  # noqa: E402
from retrieval.store import _SEARCH_PARAMS, _OUTPUT_FIELDS, KnowledgeStores  # noqa: E402

WORDS = ("robot dock battery charger warranty return shipment depot aisle lidar firmware console fleet "
         "tote picker sensor route error code maintenance schedule invoice policy travel expense badge "
         "security incident report vendor contract safety zone speed limit pallet order").split()


def make_corpus(root: Path, n: int, seed: int = 0) -> list[str]:
    """n one-chunk documents of ~45 words with unique ids and numbers."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(40))
        text = f"Record {i}: {words}. Reference K-{rng.randint(100, 999)}-{i}."
        (root / f"r{i:05d}.txt").write_text(text)
        texts.append(text)
    return texts


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "docs").mkdir()
        texts = make_corpus(tmp / "docs", args.chunks)
        config = load_config(home=tmp / "home")
        embedder = Embedder()
        embedder.encode(texts[:64])  # warm up

        started = time.perf_counter()
        raw_vectors = embedder.encode(texts)
        raw_encode_s = time.perf_counter() - started

        with milvus_endpoint(config) as address:
            stores = KnowledgeStores(address)
            result = ingest([str(tmp / "docs")], "bench", stores, embedder, config.retrieval, incremental=False)
            assert result.chunks == args.chunks, result.chunks
            collection, _ = stores.current("bench")

            rng = random.Random(1)
            query_texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(args.queries)]
            queries = embedder.encode(query_texts)
            ours, raw, recalls = [], [], []
            stores.search("bench", queries[0], 10)  # warm both paths
            stores.client.search(collection, data=[queries[0].tolist()], limit=10)
            for vector in queries:
                order = [0, 1] if rng.random() < 0.5 else [1, 0]
                for which in order:
                    t0 = time.perf_counter()
                    if which == 0:
                        hits = stores.search("bench", vector, 10).hits
                        ours.append(time.perf_counter() - t0)
                    else:
                        stores.client.search(collection, data=[vector.tolist()], limit=10,
                                             search_params=_SEARCH_PARAMS, output_fields=_OUTPUT_FIELDS)
                        raw.append(time.perf_counter() - t0)
                exact = set(np.argsort(-(raw_vectors @ vector))[:10])
                found = {int(h.doc_id[1:]) for h in hits}
                recalls.append(len(exact & found) / 10)

    report = {
        "chunks": args.chunks,
        "queries": args.queries,
        "ingest": {
            "raw_encode_chunks_per_s": args.chunks / raw_encode_s,
            "tunefetch_ingest_chunks_per_s": result.chunks_per_s,
            "ratio": result.chunks_per_s / (args.chunks / raw_encode_s),
        },
        "search": {
            "raw_p50_ms": percentile(raw, 50) * 1000,
            "tunefetch_p50_ms": percentile(ours, 50) * 1000,
            "raw_qps": len(raw) / sum(raw),
            "tunefetch_qps": len(ours) / sum(ours),
            "qps_ratio": (len(ours) / sum(ours)) / (len(raw) / sum(raw)),
        },
        "recall@10_vs_exact": statistics.mean(recalls),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
