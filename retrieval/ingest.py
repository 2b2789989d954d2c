"""Ingestion: load -> chunk -> embed -> write a new store version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cluster.config import RetrievalConfig
from cluster.errors import UserError
from retrieval.chunking import chunk_document
from retrieval.documents import load_documents
from retrieval.embedding import MODEL_NAME, Embedder
from retrieval.store import KnowledgeStores, VersionInfo, validate_name

Progress = Callable[[str], None]


@dataclass
class IngestResult:
    version: VersionInfo
    documents: int
    chunks: int
    skipped: list[tuple[str, str]]


def ingest(paths: list[str], name: str, stores: KnowledgeStores, embedder: Embedder,
           config: RetrievalConfig, progress: Progress = lambda _: None) -> IngestResult:
    validate_name(name)
    report = load_documents(paths)
    for path, reason in report.skipped:
        progress(f"skipped {path}: {reason}")
    if not report.documents:
        raise UserError(f"no documents to ingest under {', '.join(paths)}")
    chunks = [c for doc in report.documents
              for c in chunk_document(doc, embedder.tokenizer, config.chunk_tokens, config.chunk_overlap)]
    progress(f"{len(report.documents)} documents -> {len(chunks)} chunks; embedding")
    vectors = embedder.encode([c.text for c in chunks])
    meta = {"embedder": MODEL_NAME, "documents": len(report.documents), "sources": sorted({d.source for d in report.documents})[:200]}
    version = stores.write_version(name, chunks, vectors, meta)
    return IngestResult(version, len(report.documents), len(chunks), report.skipped)
