"""Document loaders: one per file type, bad files and records reported, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.errors import UserError
from retrieval.chunking import sections as markdown_sections
from retrieval.documents import JsonlFields, load_documents


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def minimal_pdf(*page_texts: str) -> bytes:
    """A valid PDF, written by hand: one page per text, in the standard Helvetica font."""
    pages = len(page_texts)
    font = 3 + 2 * pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(pages))
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>"]
    for i, text in enumerate(page_texts):
        stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 {font} 0 R >> >> >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def by_id(report) -> dict:
    return {doc.doc_id: doc for doc in report.documents}


# -- HTML ---------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><title>Returns &amp; Refunds</title>
<style>body { color: red }</style><script>var secret = "tracking-code";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/shop">Shop</a></nav>
<h1>Returns Policy</h1>
<p>Items can be returned within   30 days
   of delivery &mdash; no questions asked.</p>
<h2>Eligibility</h2>
<ul><li>Unused items &lt;in original packaging&gt;</li><li><p>With a receipt</p></li></ul>
<h2>Refunds</h2>
<p>Refunds go to the original payment method&nbsp;(5&#8211;7 days).</p>
<p># not a heading</p>
<pre>
# a shell comment
make install
</pre>
<footer>Copyright ACME, all rights reserved</footer>
</body></html>
"""


def test_html_headings_become_sections(tmp_path):
    write(tmp_path / "returns.html", PAGE)
    doc = load_documents([str(tmp_path)]).documents[0]
    sections = dict(markdown_sections(doc.text))
    assert list(sections) == ["Returns Policy", "Returns Policy > Eligibility", "Returns Policy > Refunds"]
    assert "Items can be returned within 30 days of delivery" in sections["Returns Policy"]
    assert "- Unused items" in sections["Returns Policy > Eligibility"]
    assert "- With a receipt" in sections["Returns Policy > Eligibility"]
    # paragraphs and list items are separated by blank lines
    assert "packaging>\n\n- With a receipt" in doc.text
    # neither text starting with '#' nor a '#' line in <pre> opens a section
    assert "# not a heading" in sections["Returns Policy > Refunds"]
    assert "    # a shell comment\n    make install" in sections["Returns Policy > Refunds"]
    assert doc.metadata == {"title": "Returns & Refunds", "format": "html"}


def test_html_drops_scripts_styles_navigation_and_footer(tmp_path):
    write(tmp_path / "page.htm", PAGE)
    text = load_documents([str(tmp_path / "page.htm")]).documents[0].text
    for dropped in ("tracking-code", "color: red", "Shop", "Copyright", "Returns & Refunds"):
        assert dropped not in text


def test_html_entities_are_decoded(tmp_path):
    write(tmp_path / "page.html", PAGE)
    text = load_documents([str(tmp_path)]).documents[0].text
    assert "delivery \u2014 no questions" in text
    assert "Unused items <in original packaging>" in text
    assert "payment method (5\u20137 days)" in text  # &nbsp; collapses like any whitespace
    assert not any(ref in text for ref in ("&mdash;", "&lt;", "&gt;", "&nbsp;", "&#8211;"))


# -- PDF ----------------------------------------------------------------------------------------


def test_pdf_pages_are_extracted_and_joined(tmp_path):
    write(tmp_path / "manual.pdf", minimal_pdf("Hello from page one", "Battery care on page two"))
    report = load_documents([str(tmp_path)])
    assert report.skipped == []
    doc = by_id(report)["manual"]
    assert doc.text.strip() == "Hello from page one\n\nBattery care on page two"
    assert doc.metadata == {"pages": 2, "format": "pdf"}


def test_corrupt_and_empty_pdfs_are_skipped_with_a_reason(tmp_path):
    write(tmp_path / "broken.pdf", b"%PDF-1.4\nthis is not really a pdf\n")
    write(tmp_path / "blank.pdf", minimal_pdf(""))
    write(tmp_path / "ok.md", "# Fine\n\ntext\n")
    report = load_documents([str(tmp_path)])
    assert list(by_id(report)) == ["ok"]
    reasons = dict(report.skipped)
    assert reasons[str(tmp_path / "blank.pdf")] == "no extractable text"
    assert reasons[str(tmp_path / "broken.pdf")].startswith("unreadable PDF: ")


def test_encrypted_pdf_is_skipped(tmp_path):
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(write(tmp_path / "plain.pdf", minimal_pdf("Top secret"))))
    writer.encrypt(user_password="hunter2", algorithm="RC4-128")
    with open(tmp_path / "locked.pdf", "wb") as out:
        writer.write(out)
    report = load_documents([str(tmp_path / "locked.pdf"), str(tmp_path / "plain.pdf")])
    assert report.skipped == [(str(tmp_path / "locked.pdf"), "encrypted PDF (needs a password)")]
    assert [d.text.strip() for d in report.documents] == ["Top secret"]


# -- JSONL --------------------------------------------------------------------------------------


def test_jsonl_records_become_documents_with_default_fields(tmp_path):
    lines = [{"id": "faq-1", "text": "How do I reset?", "lang": "en", "score": 3, "tags": ["a"]},
             {"text": "No id here", "lang": "de", "format": "theirs"}]
    write(tmp_path / "kb" / "faq.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
    docs = by_id(load_documents([str(tmp_path)]))
    assert set(docs) == {"kb/faq/faq-1", "kb/faq/2"}  # record id, else the 1-based line number
    assert docs["kb/faq/faq-1"].text == "How do I reset?"
    # every other scalar field is metadata; lists are not; our format key wins
    assert docs["kb/faq/faq-1"].metadata == {"lang": "en", "score": 3, "format": "jsonl"}
    assert docs["kb/faq/2"].metadata == {"lang": "de", "format": "jsonl"}
    assert docs["kb/faq/2"].source == (tmp_path / "kb" / "faq.jsonl").resolve().as_uri()


def test_jsonl_custom_fields(tmp_path):
    write(tmp_path / "tickets.jsonl",
          json.dumps({"ticket": 41, "body": "Dock will not charge", "product": "K-200", "agent": "sam"}) + "\n")
    fields = JsonlFields(text_field="body", id_field="ticket", metadata_fields=("product", "missing"))
    doc = load_documents([str(tmp_path)], jsonl=fields).documents[0]
    assert (doc.doc_id, doc.text) == ("tickets/41", "Dock will not charge")
    assert doc.metadata == {"product": "K-200", "format": "jsonl"}


def test_jsonl_bad_lines_are_reported_by_line_and_the_rest_loads(tmp_path):
    path = write(tmp_path / "data.jsonl", "\n".join([
        json.dumps({"id": 1, "text": "first good"}),
        "{not json",
        json.dumps({"id": 3, "body": "no text field"}),
        json.dumps({"id": 4, "text": 42}),
        "",
        json.dumps({"id": 6, "text": "   "}),
        json.dumps(["a", "list"]),
        json.dumps({"id": 1, "text": "same id again"}),
        json.dumps({"id": 9, "text": "last good \u2028 with a line separator"}, ensure_ascii=False),
    ]) + "\n")
    report = load_documents([str(path)])
    assert [d.doc_id for d in report.documents] == ["data/1", "data/9"]
    reasons = dict(report.skipped)
    assert sorted(reasons) == [f"{path}:{n}" for n in (2, 3, 4, 6, 7, 8)]
    assert reasons[f"{path}:2"].startswith("invalid JSON")
    assert reasons[f"{path}:3"] == "missing text field 'text'"
    assert "not a string" in reasons[f"{path}:4"]
    assert reasons[f"{path}:6"] == "empty text field 'text'"
    assert reasons[f"{path}:7"] == "not a JSON object"
    assert "duplicate record id '1'" in reasons[f"{path}:8"]


# -- markdown, text, walking --------------------------------------------------------------------


def test_every_document_gets_its_format(tmp_path):
    write(tmp_path / "a.md", "# A\n\nalpha\n")
    write(tmp_path / "b.markdown", "beta\n")
    write(tmp_path / "c.txt", "gamma\n")
    write(tmp_path / "d.html", "<p>delta</p>")
    formats = {d.doc_id: d.metadata["format"] for d in load_documents([str(tmp_path)]).documents}
    assert formats == {"a": "markdown", "b": "markdown", "c": "text", "d": "html"}
    assert by_id(load_documents([str(tmp_path)]))["a"].text == "# A\n\nalpha\n"  # markdown untouched


def test_unreadable_unsupported_and_empty_files_are_skipped_with_a_reason(tmp_path):
    write(tmp_path / "bad.md", b"# Title\n\n\xff\xfe not utf-8\n")
    write(tmp_path / "image.png", b"\x89PNG")
    write(tmp_path / "empty.txt", "  \n")
    write(tmp_path / "good.md", "fine\n")
    report = load_documents([str(tmp_path)])
    assert [d.doc_id for d in report.documents] == ["good"]
    assert dict(report.skipped) == {
        str(tmp_path / "bad.md"): "unreadable: UnicodeDecodeError",
        str(tmp_path / "image.png"): "unsupported file type '.png'",
        str(tmp_path / "empty.txt"): "empty document",
    }


def test_directories_are_walked_recursively_without_hidden_files(tmp_path):
    write(tmp_path / "docs" / "top.md", "top\n")
    write(tmp_path / "docs" / "hr" / "leave" / "pto.md", "pto\n")
    write(tmp_path / "docs" / ".draft.md", "hidden\n")
    write(tmp_path / "docs" / ".git" / "notes.md", "hidden folder\n")
    report = load_documents([str(tmp_path / "docs")])
    assert sorted(by_id(report)) == ["hr/leave/pto", "top"]
    assert report.skipped == []


def test_glob_patterns_match_recursively_with_ids_relative_to_the_glob(tmp_path):
    write(tmp_path / "docs" / "a" / "x.md", "a x\n")
    write(tmp_path / "docs" / "b" / "c" / "x.md", "b c x\n")
    write(tmp_path / "docs" / "b" / "skip.txt", "not matched\n")
    write(tmp_path / "docs" / "top.md", "top\n")
    report = load_documents([f"{tmp_path}/docs/**/*.md", f"{tmp_path}/docs/top.md"])
    assert {d.doc_id: d.text for d in report.documents} == {"a/x": "a x\n", "b/c/x": "b c x\n", "top": "top\n"}
    assert report.skipped == []  # top.md matched twice, loaded once


def test_missing_path_raises_a_user_error_naming_it(tmp_path):
    write(tmp_path / "ok.md", "ok\n")
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(UserError, match="no/such/dir"):
        load_documents([str(tmp_path), missing])
    with pytest.raises(UserError, match=r"nothing-\*\.md"):
        load_documents([f"{tmp_path}/nothing-*.md"])
