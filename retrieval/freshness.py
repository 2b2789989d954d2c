"""Knowledge freshness: has what a store version was built from changed since?

At ingest each source file's SHA-256 goes into the version's record; later the same hash of
the file on disk says whether the version still holds what the source says (or the file is
gone). Sources that are not local files (URLs, or files on another machine) are not checked.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

MAX_SOURCES = 200  # sources hashed per version (a record is a collection property: kept small)


def source_path(source: str) -> Path | None:
    """The local file behind a `file://` source URI (a JSONL record's source names its file)."""
    parsed = urlparse(source)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def digest(path: Path) -> str | None:
    try:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        return sha.hexdigest()
    except OSError:
        return None


def source_hashes(sources: list[str]) -> dict[str, str]:
    hashes = {}
    for source in sources[:MAX_SOURCES]:
        path = source_path(source)
        value = digest(path) if path else None
        if value:
            hashes[source] = value
    return hashes


@dataclass
class Freshness:
    kb: str
    version: int
    created_at: int
    age_s: float
    checked: int  # sources with a recorded hash
    changed: list[str] = field(default_factory=list)  # content differs from what was ingested
    missing: list[str] = field(default_factory=list)  # no longer readable here

    @property
    def stale(self) -> int:
        return len(self.changed) + len(self.missing)

    def to_json(self) -> dict:
        return {"kb": self.kb, "version": self.version, "created_at": self.created_at, "age_s": round(self.age_s),
                "checked": self.checked, "changed": self.changed, "missing": self.missing}


def check(kb: str, version: int, created_at: int, hashes: dict[str, str], now: float) -> Freshness:
    result = Freshness(kb, version, created_at, max(now - created_at, 0.0), len(hashes))
    for source, recorded in hashes.items():
        current = digest(source_path(source))
        if current is None:
            result.missing.append(source)
        elif current != recorded:
            result.changed.append(source)
    return result


def store_freshness(stores, only: str | None = None) -> list[Freshness]:
    """Age and changed sources of the version each store's alias serves (a KnowledgeStores)."""
    results = []
    for name in stores.names():
        if only not in (None, name):
            continue
        record = next(v for v in stores.versions(name) if v.current).record
        results.append(check(name, record.version, record.created_at, record.source_hashes, time.time()))
    return results
