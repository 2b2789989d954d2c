"""Loading documents from files, directories and globs.

Each file becomes one Document whose id is its path relative to the root it was found under,
without the suffix (`docs/hr/pto.md` given `docs/` or `docs/**/*.md` -> `hr/pto`); a JSONL file
becomes one Document per record (`hr/faq/7`). A loader per file type turns the file into text the
chunker understands: markdown headings mark sections, blank lines separate paragraphs. Files and
records that cannot be read are reported by name and skipped, never silently.
"""

from __future__ import annotations

import functools
import glob
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

import pypdf

from cluster.errors import UserError


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str  # a URI the reader can open
    metadata: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    documents: list[Document]
    skipped: list[tuple[str, str]]  # (path, reason); (path:LINE, reason) for a JSONL record


@dataclass(frozen=True)
class JsonlFields:
    """Which fields of a JSONL record hold the text, the id and the metadata."""

    text_field: str = "text"
    id_field: str = "id"  # records without it are numbered by line (1-based)
    metadata_fields: tuple[str, ...] = ()  # empty: every other scalar field


class _Skip(Exception):
    """A whole file cannot be loaded; the message is the reason reported."""


Loader = Callable[[Path, str], list[Document]]


def load_documents(patterns: list[str], jsonl: JsonlFields | None = None) -> LoadReport:
    """Loads every supported file under the given paths or globs."""
    report = LoadReport([], [])
    # JSONL is the one configurable loader, and it reports bad records itself.
    loaders = {**_LOADERS, ".jsonl": functools.partial(_load_jsonl, fields=jsonl or JsonlFields(), skipped=report.skipped)}
    seen: set[str] = set()
    for root, file in _expand(patterns):
        loader = loaders.get(file.suffix.lower())
        if loader is None:
            report.skipped.append((str(file), f"unsupported file type '{file.suffix or file.name}'"))
            continue
        doc_id = file.relative_to(root).with_suffix("").as_posix() if root != file else file.stem
        try:
            documents = loader(file, doc_id)
        except _Skip as exc:
            report.skipped.append((str(file), str(exc)))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            report.skipped.append((str(file), f"unreadable: {exc.__class__.__name__}"))
            continue
        for doc in documents:
            if not doc.text.strip():
                report.skipped.append((str(file), "empty document"))
            elif doc.doc_id in seen:
                report.skipped.append((str(file), f"duplicate document id '{doc.doc_id}'"))
            else:
                seen.add(doc.doc_id)
                report.documents.append(doc)
    return report


def _document(file: Path, doc_id: str, text: str, fmt: str, metadata: dict | None = None) -> Document:
    return Document(doc_id=doc_id, text=text, source=file.resolve().as_uri(), metadata={**(metadata or {}), "format": fmt})


def _read_text(file: Path) -> str:
    return file.read_text(encoding="utf-8-sig")  # a BOM would hide a heading on the first line


# -- markdown and plain text: used as they are --------------------------------------------------


def _load_markdown(file: Path, doc_id: str) -> list[Document]:
    return [_document(file, doc_id, _read_text(file), "markdown")]


def _load_text(file: Path, doc_id: str) -> list[Document]:
    return [_document(file, doc_id, _read_text(file), "text")]


# -- HTML -> markdown-ish text ------------------------------------------------------------------

_DROPPED = {"script", "style", "nav", "footer", "noscript", "template"}  # not the page's content
_BLOCKS = {"p", "div", "li", "br", "tr", "dt", "dd", "blockquote", "section", "article", "main",
           "header", "aside", "ul", "ol", "dl", "table", "figure", "figcaption", "form", "hr", "pre"}
_HEADINGS = {f"h{n}": n for n in range(1, 7)}


class _HtmlText(HTMLParser):
    """Collects an HTML page as blocks: `#` headings and paragraphs (entities decoded by the base)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.title = ""
        self._text: list[str] = []
        self._dropped = 0  # depth inside dropped elements
        self._in_title = False
        self._in_pre = 0
        self._heading = 0
        self._bullet = ""

    def handle_starttag(self, tag, attrs):
        if tag in _DROPPED:
            self._dropped += 1
        elif tag == "title":
            self._in_title = True
        elif tag in _HEADINGS or tag in _BLOCKS:
            self._flush()
            self._heading = _HEADINGS.get(tag, 0)
            if tag == "li":
                self._bullet = "- "  # kept until its text is out: `<li><p>text</p></li>`
            elif tag == "pre":
                self._in_pre += 1
        elif tag in ("td", "th"):
            self._text.append(" ")

    def handle_endtag(self, tag):
        if tag in _DROPPED:
            self._dropped = max(0, self._dropped - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in _HEADINGS or tag in _BLOCKS:
            self._flush()
            self._heading = 0
            if tag == "li":
                self._bullet = ""
            elif tag == "pre":
                self._in_pre = max(0, self._in_pre - 1)

    def handle_data(self, data):
        if self._dropped:
            return
        if self._in_title:
            self.title += data
        else:
            self._text.append(data)

    def close(self):
        super().close()
        self._flush()

    def _flush(self):
        raw, self._text = "".join(self._text), []
        if self._in_pre:
            # An indented code block: keeps the layout, and `# comment` lines stay out of the headings.
            block = "\n".join("    " + line for line in raw.strip("\n").splitlines())
        else:
            block = " ".join(raw.split())
            if block.startswith("#") and not self._heading:
                block = "\\" + block  # text that merely starts with '#' is not a heading
        if block.strip():
            self.blocks.append("#" * self._heading + " " + block if self._heading else self._bullet + block)
            self._bullet = ""


def _load_html(file: Path, doc_id: str) -> list[Document]:
    parser = _HtmlText()
    parser.feed(_read_text(file))
    parser.close()
    metadata = {"title": " ".join(parser.title.split())} if parser.title.strip() else {}
    return [_document(file, doc_id, "\n\n".join(parser.blocks) + "\n", "html", metadata)]


# -- PDF ----------------------------------------------------------------------------------------


def _load_pdf(file: Path, doc_id: str) -> list[Document]:
    try:
        reader = pypdf.PdfReader(file)
        # Many PDFs are encrypted with an empty user password (permissions only); those still open.
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Skip("encrypted PDF (needs a password)")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except _Skip:
        raise
    except Exception as exc:  # pypdf raises all sorts (ValueError, KeyError, ...) on malformed files
        raise _Skip(f"unreadable PDF: {exc.__class__.__name__}: {exc}") from exc
    text = "\n\n".join(page for page in pages if page)
    if not text:
        raise _Skip("no extractable text")  # e.g. a scan: images only
    metadata = {"pages": len(pages)} | ({"title": str(title)} if title and str(title).strip() else {})
    return [_document(file, doc_id, text + "\n", "pdf", metadata)]


# -- JSONL: one Document per record -------------------------------------------------------------

_SCALARS = (str, int, float, bool)


def _load_jsonl(file: Path, doc_id: str, *, fields: JsonlFields, skipped: list[tuple[str, str]]) -> list[Document]:
    documents: list[Document] = []
    first_line: dict[str, int] = {}
    # Split on '\n' only: JSON strings may hold U+2028 and friends, which str.splitlines splits on.
    for number, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines between records are harmless
        try:
            record_id, text, metadata = _jsonl_record(raw, number, fields)
        except ValueError as exc:
            skipped.append((f"{file}:{number}", str(exc)))
            continue
        if record_id in first_line:
            skipped.append((f"{file}:{number}", f"duplicate record id '{record_id}' (first on line {first_line[record_id]})"))
            continue
        first_line[record_id] = number
        documents.append(_document(file, f"{doc_id}/{record_id}", text, "jsonl", metadata))
    return documents


def _jsonl_record(raw: bytes, number: int, fields: JsonlFields) -> tuple[str, str, dict]:
    """(record id, text, metadata) of one line; ValueError says what is wrong with it."""
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if fields.text_field not in record:
        raise ValueError(f"missing text field '{fields.text_field}'")
    text = record[fields.text_field]
    if not isinstance(text, str):
        raise ValueError(f"text field '{fields.text_field}' is a {type(text).__name__}, not a string")
    if not text.strip():
        raise ValueError(f"empty text field '{fields.text_field}'")
    record_id = record.get(fields.id_field)
    if record_id is None:
        record_id = number
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or not str(record_id).strip():
        raise ValueError(f"id field '{fields.id_field}' must be a non-empty string or an integer")
    if fields.metadata_fields:
        metadata = {k: record[k] for k in fields.metadata_fields if k in record}
    else:
        skip = {fields.text_field, fields.id_field}
        metadata = {k: v for k, v in record.items() if k not in skip and (v is None or isinstance(v, _SCALARS))}
    return str(record_id), text, metadata


_LOADERS: dict[str, Loader] = {
    ".md": _load_markdown,
    ".markdown": _load_markdown,
    ".txt": _load_text,
    ".html": _load_html,
    ".htm": _load_html,
    ".pdf": _load_pdf,
}


# -- finding files ------------------------------------------------------------------------------


def _expand(patterns: list[str]) -> list[tuple[Path, Path]]:
    """(root, file) pairs; the root decides the document id. A file reached twice is loaded once."""
    pairs: list[tuple[Path, Path]] = []
    taken: set[Path] = set()
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        # Ids of globbed files are relative to the glob's fixed prefix, so `a/x.md` and `b/x.md` differ.
        root = _glob_base(pattern)
        if not matches:  # a name glob cannot match (`notes[1].md`) or no such path
            matches, root = [Path(pattern)], Path(pattern)
        for path in matches:
            if path.is_dir():
                files = [f for f in sorted(path.rglob("*")) if f.is_file() and not _hidden(f.relative_to(path))]
            elif path.is_file():
                files = [path]
            else:
                raise UserError(f"no such file or directory: {pattern}")
            for file in files:
                if file.resolve() not in taken:
                    taken.add(file.resolve())
                    pairs.append((root, file))
    return pairs


def _glob_base(pattern: str) -> Path:
    fixed = []
    for part in Path(pattern).parts:
        if re.search(r"[*?[]", part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)  # dot files and dot folders (.git)
