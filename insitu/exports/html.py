"""A self-contained ``report.html``: every figure embedded as a base64 data URI, no external files.

Sections are (heading, Markdown-ish body) like ``report.md``; bodies may hold Markdown tables
(``| a | b |``), paragraphs and ``code``. Figures are PNG paths embedded inline.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #4878a8}h2{margin-top:1.6em;color:#234}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#eef3f8}code{background:#f3f3f3;padding:0 .2em}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
"""


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _table(lines: list[str]) -> str:
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in lines
        if not re.fullmatch(r"\|?(\s*-+\s*\|)+\s*-*\s*", line.strip())
    ]
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(body: str) -> str:
    """The small Markdown subset reports use: tables, bullet lists, paragraphs, inline code."""
    out, block = [], []
    for chunk in re.split(r"\n\s*\n", body.strip()):
        lines = chunk.splitlines()
        if chunk.lstrip().startswith("```"):
            out.append("<pre>" + html.escape(chunk.strip().strip("`").strip()) + "</pre>")
        elif lines and all(line.strip().startswith("|") for line in lines):
            out.append(_table(lines))
        elif lines and all(line.strip().startswith("- ") for line in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(line.strip()[2:])}</li>" for line in lines) + "</ul>")
        elif lines:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out + block)


def _figure(caption: str, path: Path) -> str:
    return f"<figure><img alt='{html.escape(caption)}' src='{data_uri(path)}'><figcaption>{html.escape(caption)}</figcaption></figure>"


def write_html_report(
    out: Path,
    title: str,
    sections: list[tuple[str, str]],
    figures: list[tuple[str, Path]] | None = None,
    lead: tuple[str, Path | None] | None = None,
) -> Path:
    """Write ``out`` (an .html file) with the sections and the figures (caption, PNG path) embedded.

    ``lead`` (caption, PNG) is placed right after the first section (the verdict), before every other figure.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    for i, (heading, body) in enumerate(sections):
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{markdown_to_html(body)}")
        if i == 0 and lead is not None and lead[1] is not None and Path(lead[1]).is_file():
            parts.append(_figure(*lead))
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(caption, path) for caption, path in figures if path is not None and Path(path).is_file()]
    parts.append("</body></html>")
    out = Path(out)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
