"""Loading documents from files, directories and globs.

Each file becomes one Document whose id is its path relative to the root it was found under,
without the suffix (`docs/hr/pto.md` given `docs/` -> `hr/pto`). Files that cannot be read are
reported by name and skipped, never silently.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import UserError

TEXT_SUFFIXES = {".md", ".markdown", ".txt"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str  # a URI the reader can open
    metadata: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    documents: list[Document]
    skipped: list[tuple[str, str]]  # (path, reason)


def load_documents(patterns: list[str]) -> LoadReport:
    """Loads every supported file under the given paths or globs."""
    documents: list[Document] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for root, file in _expand(patterns):
        if file.suffix.lower() not in TEXT_SUFFIXES:
            skipped.append((str(file), f"unsupported file type '{file.suffix or file.name}'"))
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append((str(file), f"unreadable: {exc.__class__.__name__}"))
            continue
        doc_id = file.relative_to(root).with_suffix("").as_posix() if root != file else file.stem
        if doc_id in seen:
            skipped.append((str(file), f"duplicate document id '{doc_id}'"))
            continue
        seen.add(doc_id)
        documents.append(Document(doc_id=doc_id, text=text, source=file.resolve().as_uri()))
    return LoadReport(documents, skipped)


def _expand(patterns: list[str]) -> list[tuple[Path, Path]]:
    """(root, file) pairs; the root decides the document id."""
    pairs: list[tuple[Path, Path]] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))] or [Path(pattern)]
        for path in matches:
            if path.is_dir():
                pairs += [(path, f) for f in sorted(path.rglob("*")) if f.is_file() and not f.name.startswith(".")]
            elif path.is_file():
                pairs.append((path, path))
            else:
                raise UserError(f"no such file or directory: {pattern}")
    return pairs
