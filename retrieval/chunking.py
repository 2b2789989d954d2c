"""Heading-aware chunking that respects the embedder's token limit.

Markdown is split into sections at headings; each section is cut into windows of at most
`max_tokens` embedder tokens (heading included) that overlap by `overlap` tokens and end on
word boundaries. A chunk id is a hash of the document id and the chunk text, so re-ingesting
unchanged content gives the same ids.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from retrieval.documents import Document

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    text: str
    section: str
    source: str
    content_hash: str


def chunk_document(doc: Document, tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    occurrences: dict[str, int] = {}
    for section, body in _sections(doc.text):
        header = f"{section}\n" if section else ""
        budget = max(8, max_tokens - len(tokenizer(header, add_special_tokens=False)["input_ids"]))
        for piece in _windows(body, tokenizer, budget, min(overlap, budget // 2)):
            text = header + piece
            digest = hashlib.sha256(text.encode()).hexdigest()
            n = occurrences.get(digest, 0)
            occurrences[digest] = n + 1
            chunk_id = hashlib.sha256(f"{doc.doc_id}\0{digest}\0{n}".encode()).hexdigest()[:32]
            chunks.append(Chunk(chunk_id, doc.doc_id, text, section, doc.source, digest))
    return chunks


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) pairs, e.g. ('Returns Policy > Eligibility', '...')."""
    path: list[tuple[int, str]] = []
    sections: list[tuple[str, str]] = []
    body: list[str] = []

    def flush():
        content = "\n".join(body).strip()
        if content:
            sections.append((" > ".join(title for _, title in path), content))
        body.clear()

    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            flush()
            level = len(match.group(1))
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, match.group(2))]
        else:
            body.append(line)
    flush()
    return sections


def _windows(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= size:
        return [text]
    pieces = []
    start = 0
    while start < len(offsets):
        end = min(start + size, len(offsets))
        # Never cut inside a word: back off while the next token continues the current one.
        while end < len(offsets) and end > start + 1 and offsets[end][0] == offsets[end - 1][1]:
            end -= 1
        pieces.append(text[offsets[start][0]:offsets[end - 1][1]])
        if end == len(offsets):
            break
        next_start = max(end - overlap, start + 1)
        while next_start < end and offsets[next_start][0] == offsets[next_start - 1][1]:
            next_start += 1  # start overlap on a word boundary too
        start = next_start
    return pieces
