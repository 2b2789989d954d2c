"""Unit tests of our own logic: chunking limits and ids, filter expressions."""

from __future__ import annotations

import pytest

from cluster.errors import UserError
from retrieval.chunking import chunk_document
from retrieval.documents import Document
from retrieval.filters import build_filter, parse_where


@pytest.fixture(scope="module")
def tokenizer():
    from retrieval.embedding import Embedder

    return Embedder().tokenizer


def doc(text: str, doc_id: str = "d") -> Document:
    return Document(doc_id=doc_id, text=text, source=f"file:///{doc_id}.md")


def test_chunks_respect_the_token_limit_and_keep_headings(tokenizer):
    body = " ".join(f"Sentence number {i} about the K-200 robot." for i in range(200))
    chunks = chunk_document(doc(f"# Guide\n\n## Specs\n\n{body}\n"), tokenizer, max_tokens=64, overlap=8)
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 64
        assert chunk.section == "Guide > Specs" and chunk.text.startswith("Guide > Specs\n")
    # consecutive windows overlap
    assert chunks[0].text.split()[-1] in chunks[1].text


def test_chunk_ids_are_stable_and_content_addressed(tokenizer):
    text = "# A\n\nalpha beta\n\n## B\n\ngamma delta\n"
    first = chunk_document(doc(text), tokenizer, 64, 8)
    assert [c.chunk_id for c in first] == [c.chunk_id for c in chunk_document(doc(text), tokenizer, 64, 8)]
    changed = chunk_document(doc(text.replace("gamma", "GAMMA")), tokenizer, 64, 8)
    assert first[0].chunk_id == changed[0].chunk_id and first[1].chunk_id != changed[1].chunk_id
    assert chunk_document(doc(text, "other"), tokenizer, 64, 8)[0].chunk_id != first[0].chunk_id


def test_filters_render_escaped_literals():
    assert build_filter({"doc_id": "a"}) == 'doc_id == "a"'
    assert build_filter({"doc_id": ["a", "b"]}) == 'doc_id in ["a", "b"]'
    assert build_filter({"kb_version": {"gte": 2, "lt": 5}}) == "(kb_version >= 2 and kb_version < 5)"
    assert build_filter({"doc_id": 'x" or doc_id != "y'}) == r'doc_id == "x\" or doc_id != \"y"'


@pytest.mark.parametrize("filters", [
    {"text": "x"}, {"doc_id == 'a' or 1": "x"}, {"kb_version": "1 or 1"}, {"doc_id": {"gte": "a"}},
    {"doc_id": "a\nb"}, {"kb_version": True}, {"doc_id": []},
])
def test_filters_reject_what_is_not_allowed(filters):
    with pytest.raises(UserError):
        build_filter(filters)


def test_where_flags():
    assert parse_where(["doc_id=a", "doc_id=b", "kb_version=3"]) == {"doc_id": ["a", "b"], "kb_version": 3}
    with pytest.raises(UserError):
        parse_where(["novalue"])


def test_windows_keep_whole_sentences_when_they_fit(tokenizer):
    sentences = [f"The service interval of the K-{i}00 robot is {i * 7} days." for i in range(1, 30)]
    chunks = chunk_document(doc("# Guide\n\n## Specs\n\n" + " ".join(sentences) + "\n"), tokenizer,
                            max_tokens=48, overlap=16)
    assert len(chunks) > 3
    for chunk in chunks:
        body = chunk.text.removeprefix("Guide > Specs\n")
        assert body.endswith(".") and body[0].isupper(), body  # starts and ends on sentence boundaries
    for sentence in sentences:
        assert any(sentence in chunk.text for chunk in chunks), sentence


def test_sections_follow_commonmark_headings_not_hash_lines_in_code():
    from retrieval.chunking import sections

    text = ("# Guide\nIntro.\n\nSetup\n-----\nRun this:\n\n```bash\n# not a heading\nmake demo\n```\n\n"
            "## Flags\n- item\n\n    # indented code, not a heading\n")
    found = sections(text)
    assert [path for path, _ in found] == ["Guide", "Guide > Setup", "Guide > Flags"]  # setext "-----" is h2
    assert "# not a heading" in found[1][1] and "# indented code" in found[2][1]


def test_windows_do_not_end_a_sentence_inside_an_abbreviation(tokenizer):
    text = ("The reporting deadline for a suspected security incident is 1 hour. Send an email to the "
            "security team or call the internal security hotline at ext. 4477, which is staffed around "
            "the clock. Do not investigate on your own, e.g. by deleting suspicious messages or powering "
            "off an affected machine, unless the security team asks you to do so.")
    chunks = chunk_document(doc(text), tokenizer, max_tokens=40, overlap=0)
    assert any("hotline at ext. 4477" in c.text for c in chunks), [c.text for c in chunks]
    assert any("e.g. by deleting" in c.text for c in chunks)
