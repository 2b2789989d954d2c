"""Append-only provenance records: one JSON line per answer, fsynced before the response leaves.

Records go to ROOT/YYYY-MM-DD.jsonl. Each append is one `write` of a whole line to a file
opened with O_APPEND under an exclusive lock, then fsync, so concurrent writers (several
gateway replicas) never interleave and a crash after the response never loses the record.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path

from cluster.errors import NotFound


def new_provenance_id() -> str:
    return f"prov-{uuid.uuid4().hex}"


class ProvenanceLog:
    def __init__(self, root: Path):
        self.root = Path(root)

    def append(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        path = self.root / time.strftime("%Y-%m-%d.jsonl", time.gmtime(record.get("time", time.time())))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _files_newest_first(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl"), reverse=True) if self.root.is_dir() else []

    def recent(self, limit: int = 20) -> list[dict]:
        records: list[dict] = []
        for path in self._files_newest_first():
            lines = path.read_text().splitlines()
            records += [json.loads(line) for line in reversed(lines) if line.strip()]
            if len(records) >= limit:
                break
        return records[:limit]

    def get(self, provenance_id: str) -> dict:
        needle = f'"provenance_id":"{provenance_id}"'
        for path in self._files_newest_first():
            for line in path.read_text().splitlines():
                if needle in line:
                    return json.loads(line)
        raise NotFound(f"no provenance record {provenance_id!r}")
