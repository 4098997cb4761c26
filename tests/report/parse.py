"""A small reader of the report's HTML for the tests: per section, its images, tables,
text and "not available" notes (stdlib ``html.parser``, no browser)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from html.parser import HTMLParser

# The sections the report must have, in page order (issue 11, deliver item 5): the answer
# first (issue 26), the evidence next, the data last.
SECTION_IDS = ("summary", "promotion", "held-out", "uncertainty-dice", "federated-rounds",
               "shift-matrices", "shift-candidates", "vendor-site")


@dataclass
class ParsedSection:
    images: list[bytes] = field(default_factory=list)
    table_rows: list[int] = field(default_factory=list)  # body rows of each table
    text: str = ""
    missing: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # href of each <a>
    cells: list[str] = field(default_factory=list)  # text of each table cell


class ReportParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, ParsedSection] = {}
        self.tags: set[str] = set()
        self.srcs: list[str] = []
        self._current: ParsedSection | None = None
        self._in_tbody = False
        self._in_missing = False
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._current = self.sections.setdefault(a.get("id") or "", ParsedSection())
        cur = self._current
        for k in ("src", "href"):
            if a.get(k):
                self.srcs.append(a[k] or "")
        if cur is None:
            return
        if tag == "img":
            src = a.get("src") or ""
            prefix = "data:image/png;base64,"
            cur.images.append(base64.b64decode(src[len(prefix):]) if src.startswith(prefix)
                              else b"")
        elif tag == "table":
            cur.table_rows.append(0)
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            cur.table_rows[-1] += 1
        elif tag in ("td", "th") and self._in_tbody:
            self._in_cell = True
            cur.cells.append("")
        elif tag == "a":
            cur.links.append(a.get("href") or "")
        elif tag == "p" and a.get("class") == "missing":
            self._in_missing = True
            cur.missing.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None
        elif tag == "tbody":
            self._in_tbody = False
        elif tag == "p":
            self._in_missing = False
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._current.text += data
            if self._in_missing:
                self._current.missing[-1] += data
            if self._in_cell:
                self._current.cells[-1] += data


def parse(doc: str) -> ReportParser:
    p = ReportParser()
    p.feed(doc)
    p.close()
    return p
