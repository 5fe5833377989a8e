"""Page assembly: one self-contained HTML file with plotly.js inlined once.

The page needs no network: no CDN, no web fonts (system font stack). plotly.js (4.8 MB
minified, most of a 5 MB file budget) is embedded once, gzip-compressed and base64-encoded
(2 MB), in a data ``<script>`` of the head; the browser unpacks it with the standard
``DecompressionStream`` (Chrome 80, Firefox 113, Safari 16.4 and later) and every figure
draws once it is ready. A browser without it shows that reason in place of the figures. Every string that came from a model, a file or a user is
escaped here: :func:`html.escape` in markup, and in JSON placed inside ``<script>`` the
characters ``<``, ``>`` and ``&`` become ``\\u003c``-style escapes, so no data can close the
script element (``</script>``) or open a tag.
"""
from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import re
from dataclasses import dataclass
from typing import Any

PLOT_CONFIG = {"responsive": True, "displaylogo": False, "modeBarButtonsToRemove": ["sendDataToCloud"]}

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --accent: #3366cc; --bg-soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: white; line-height: 1.5;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
header { background: #1f2a44; color: white; padding: 1.4rem 1rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.5rem; overflow-wrap: anywhere; }
header p { margin: 0; color: #c9d1e3; font-size: .9rem; overflow-wrap: anywhere; }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 1rem; }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: .6rem 1rem;
          margin: 1.2rem 0; }
nav.toc ol { margin: .3rem 0; padding-left: 1.4rem; columns: 2 16rem; }
nav.toc a { color: var(--accent); text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
section { border-top: 1px solid var(--line); padding: .6rem 0 1.4rem; }
section h2 { font-size: 1.2rem; margin: .6rem 0 .2rem; }
p.explain { color: var(--muted); margin: .1rem 0 .7rem; max-width: 60rem; }
p.missing { background: #fff8e1; border-left: 4px solid #f5b400; padding: .5rem .8rem; margin: .6rem 0;
            overflow-wrap: anywhere; }
.plot { width: 100%; min-height: 300px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .92rem; }
th, td { border-bottom: 1px solid var(--line); padding: .3rem .8rem .3rem 0; text-align: left;
         vertical-align: top; overflow-wrap: break-word; }
th { font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
h3 { font-size: 1rem; margin: 1rem 0 .2rem; }
footer { color: var(--muted); font-size: .85rem; padding: 1rem 0 2rem; }
@media (max-width: 640px) { body { font-size: 14px; } nav.toc ol { columns: 1; } }
"""


@dataclass
class Section:
    """One section of the page. ``explanation`` and ``missing`` are plain text (escaped when
    rendered); ``body`` is markup built by this module's helpers, which escape their inputs."""

    id: str
    title: str
    explanation: str
    body: str = ""
    missing: str | None = None


def esc(text: Any) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def script_json(value: Any) -> str:
    """JSON safe to place inside ``<script>``: no ``<``, ``>`` or ``&`` survives literally."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# Unpacks the embedded plotly.js and runs it; ``plotlyReady`` resolves to ``Plotly``.
LOADER = """window.plotlyReady = (async function () {
  if (!("DecompressionStream" in window)) {
    throw new Error("this browser cannot unpack the embedded plotly.js (it needs DecompressionStream: "
                    + "Chrome 80, Firefox 113, Safari 16.4 or later)");
  }
  var packed = atob(document.getElementById("plotly-js-gzip").textContent.trim());
  var bytes = new Uint8Array(packed.length);
  for (var i = 0; i < packed.length; i++) bytes[i] = packed.charCodeAt(i);
  var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  var code = document.createElement("script");
  code.text = await new Response(stream).text();
  document.head.appendChild(code);
  return window.Plotly;
})();"""


@functools.lru_cache(maxsize=2)
def plotly_html(plotly_js: str) -> str:
    """plotly.js, gzip-compressed and base64-encoded in a data script, and the loader unpacking it."""
    packed = base64.b64encode(gzip.compress(plotly_js.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")
    return (f'<script type="application/octet-stream" id="plotly-js-gzip">{packed}</script>\n'
            f"<script>{LOADER}</script>")


def figure_html(fig, div_id: str) -> str:
    """A div and the script drawing ``fig`` into it once plotly.js is unpacked (or saying why it cannot)."""
    target = script_json(json.dumps(div_id))
    return (f'<div class="plot" id="{esc(div_id)}"></div>\n<script>(function () {{ var f = {script_json(fig.to_json())};'
            f' window.plotlyReady.then(function (Plotly) {{ return Plotly.newPlot({target}, f.data, f.layout, '
            f'{script_json(PLOT_CONFIG)}); }}).catch(function (e) {{ console.error("figure " + {target} + ": " + e); '
            f'document.getElementById({target}).textContent = "This figure could not be drawn: " + e.message; }});'
            f' }})();</script>')


NUMBER = re.compile(r"[+-]?[\d,]*\.?\d+(e[+-]?\d+)?%?( (B|KiB|MiB|GiB|ms))?")


def _cell(value: Any, align: bool = True) -> str:
    text = esc(value)
    if not align:
        return f"<td>{text}</td>"
    return f'<td class="num">{text}</td>' if NUMBER.fullmatch(text) or text == "-" else f"<td>{text}</td>"


def table_html(header: list[str] | None, rows: list[list[Any]] | list[tuple[Any, ...]], align: bool = True) -> str:
    """A table with every header and cell escaped; numbers right-aligned when ``align``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(_cell(c, align) for c in row) + "</tr>" for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<div class="table-wrap"><table>{head}<tbody>{body}</tbody></table></div>'


def missing_html(reason: str) -> str:
    """The note shown where a section has nothing to draw."""
    return f'<p class="missing">Not shown: {esc(reason)}</p>'


def render_page(title: str, subtitle: str, sections: list[Section], plotly_js: str, footer: str = "") -> str:
    """The whole page: head with CSS and plotly.js (once), header, table of contents, sections."""
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    parts = []
    for section in sections:
        parts.append(f'<section id="{esc(section.id)}"><h2>{esc(section.title)}</h2>'
                     f'<p class="explain">{esc(section.explanation)}</p>'
                     + (missing_html(section.missing) if section.missing else "") + section.body + "</section>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n"
        f"{plotly_html(plotly_js)}\n</head>\n<body>\n"
        f'<header><div class="wrap"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></div></header>\n'
        f'<main class="wrap">\n<nav class="toc"><strong>Contents</strong><ol>{toc}</ol></nav>\n'
        + "\n".join(parts)
        + f'\n<footer>{esc(footer)}</footer>\n</main>\n</body>\n</html>\n'
    )
