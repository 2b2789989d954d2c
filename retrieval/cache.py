"""A retrieval cache that cannot serve a stale hit.

Results are keyed by the physical store version the alias points at when the request arrives
(collection name and creation time, so even a version number reused after a drop is another
key), the normalized query, the filters and top_k. A new version or a rollback moves the alias,
so the next request builds a different key: nothing is invalidated, and no TTL is needed.
Query vectors are keyed by the normalized query alone (one embedder per retriever replica).

Normalization only removes what the embedder cannot see: all-MiniLM-L6-v2's tokenizer lower-
cases and splits on whitespace, so case and runs of whitespace never change a vector (tested).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


def normalize_query(query: str) -> str:
    return " ".join(query.lower().split())


class LRU(Generic[V]):
    """A bounded mapping that drops the least recently used entry; safe across threads."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class StoreVersion:
    """One physical version of a store, as an alias resolved to it for one request."""

    collection: str
    version: int
    created_at: int


def result_key(at: StoreVersion, query: str, filters: dict | None, top_k: int) -> tuple:
    return (at.collection, at.created_at, normalize_query(query), json.dumps(filters or {}, sort_keys=True), top_k)
