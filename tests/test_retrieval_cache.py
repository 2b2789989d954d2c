"""The retrieval cache (serving.cache.retrieval, on in the session server's config): repeated
questions are answered from it, and no hit ever crosses a store version, through a new version
and a rollback. Unit tests of the key and the LRU below."""

from __future__ import annotations

import httpx
import numpy as np

from retrieval.cache import LRU, StoreVersion, normalize_query, result_key

STORE = "beacons"
QUESTION = "How long does the K-9 beacon battery last?"


def _ask(server: str, question: str = QUESTION) -> list[dict]:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": question}], "max_tokens": 1,
            "temperature": 0, "retrieval": {"kb": STORE, "top_k": 1}}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["citations"]


def _lookups(server: str, result: str) -> float:
    for line in httpx.get(f"{server}/metrics", timeout=30).text.splitlines():
        if line.startswith("tunefetch_retrieval_cache_lookups_total{") and f'kb="{STORE}"' in line \
                and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _ingest(cli, tmp_path, hours: int) -> None:
    docs = tmp_path / f"beacons-{hours}"
    docs.mkdir()
    (docs / "k9-beacon.md").write_text(f"# K-9 beacon\n\nThe K-9 beacon battery lasts {hours} hours on one charge.\n")
    cli("ingest", str(docs), "--kb", STORE)


def test_a_repeated_question_is_a_hit_and_no_hit_crosses_a_store_version(server, cli, tmp_path):
    _ingest(cli, tmp_path, 40)
    misses, hits = _lookups(server, "miss"), _lookups(server, "hit")
    first = _ask(server)
    again = _ask(server, "  how long does the K-9 BEACON battery last?")  # same for the embedder
    assert again == first and first[0]["kb_version"] == 1
    assert (_lookups(server, "miss"), _lookups(server, "hit")) == (misses + 1, hits + 1)

    _ingest(cli, tmp_path, 55)  # new content: the alias moves to v2
    fresh = _ask(server)
    assert fresh[0]["kb_version"] == 2 and fresh[0]["chunk_id"] != first[0]["chunk_id"]
    assert _lookups(server, "miss") == misses + 2

    cli("kb", "rollback", STORE, "--to", "v1")  # back: v1's entry is still right, and still there
    assert _ask(server) == first
    assert _lookups(server, "hit") == hits + 2


def test_the_normalized_query_embeds_exactly_as_the_raw_one():
    """Normalization must be invisible to the embedder, or a hit would answer another query."""
    from retrieval.embedding import Embedder

    raw = ["How long does the K-9 BEACON battery last?", "warranty   of the\tDockStation ", "Ünïcode Straße"]
    embedder = Embedder()
    vectors = embedder.encode(raw)
    normalized = embedder.encode([normalize_query(q) for q in raw])
    assert np.allclose(vectors, normalized, atol=1e-6)


def test_the_key_names_the_physical_version_filters_and_top_k():
    v1 = StoreVersion("beacons__v1", 1, 1_700_000_000)
    base = result_key(v1, "Q", {"doc_id": "a"}, 3)
    assert result_key(v1, "  q ", {"doc_id": "a"}, 3) == base
    # A version number reused after its collection was dropped is another version.
    assert result_key(StoreVersion("beacons__v1", 1, 1_700_000_999), "Q", {"doc_id": "a"}, 3) != base
    assert result_key(StoreVersion("beacons__v2", 2, 1_700_000_000), "Q", {"doc_id": "a"}, 3) != base
    assert result_key(v1, "Q", {"doc_id": "b"}, 3) != base and result_key(v1, "Q", None, 3) != base
    assert result_key(v1, "Q", {"doc_id": "a"}, 4) != base


def test_the_lru_keeps_the_recently_used_and_stays_bounded():
    cache = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
