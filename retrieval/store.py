"""Versioned knowledge stores on Milvus: one physical collection per version, one alias per store.

A store NAME is the alias NAME; version N lives in collection `NAME__vN`. Writing a version
creates a new collection, inserts, flushes, loads and verifies the row count, and only then
moves the alias; a failure drops the partial collection and leaves the alias where it was.
Readers resolve the alias once per request, so a request sees exactly one version.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.config import secret_value
from cluster.errors import NotFound, UserError
from retrieval.cache import StoreVersion
from retrieval.filters import build_filter
from retrieval.milvus_endpoint import MilvusAddress, pid_alive

if TYPE_CHECKING:  # only annotations: listing or searching stores need not import the loaders
    from retrieval.chunking import Chunk

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_VERSION_SUFFIX = re.compile(r"^(?P<name>.+)__v(?P<version>\d+)$")
_META_KEY = "tunefetch.meta"
_NEXT_KEY = "tunefetch.next_version"  # on the serving version, after a drop: the next free number
_INSERT_BATCH = 512
_QUERY_BATCH = 256
# A "writing" version from another host is only presumed dead after this long.
_FOREIGN_WRITER_TIMEOUT_S = 24 * 3600
# HNSW with ef=128: recall@10 0.996 vs exact search on MiniLM vectors (bench/retrieval_bench.py).
_INDEX = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 16, "efConstruction": 200}}
_SEARCH_PARAMS = {"metric_type": "COSINE", "params": {"ef": 128}}
_OUTPUT_FIELDS = ["chunk_id", "doc_id", "section", "source", "text", "content_hash", "kb_version", "ingested_at"]


SCHEMA_VERSION = 2


class Writer(BaseModel):
    pid: int
    host: str


class StoreVersionRecord(BaseModel):
    """What a version's collection records about itself (a collection property). Records
    written before the schema had a version read as schema 1 (same fields)."""

    model_config = ConfigDict(extra="ignore")
    schema_version: int = 1
    version: int
    created_at: int
    state: Literal["writing", "ready"] = "ready"
    writer: Writer | None = None  # who is writing it, while state is "writing"
    rows: int = 0
    embedder: str | None = None
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    documents: int = 0
    sources: list[str] = []
    source_hashes: dict[str, str] = {}  # source -> SHA-256 of its file at ingest (retrieval/freshness.py)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    collection: str
    current: bool
    record: StoreVersionRecord

    @property
    def version(self) -> int:
        return self.record.version

    @property
    def rows(self) -> int:
        return self.record.rows

    @property
    def created_at(self) -> int:
        return self.record.created_at

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


@dataclass(frozen=True)
class SearchResult:
    kb: str
    collection: str  # the physical collection the alias resolved to for this search
    kb_version: int
    hits: list["Hit"]
    cached: bool = False  # answered from the retriever's cache (retrieval/cache.py)

    def to_json(self) -> dict:
        return {"kb": self.kb, "collection": self.collection, "kb_version": self.kb_version,
                "hits": [asdict(h) for h in self.hits]}


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    section: str
    source: str
    text: str
    score: float
    kb_version: int
    collection: str


def validate_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError(f"invalid knowledge store name {name!r}: use letters, digits and _, starting with a letter")
    return name


def collection_name(name: str, version: int) -> str:
    return f"{name}__v{version}"


class KnowledgeStores:
    """The knowledge stores of one Milvus deployment: write a version, search, list, roll back."""

    def __init__(self, address: MilvusAddress, timeout_s: float | None = None):
        from pymilvus import MilvusClient

        self.client = MilvusClient(uri=address.uri, token=secret_value(address.token) or "")
        self._rpc = {"timeout": timeout_s} if timeout_s else {}  # a deadline for each call on the search path
        self._loaded: set[str] = set()
        self._aliases: set[str] = set()

    # -- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Stores that have a serving version (an alias); a first ingest still writing has none."""
        versioned = {m.group("name") for c in self.client.list_collections() if (m := _VERSION_SUFFIX.match(c))}
        return sorted(versioned & set(self.client.list_aliases().get("aliases", [])))

    def current(self, name: str) -> tuple[str, int]:
        """(physical collection, version) the alias points at now."""
        validate_name(name)
        # Ask before describing (pymilvus logs a traceback for every failed RPC); aliases are
        # never deleted, so the list is only refreshed when a name is missing from it.
        if name not in self._aliases:
            self._aliases = set(self.client.list_aliases(**self._rpc).get("aliases", []))
            if name not in self._aliases:
                raise NotFound(f"unknown knowledge store {name!r} (see `tunefetch kb list`)")
        collection = self.client.describe_alias(name, **self._rpc)["collection_name"]
        return collection, int(_VERSION_SUFFIX.match(collection).group("version"))

    def versions(self, name: str) -> list[VersionInfo]:
        validate_name(name)
        current, _ = self.current(name)
        infos = []
        for version in self._version_numbers(name):
            collection = collection_name(name, version)
            record = self._record(collection)
            if record is not None and record.state == "ready":
                infos.append(VersionInfo(name, collection, collection == current, record))
        return infos

    def resolve(self, name: str) -> StoreVersion:
        """The physical version `name` serves now, with its creation time (its identity)."""
        collection, version = self.current(name)
        record = self._record(collection)
        return StoreVersion(collection, version, record.created_at if record else 0)

    def search(self, name: str, vector: np.ndarray, top_k: int, filters: dict | None = None,
               at: StoreVersion | None = None) -> SearchResult:
        """Top hits in the version `name` serves now, or in `at` (resolved by the caller)."""
        collection, version = (at.collection, at.version) if at else self.current(name)
        self._ensure_loaded(collection)
        try:
            hits = self._search(collection, vector, top_k, filters)
        except Exception:
            self._loaded.discard(collection)  # a restarted backend has it released: load again next time
            raise
        return SearchResult(name, collection, version, [
            Hit(
                chunk_id=str(h["chunk_id"]),
                doc_id=h["entity"]["doc_id"],
                section=h["entity"]["section"],
                source=h["entity"]["source"],
                text=h["entity"]["text"],
                score=float(h["distance"]),
                kb_version=int(h["entity"]["kb_version"]),
                collection=collection,
            )
            for h in hits
        ])

    def _search(self, collection: str, vector: np.ndarray, top_k: int, filters: dict | None) -> list[dict]:
        return self.client.search(
            collection,
            data=[np.asarray(vector, dtype=np.float32).tolist()],
            limit=top_k,
            filter=build_filter(filters),
            output_fields=_OUTPUT_FIELDS,
            search_params=_SEARCH_PARAMS,
            **self._rpc,
        )[0]

    def chunk_texts(self, collection: str, chunk_ids: list[str]) -> dict[str, str]:
        """{chunk_id: text} of chunks in one physical collection (a citation names both)."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*__v\d+", collection):
            raise UserError(f"not a knowledge store collection: {collection!r}")
        ids = [i for i in chunk_ids if re.fullmatch(r"[0-9a-f]{1,64}", i)]  # hex ids: safe as literals
        self._ensure_loaded(collection)
        rows = self.client.query(collection, filter=f"chunk_id in {json.dumps(ids)}", output_fields=["chunk_id", "text"])
        return {row["chunk_id"]: row["text"] for row in rows}

    # -- writing ----------------------------------------------------------------------------
    @contextmanager
    def new_version(self, name: str, dim: int, embedder: str, documents: int, sources: list[str],
                    chunking: tuple[int, int] | None = None, keep: int = 0,
                    source_hashes: dict[str, str] | None = None) -> Iterator["VersionWriter"]:
        """A writer for the next version of `name`. On a clean exit the version is flushed,
        loaded, its row count verified, marked ready, and only then the alias moves to it;
        any exception (or Ctrl-C) drops the partial collection. `keep` > 0 then drops all but
        the newest `keep` versions (never the current one)."""
        validate_name(name)
        # Numbered before abandoned writes are dropped: a number is never used twice.
        version = self._next_version(name)
        self.drop_abandoned(name)
        collection = collection_name(name, version)
        # Marked "writing" with its writer: a crashed ingest is recognised and cleaned up later.
        record = StoreVersionRecord(schema_version=SCHEMA_VERSION, version=version, created_at=int(time.time()),
                                    state="writing", writer=Writer(pid=os.getpid(), host=socket.gethostname()),
                                    embedder=embedder, documents=documents, sources=sources,
                                    source_hashes=source_hashes or {}, chunk_tokens=chunking[0] if chunking else None,
                                    chunk_overlap=chunking[1] if chunking else None)
        self._create_collection(collection, dim, record)
        writer = VersionWriter(self, name, collection, version, record.created_at)
        try:
            yield writer
            record = record.model_copy(update={"state": "ready", "writer": None, "rows": writer.seal()})
            self._set_record(collection, record)
            self._point_alias(name, collection)
        except BaseException:
            self.client.drop_collection(collection)
            raise
        writer.info = VersionInfo(name, collection, True, record)
        if keep:
            self._retain(name, keep)

    def drop_abandoned(self, name: str) -> list[str]:
        """Drops versions left "writing" by a writer that no longer runs (a killed ingest)."""
        dropped = []
        for version in self._version_numbers(name):
            collection = collection_name(name, version)
            record = self._record(collection)
            if record is None or record.state != "writing":
                continue
            here = record.writer is not None and record.writer.host == socket.gethostname()
            if (here and not pid_alive(record.writer.pid)) or (
                    not here and time.time() - record.created_at > _FOREIGN_WRITER_TIMEOUT_S):
                self.client.drop_collection(collection)
                dropped.append(collection)
        return dropped

    def reusable_vectors(self, name: str, chunk_ids: list[str], embedder: str) -> dict[str, list[float]]:
        """Vectors of the current version for chunks that are unchanged (same id = same doc and
        content), if it was embedded with the same model: incremental ingest re-embeds the rest."""
        try:
            collection, _ = self.current(name)
        except NotFound:  # a new store: nothing to reuse
            return {}
        record = self._record(collection)
        if record is None or record.embedder != embedder:
            return {}
        self._ensure_loaded(collection)
        found: dict[str, list[float]] = {}
        for start in range(0, len(chunk_ids), _QUERY_BATCH):
            ids = chunk_ids[start:start + _QUERY_BATCH]  # hex ids: safe as literals
            rows = self.client.query(collection, filter=f"chunk_id in {json.dumps(ids)}",
                                     output_fields=["chunk_id", "vector"])
            found.update({row["chunk_id"]: row["vector"] for row in rows})
        return found

    def _retain(self, name: str, keep: int) -> None:
        current, _ = self.current(name)
        ready = [v.collection for v in self.versions(name)]
        for collection in ready[:-keep]:
            if collection != current:
                self.client.drop_collection(collection)

    def rollback(self, name: str, to: int | None = None) -> VersionInfo:
        _, current = self.current(name)
        available = [v.version for v in self.versions(name)]
        if to is None:
            older = [v for v in available if v < current]
            if not older:
                raise UserError(f"{name} is at v{current}, the oldest version: nothing to roll back to")
            to = max(older)
        if to not in available:
            raise UserError(f"{name} has no version v{to}; versions: {', '.join(f'v{v}' for v in available)}")
        self._point_alias(name, collection_name(name, to))
        return next(v for v in self.versions(name) if v.version == to)

    def drop_version(self, name: str, version: int) -> None:
        """Removes a version that is not the current one (e.g. a trial version after rolling
        back from it)."""
        collection, current = self.current(name)
        if version == current:
            raise UserError(f"{name}@v{version} is the current version: roll back before dropping it")
        if version not in self._version_numbers(name):
            raise NotFound(f"{name} has no version v{version}")
        # The serving version remembers the next free number, so that a dropped newest version's
        # number is never handed out again (readers and caches key on collection names).
        self.client.alter_collection_properties(collection, properties={_NEXT_KEY: str(self._next_version(name))})
        self.client.drop_collection(collection_name(name, version))

    # -- internals --------------------------------------------------------------------------
    def _next_version(self, name: str) -> int:
        numbers = self._version_numbers(name)
        marks = [int(self.client.describe_collection(collection_name(name, n), **self._rpc)
                     .get("properties", {}).get(_NEXT_KEY, 0)) for n in numbers]
        return max([max(numbers, default=0) + 1, *marks])

    def _version_numbers(self, name: str) -> list[int]:
        numbers = []
        for c in self.client.list_collections():
            m = _VERSION_SUFFIX.match(c)
            if m and m.group("name") == name:
                numbers.append(int(m.group("version")))
        return sorted(numbers)

    def _ensure_loaded(self, collection: str) -> None:
        # A restarted Milvus (Lite or server) keeps collections released until someone loads them.
        if collection in self._loaded:
            return
        if str(self.client.get_load_state(collection, **self._rpc).get("state")) != "Loaded":
            self.client.load_collection(collection, **self._rpc)
        self._loaded.add(collection)

    def _record(self, collection: str) -> StoreVersionRecord | None:
        """The version's record; None for a collection without a readable one (not written by
        tunefetch, or damaged): never listed as a version, never dropped."""
        props = self.client.describe_collection(collection, **self._rpc).get("properties") or {}
        try:
            return StoreVersionRecord.model_validate_json(props.get(_META_KEY, ""))
        except ValidationError:
            return None

    def _set_record(self, collection: str, record: StoreVersionRecord) -> None:
        self.client.alter_collection_properties(collection, properties={_META_KEY: record.model_dump_json()})

    def _row_count(self, collection: str) -> int:
        return int(self.client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _point_alias(self, name: str, collection: str) -> None:
        if name in self.client.list_aliases().get("aliases", []):
            self.client.alter_alias(collection, name)
        else:
            self.client.create_alias(collection, name)

    def _create_collection(self, collection: str, dim: int, record: StoreVersionRecord) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=512)
        schema.add_field("section", DataType.VARCHAR, max_length=1024)
        schema.add_field("source", DataType.VARCHAR, max_length=2048)
        schema.add_field("text", DataType.VARCHAR, max_length=16384)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("kb_version", DataType.INT64)
        schema.add_field("ingested_at", DataType.INT64)
        index = self.client.prepare_index_params()
        index.add_index("vector", **_INDEX)
        self.client.create_collection(
            collection, schema=schema, index_params=index, properties={_META_KEY: record.model_dump_json()}
        )


class VersionWriter:
    """Inserts chunks into one version being written (see KnowledgeStores.new_version)."""

    def __init__(self, stores: KnowledgeStores, name: str, collection: str, version: int, created_at: int):
        self.stores, self.name, self.collection = stores, name, collection
        self.version, self.created_at = version, created_at
        self.rows = 0
        self.info: VersionInfo | None = None

    def insert(self, chunks: list[Chunk], vectors) -> None:
        for start in range(0, len(chunks), _INSERT_BATCH):
            self.stores.client.insert(self.collection, [
                {
                    "chunk_id": c.chunk_id,
                    "vector": [float(x) for x in vectors[start + i]],
                    "doc_id": c.doc_id,
                    "section": c.section[:1024],
                    "source": c.source[:2048],
                    "text": c.text,
                    "content_hash": c.content_hash,
                    "kb_version": self.version,
                    "ingested_at": self.created_at,
                }
                for i, c in enumerate(chunks[start:start + _INSERT_BATCH])
            ])
        self.rows += len(chunks)

    def seal(self) -> int:
        """Flush, load and verify the row count; returns it."""
        client = self.stores.client
        if not self.rows:
            raise UserError(f"nothing to ingest into {self.name!r}: no chunks")
        client.flush(self.collection)
        client.load_collection(self.collection)
        counted = self.stores._row_count(self.collection)
        if counted != self.rows:
            raise RuntimeError(f"{self.collection}: wrote {self.rows} chunks, Milvus counts {counted}")
        return counted
