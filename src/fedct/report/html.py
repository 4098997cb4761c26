"""Markup of the report: a page, its sections, tables, embedded figures and notes.

Everything is static HTML: figures are base64 PNG ``data:`` URIs, tables come from
``pandas.DataFrame.to_html``, styles are inline, and there is no script and no external
URL, so the file opens anywhere (an e-mail attachment, an MLflow artifact, a PACS-side
browser without network access). The only links are to the page's own sections and, under
a table cut to ``MAX_ROWS``, to the full CSV beside the report in the pipeline's outputs
folder (``../<stage>/<file>.csv`` from ``outputs/report/report.html``).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Rows a table shows on the page; longer tables link their full CSV.
MAX_ROWS = 20

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1a1a1a;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:1px solid #ccc;padding-bottom:0.2em;
margin-top:2em}h3{font-size:1.05em;margin-bottom:0.3em}
nav ol{columns:2;font-size:0.95em}
table.data{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1em}
table.data th,table.data td{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.data th{background:#f2f2f2}table.data tbody tr:nth-child(even){background:#fafafa}
figure{margin:0.5em 0 1.5em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555}
p.missing{background:#fff4e5;border-left:4px solid #e69500;padding:0.4em 0.8em}
p.note{font-size:0.85em;color:#555}
div.verdict{font-size:1.15em;font-weight:600;padding:0.5em 0.8em;margin:0.5em 0}
div.promoted{background:#e6f4ea;border-left:5px solid #1e8e3e}
div.refused{background:#fce8e6;border-left:5px solid #d93025}
section#summary{background:#f7f9fc;border:1px solid #d0d7e2;padding:0 1em 0.5em}
section#summary ul{font-size:1.05em}
"""


@dataclass(frozen=True)
class Section:
    """One section of the page: an anchor id, a heading and its HTML parts in order.

    ``missing`` lists the inputs (paths relative to the outputs folder) that the section
    could not find; each also appears in ``parts`` as a visible note.
    """

    id: str
    title: str
    parts: tuple[str, ...]
    missing: tuple[str, ...] = ()


def text(s: object) -> str:
    """``s`` as escaped HTML text."""
    return html.escape(str(s), quote=True)


def heading(s: str, level: int = 3) -> str:
    return f"<h{level}>{text(s)}</h{level}>"


def paragraph(s: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{text(s)}</p>'


def missing_note(name: str) -> str:
    """The visible note of an input that is not there (``name``: relative path)."""
    return paragraph(f"not available: {name} missing", "missing")


def bullet_list(items: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{text(i)}</li>" for i in items) + "</ul>"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def csv_link(rel: str) -> str:
    """A link to ``rel`` (relative to the outputs folder) from ``outputs/report/``."""
    return f'<a href="../{text(rel)}">{text(rel)}</a>'


def table(df: pd.DataFrame, caption: str | None = None, index: bool = False,
          source: str | None = None) -> str:
    """``df`` as an HTML table (cells escaped, floats to 4 significant digits).

    An empty frame gives a note instead of a table without rows. A frame longer than
    ``MAX_ROWS`` shows its first rows and a note linking ``source``, the full CSV
    (relative to the outputs folder), which a caller that shortens a table itself names
    too.
    """
    head = heading(caption) if caption else ""
    if df.empty:
        return head + paragraph("no rows")
    shown = df.head(MAX_ROWS)
    body = shown.to_html(index=index, border=0, classes="data", na_rep="–",
                         float_format=_fmt, escape=True, justify="center")
    if len(shown) < len(df):
        where = f": every row in {csv_link(source)}" if source else ""
        body += (f'<p class="note">first {len(shown)} of {len(df)} rows{where}</p>')
    elif source:
        body += f'<p class="note">as CSV: {csv_link(source)}</p>'
    return head + body


def figure(png: bytes, alt: str, caption: str | None = None) -> str:
    """A PNG embedded as a ``data:`` URI, with alt text and an optional caption."""
    if not png.startswith(PNG_MAGIC):
        raise ValueError(f"figure {alt!r}: not PNG data")
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{text(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{text(alt)}">'
            f"{cap}</figure>")


def render_section(section: Section) -> str:
    return (f'<section id="{text(section.id)}">{heading(section.title, 2)}'
            + "".join(section.parts) + "</section>")


def page(title: str, sections: Sequence[Section], intro: Sequence[str] = ()) -> str:
    """The whole document: title, table of contents, the sections in order."""
    toc = "".join(f'<li><a href="#{text(s.id)}">{text(s.title)}</a></li>' for s in sections)
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{text(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{text(title)}</h1>" + "".join(paragraph(p) for p in intro)
            + f"<nav><ol>{toc}</ol></nav></header><main>"
            + "\n".join(render_section(s) for s in sections)
            + "</main></body></html>\n")
