"""The retriever deployment: the embedder and the Milvus client, shared by all gateway replicas."""

from __future__ import annotations

import asyncio
import dataclasses

from ray import serve

from cluster.config import TelemetryConfig
from cluster.errors import NotFound, UserError
from cluster.telemetry import extract_context, setup_tracing, tracer
from retrieval.cache import LRU, normalize_query, result_key
from retrieval.embedding import Embedder
from retrieval.freshness import store_freshness
from retrieval.milvus_endpoint import MilvusAddress
from retrieval.store import KnowledgeStores, SearchResult
from serving.protocol import APIError


@serve.deployment
class Retriever:
    def __init__(self, milvus: MilvusAddress, default_top_k: int, telemetry: TelemetryConfig,
                 search_timeout_s: float | None = None, cache_entries: int | None = None):
        setup_tracing(telemetry, "retriever")
        self.embedder = Embedder()
        self.stores = KnowledgeStores(milvus, search_timeout_s)
        self.default_top_k = default_top_k
        # None: no cache. Else query vectors and results, bounded per replica (retrieval/cache.py).
        self.vectors = LRU(cache_entries) if cache_entries else None
        self.results = LRU(cache_entries) if cache_entries else None

    async def retrieve(self, kb: str, query: str, top_k: int | None, filters: dict | None, trace: dict) -> SearchResult:
        top_k = top_k or self.default_top_k
        with tracer("tunefetch.retriever").start_as_current_span("retrieve", context=extract_context(trace)) as span:
            span.set_attribute("gen_ai.operation.name", "retrieval")
            span.set_attribute("gen_ai.data_source.id", kb)
            span.set_attribute("gen_ai.retrieval.top_k", top_k)
            with tracer("tunefetch.retriever").start_as_current_span("embed"):
                vector = await self._vector(query)
            with tracer("tunefetch.retriever").start_as_current_span("search") as search:
                result = await self._backend(self._search, kb, vector, query, top_k, filters)
                search.set_attribute("tunefetch.kb.collection", result.collection)
                search.set_attribute("tunefetch.kb.version", result.kb_version)
                search.set_attribute("tunefetch.retrieval.hits", len(result.hits))
                search.set_attribute("tunefetch.retrieval.cached", result.cached)
            return result

    async def _vector(self, query: str):
        if self.vectors is None:
            return (await asyncio.to_thread(self.embedder.encode, [query]))[0]
        key = normalize_query(query)
        vector = self.vectors.get(key)
        if vector is None:
            vector = (await asyncio.to_thread(self.embedder.encode, [key]))[0]
            self.vectors.put(key, vector)
        return vector

    def _search(self, kb: str, vector, query: str, top_k: int, filters: dict | None) -> SearchResult:
        if self.results is None:
            return self.stores.search(kb, vector, top_k, filters)
        at = self.stores.resolve(kb)  # per request: the key names the version serving now
        key = result_key(at, query, filters, top_k)
        cached = self.results.get(key)
        if cached is not None:
            return dataclasses.replace(cached, cached=True)
        result = self.stores.search(kb, vector, top_k, filters, at=at)
        self.results.put(key, result)
        return result

    @staticmethod
    async def _backend(call, *args):
        """`call` off the event loop, its failures as API errors: a bad store name or filter is
        the caller's (404/400), anything else the backend's (503, the breaker counts it)."""
        try:
            return await asyncio.to_thread(call, *args)
        except UserError as exc:
            raise APIError(404 if isinstance(exc, NotFound) else 400, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the backend (Milvus) is down, slow or restarting
            reason = (str(exc).splitlines() or [""])[0][:200] or exc.__class__.__name__
            raise APIError(503, f"the knowledge store backend is unavailable: {reason}", "server_error",
                           code="retrieval_unavailable") from None

    async def embed(self, texts: list[str]):
        """Vectors of `texts` (the drift monitor's questions): from the query cache where it
        holds them (they were asked), the rest in one batch."""
        import numpy as np

        keys = [normalize_query(t) for t in texts] if self.vectors is not None else list(texts)
        found = {k: self.vectors.get(k) for k in keys} if self.vectors is not None else {}
        missing = list(dict.fromkeys(k for k in keys if found.get(k) is None))
        if missing:
            found.update(zip(missing, await asyncio.to_thread(self.embedder.encode, missing)))
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.embedder.dim), dtype=np.float32)

    async def freshness(self) -> list:
        """Age and changed sources of every store's serving version (retrieval/freshness.py)."""
        return await asyncio.to_thread(store_freshness, self.stores)

    async def describe(self) -> list[dict]:
        """The serving version of every knowledge store, for the system card."""
        return await asyncio.to_thread(self._describe)

    def _describe(self) -> list[dict]:
        stores = []
        for name in self.stores.names():
            current = next(v for v in self.stores.versions(name) if v.current)
            r = current.record
            stores.append({"name": name, "version": r.version, "collection": current.collection, "sources": r.sources,
                           "documents": r.documents, "chunks": r.rows, "created_at": r.created_at,
                           "embedder": r.embedder})
        return stores
