"""A tiny document model rendered twice: Markdown (figures as files) and self-contained HTML (figures inline)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str  # may use **bold** and `code`


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str
    title: str
    caption: str
    path: str  # relative to the report
    png: bytes
    number: int


@dataclass
class Code:
    text: str
    summary: str = ""  # HTML: a collapsible block with this summary


Block = Heading | Paragraph | Bullets | Table | Image | Code


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _cell_md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_cell_md(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Image):
            lines += [f"![{block.title}]({block.path})", "",
                      f"*Figure {block.number}. {block.caption}*", ""]
        elif isinstance(block, Code):
            lines += ["```yaml" if block.summary else "```", block.text.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1.2em;color:#222;line-height:1.5}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
figure{margin:1.5em 0;padding:0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.95em;color:#333;margin-top:.4em}figcaption b{color:#000}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f5f5f5}tr:nth-child(even) td{background:#fafafa}
code,pre{background:#f6f8fa;border-radius:3px}pre{padding:.8em;overflow-x:auto;font-size:.85em}
details summary{cursor:pointer;color:#555}
"""


def to_html(blocks: list[Block], title: str) -> str:
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f"<figure id=\"fig-{block.name}\"><img alt=\"{html.escape(block.title)}\" "
                         f"data-figure=\"{block.name}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption><b>Figure {block.number}.</b> {_inline_html(block.caption)}</figcaption>"
                         "</figure>")
        elif isinstance(block, Code):
            code = f"<pre><code>{html.escape(block.text)}</code></pre>"
            parts.append(f"<details><summary>{html.escape(block.summary)}</summary>{code}</details>"
                         if block.summary else code)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
