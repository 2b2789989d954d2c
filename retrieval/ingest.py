"""Ingestion: load -> chunk -> embed (reusing unchanged chunks) -> write a new store version."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from cluster.config import RetrievalConfig
from cluster.errors import UserError
from retrieval.chunking import chunk_document
from retrieval.documents import load_documents
from retrieval.embedding import MODEL_NAME, Embedder
from retrieval.freshness import MAX_SOURCES, source_hashes
from retrieval.store import KnowledgeStores, VersionInfo, validate_name

Progress = Callable[[str], None]
_BATCH = 256  # chunks embedded and inserted per step: bounded memory on large corpora


@dataclass
class IngestResult:
    version: VersionInfo
    documents: int
    chunks: int
    embedded: int  # newly embedded; the rest were carried over from the previous version
    seconds: float
    skipped: list[tuple[str, str]]

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


def ingest(paths: list[str], name: str, stores: KnowledgeStores, embedder: Embedder, config: RetrievalConfig,
           progress: Progress = lambda _: None, incremental: bool = True, jsonl=None,
           on_chunks: Callable[[int, int, str], None] = lambda done, total, note: None) -> IngestResult:
    """Writes the documents under `paths` as the next version of store `name`.

    The new version holds exactly these documents (deleted ones drop out); with `incremental`,
    chunks unchanged since the current version keep their vectors instead of being re-embedded.
    `progress` gets messages, `on_chunks(done, total, note)` the count of chunks written.
    """
    validate_name(name)
    started = time.perf_counter()
    report = load_documents(paths, jsonl=jsonl)
    for path, reason in report.skipped:
        progress(f"skipped {path}: {reason}")
    if not report.documents:
        raise UserError(f"no documents to ingest under {', '.join(paths)}")
    if config.chunk_tokens > embedder.max_tokens:
        # The embedder would silently read only the first max_tokens of each chunk.
        raise UserError(f"retrieval.chunk_tokens is {config.chunk_tokens}, but the embedder reads at most "
                        f"{embedder.max_tokens} tokens: set it to {embedder.max_tokens} or less")
    chunks = [c for doc in report.documents
              for c in chunk_document(doc, embedder.tokenizer, config.chunk_tokens, config.chunk_overlap)]
    reused = stores.reusable_vectors(name, [c.chunk_id for c in chunks], MODEL_NAME) if incremental else {}
    progress(f"{len(report.documents)} documents -> {len(chunks)} chunks ({len(reused)} unchanged, reused)")
    embedded = 0
    sources = sorted({d.source for d in report.documents})[:MAX_SOURCES]
    with stores.new_version(name, embedder.dim, MODEL_NAME, len(report.documents), sources,
                            chunking=(config.chunk_tokens, config.chunk_overlap), keep=config.keep_versions,
                            source_hashes=source_hashes(sources)) as writer:
        for start in range(0, len(chunks), _BATCH):
            batch = chunks[start:start + _BATCH]
            fresh = [c for c in batch if c.chunk_id not in reused]
            vectors = dict(zip((c.chunk_id for c in fresh), embedder.encode([c.text for c in fresh])))
            writer.insert(batch, [reused.get(c.chunk_id, vectors.get(c.chunk_id)) for c in batch])
            embedded += len(fresh)
            done = start + len(batch)
            on_chunks(done, len(chunks), f"{embedded} embedded, {done / (time.perf_counter() - started):.0f} chunks/s")
    return IngestResult(writer.info, len(report.documents), len(chunks), embedded,
                        time.perf_counter() - started, report.skipped)
