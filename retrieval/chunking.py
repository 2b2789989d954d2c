"""Heading-aware chunking that respects the embedder's token limit.

Markdown is split into sections at headings; each section is cut into windows of at most
`max_tokens` embedder tokens (heading included) that overlap by `overlap` tokens and end on
word boundaries. A chunk id is a hash of the document id and the chunk text, so re-ingesting
unchanged content gives the same ids.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from retrieval.documents import Document

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
    for section, body in sections(doc.text):
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


def sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) pairs, e.g. ('Returns Policy > Eligibility', '...'). Headings come
    from a CommonMark parser: ATX and setext headings count, `#` lines in code blocks do not."""
    lines = text.splitlines()
    tokens = _markdown().parse(text)
    path: list[tuple[int, str]] = []
    sections: list[tuple[str, str]] = []
    cursor = 0

    def flush(body: list[str]) -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append((" > ".join(title for _, title in path), content))

    for i, token in enumerate(tokens):
        if token.type != "heading_open" or token.map is None or token.level != 0:
            continue  # only top-level headings (a '#' line inside a list item is its text)
        start, end = token.map
        flush(lines[cursor:start])
        level = int(token.tag[1])
        path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, tokens[i + 1].content.strip())]
        cursor = end
    flush(lines[cursor:])
    return sections


@functools.cache
def _markdown():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark")


def _windows(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    """Windows of at most `size` tokens overlapping by up to `overlap` tokens. A window ends at
    its last sentence end when there is one (whole sentences, packed; a sentence longer than a
    window is cut at a word boundary), and
    the next one starts at a sentence start inside the overlap when there is one: every
    sentence that fits in a window lies whole in some window."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)
    if n <= size:
        return [text]
    ends = [i + 1 for i, (_, stop) in enumerate(offsets) if _ends_sentence(text, stop)]
    pieces = []
    start = 0
    while start < n:
        end = min(start + size, n)
        if end < n:
            sentence_end = max((e for e in ends if start < e <= end), default=None)
            end = sentence_end or _word_boundary_before(offsets, start, end)
        pieces.append(text[offsets[start][0]:offsets[end - 1][1]])
        if end == n:
            break
        earliest = max(end - overlap, start + 1)
        sentence_start = min((e for e in ends if earliest <= e < end), default=None)
        start = sentence_start if sentence_start is not None else _word_boundary_after(offsets, earliest, end)
    return pieces


def _ends_sentence(text: str, stop: int) -> bool:
    """Text up to `stop` ends a sentence: . ! or ? then whitespace and not a digit or a
    lowercase letter (so "ext. 4477" and "e.g. the" stay whole), or the end of the text."""
    if text[stop - 1:stop] not in (".", "!", "?"):
        return False
    rest = text[stop:stop + 40].lstrip()
    if stop < len(text) and not text[stop].isspace():
        return False
    return not rest or not (rest[0].isdigit() or rest[0].islower())


def _word_boundary_before(offsets, start: int, end: int) -> int:
    """`end` moved back so the window does not cut inside a word."""
    while end < len(offsets) and end > start + 1 and offsets[end][0] == offsets[end - 1][1]:
        end -= 1
    return end


def _word_boundary_after(offsets, start: int, end: int) -> int:
    """`start` moved forward to the next word start (not past `end`)."""
    while start < end and offsets[start][0] == offsets[start - 1][1]:
        start += 1
    return start
