"""Headless Chromium for the report: a screenshot (for the README) and the rendered DOM (for tests).

Chromium is optional: :func:`find_chromium` returns None where it is not installed (Debian:
``apt-get install chromium``). Every run is offline (all host names resolve to nothing) and
uses a throw-away profile directory.

Example::

    screenshot("runs/x/report.html", "reports/demo.png", height=2400)
    check = check_page("runs/x/report.html")
    check.errors, check.resources, check.unrendered
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import UserError

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
         "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0")


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) binary on PATH, or None."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def run_headless(page: str | Path, *args: str, budget_ms: int = 15000, timeout: float = 120) -> \
        subprocess.CompletedProcess:
    """Open ``page`` (a file) in headless Chromium with extra ``args``; stdout and stderr captured.

    ``budget_ms`` is Chromium's virtual time budget: how long scripts may run before the
    page is taken as it is.
    """
    binary = find_chromium()
    if binary is None:
        raise UserError("no Chromium found on PATH; install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="autocompress-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                               *args, Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)


def dump_dom(page: str | Path) -> subprocess.CompletedProcess:
    """The DOM of ``page`` after its scripts ran (``stdout``), and Chromium's log (``stderr``)."""
    return run_headless(page, "--dump-dom")


def screenshot(page: str | Path, png: str | Path, *, width: int = 1280, height: int = 2400) -> Path:
    """Save a PNG of the top ``width`` x ``height`` pixels of ``page`` after its figures are drawn."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    done = run_headless(page, f"--window-size={width},{height}", f"--screenshot={png.resolve()}")
    if done.returncode != 0 or not png.exists():
        raise UserError(f"Chromium could not take the screenshot (exit {done.returncode}): "
                        f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
    return png


# Collects uncaught errors, rejected promises, console.error calls and any alert(); from load
# on (and again at every later error, since figures draw asynchronously) it writes them and
# every resource the page fetched into <pre id="__probe">.
PROBE = """<script>
window.__seen = [];
window.__loaded = false;
function __report() {
  if (!window.__loaded) return;
  var pre = document.getElementById("__probe");
  if (!pre) { pre = document.createElement("pre"); pre.id = "__probe"; document.body.appendChild(pre); }
  pre.textContent = JSON.stringify({errors: window.__seen,
                                    resources: performance.getEntriesByType("resource").map(function (r) { return r.name; })});
}
function __record(message) { window.__seen.push(message); __report(); }
window.addEventListener("error", function (e) { __record("error: " + e.message); });
window.addEventListener("unhandledrejection", function (e) { __record("rejection: " + e.reason); });
(function () {
  var original = console.error;
  console.error = function () { __record("console.error: " + Array.prototype.join.call(arguments, " "));
                                original.apply(console, arguments); };
})();
window.alert = function (m) { __record("alert: " + m); };
window.addEventListener("load", function () {
  setTimeout(function () { window.__loaded = true; __report(); }, 1000);
});
</script>"""

VOID = ("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr")


class PlotScanner(HTMLParser):
    """Per plot div (class ``plot``), whether an element of class ``main-svg`` lies inside it."""

    def __init__(self):
        super().__init__()
        self.rendered: dict[str, bool] = {}
        self.sections: list[str] = []
        self._stack: list[str | None] = []  # plot id for plot divs, None for other open elements

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and attrs.get("id"):
            self.sections.append(attrs["id"])
        if "main-svg" in classes:
            for plot in self._stack:
                if plot is not None:
                    self.rendered[plot] = True
        if tag in VOID:
            return
        plot = attrs.get("id") if tag == "div" and "plot" in classes else None
        if plot is not None:
            self.rendered.setdefault(plot, False)
        self._stack.append(plot)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self._stack.pop()

    def handle_endtag(self, tag):
        if self._stack and tag not in VOID:
            self._stack.pop()


@dataclass
class PageCheck:
    """What a page did in the browser: JavaScript errors (uncaught, rejected, console.error,
    alert), resources it fetched, Chromium's console errors, its sections and, per plot div,
    whether plotly drew its SVG into it."""

    errors: list[str]
    resources: list[str]
    console: list[str]
    sections: list[str]
    plots: dict[str, bool]
    dom: str = field(repr=False)

    @property
    def unrendered(self) -> list[str]:
        """Plot divs left without an SVG."""
        return [plot for plot, drawn in self.plots.items() if not drawn]


def check_page(page: str | Path) -> PageCheck:
    """Open a copy of ``page`` with an error collector injected first in its head; report what happened."""
    text = Path(page).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="autocompress-check-") as tmp:
        probed = Path(tmp) / "probed.html"
        probed.write_text(text.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
        done = dump_dom(probed)
    if done.returncode != 0:
        raise UserError(f"Chromium failed on {page} (exit {done.returncode})")
    found = re.search(r'<pre id="__probe">(.*?)</pre>', done.stdout, re.S)
    seen = json.loads(html.unescape(found.group(1))) if found else {
        "errors": ["the page never finished loading (the probe wrote nothing)"], "resources": []}
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    scanner = PlotScanner()
    scanner.feed(done.stdout)
    return PageCheck(seen["errors"], seen["resources"], console, scanner.sections, scanner.rendered, done.stdout)
