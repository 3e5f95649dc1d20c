"""The report page: one self-contained HTML file (inline CSS, figures as data: URIs, no script, no external link).

Example::

    >>> page = Page("quick")
    >>> page.section("costs", "Cost", table(["run", "tokens/s"], [["full", "118.4"]]))
    >>> page.render()[:15]
    '<!DOCTYPE html>'
"""

from __future__ import annotations

from html import escape

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em} th,td{border:1px solid #ddd;padding:3px 7px;
text-align:right;vertical-align:top} th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.notrun{color:#8a5a00;background:#fff6e0;padding:.4em .7em;border-left:4px solid #e0a800}
.rec{background:#eef7ee;border-left:4px solid #3a3;padding:.5em .8em} .sig{font-weight:600}
pre{background:#f6f6f6;padding:.7em;overflow-x:auto;font-size:.8em} img{max-width:100%;margin:.4em 0}
nav a{margin-right:1em} .small{font-size:.85em;color:#555}
"""


def not_run(what: str) -> str:
    return f'<p class="notrun">Not run: {escape(what)}</p>'


def para(text: str, cls: str | None = None) -> str:
    return f'<p{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{escape(text)}</p>'


def img(b64: str | None, alt: str, missing: str) -> str:
    if b64 is None:
        return not_run(missing)
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def table(header: list[str], rows: list[list], caption: str | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    cap = f"<caption class=small>{escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


class Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[tuple[str, str, str]] = []  # (anchor, heading, body html)

    def section(self, anchor: str, heading: str, body: str) -> None:
        self.parts.append((anchor, heading, body))

    def render(self, intro: str = "") -> str:
        nav = "".join(f'<a href="#{a}">{escape(h)}</a>' for a, h, _ in self.parts)
        secs = "".join(f'<section id="{a}"><h2>{escape(h)}</h2>{b}</section>' for a, h, b in self.parts)
        return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body><h1>{escape(self.title)}</h1>{intro}<nav>{nav}</nav>{secs}"
                "</body></html>\n")
