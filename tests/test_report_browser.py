"""The report in a real browser: headless Chromium opens it from a file URL, offline.

Asserts that no JavaScript error happened (an error collector is injected at the top of a copy
of the page and writes what it saw into the DOM; Chromium's console log on stderr is checked
too), that the page fetched nothing, that every section rendered (each plotly div holds its
SVG), and saves a screenshot whose path is printed. Skipped, saying why, where no Chromium
binary exists (``.ci/run`` installs Debian's ``chromium`` when run as root).
"""
from __future__ import annotations

import html
import json
import re
import struct
from html.parser import HTMLParser

import pytest
from report_run import build_run

from autocompress.report import write_report
from autocompress.report.browser import dump_dom, find_chromium, screenshot

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary on PATH (as root, .ci/run installs "
                                                         "Debian's chromium package; without root it cannot)")

# Collects uncaught errors, rejected promises, console.error calls and any alert(), then, after
# load, writes them and every resource the page fetched into <pre id="__probe">.
PROBE = """<script>
window.__seen = [];
window.addEventListener("error", function (e) { window.__seen.push("error: " + e.message); });
window.addEventListener("unhandledrejection", function (e) { window.__seen.push("rejection: " + e.reason); });
(function () {
  var original = console.error;
  console.error = function () { window.__seen.push("console.error: " + Array.prototype.join.call(arguments, " "));
                                original.apply(console, arguments); };
})();
window.alert = function (m) { window.__seen.push("alert: " + m); };
window.addEventListener("load", function () {
  setTimeout(function () {
    var pre = document.createElement("pre");
    pre.id = "__probe";
    pre.textContent = JSON.stringify({errors: window.__seen,
                                      resources: performance.getEntriesByType("resource").map(function (r) { return r.name; })});
    document.body.appendChild(pre);
  }, 1000);
});
</script>"""

class _Plots(HTMLParser):
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
        if tag in ("br", "img", "input", "meta", "link", "hr", "col", "wbr"):
            return
        plot = attrs.get("id") if tag == "div" and "plot" in classes else None
        if plot is not None:
            self.rendered.setdefault(plot, False)
        self._stack.append(plot)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "img", "input", "meta", "link", "hr", "col", "wbr"):
            self._stack.pop()

    def handle_endtag(self, tag):
        if self._stack and tag not in ("br", "img", "input", "meta", "link", "hr", "col", "wbr"):
            self._stack.pop()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.mktemp("browser") / "run", model="<script>alert(1)</script>")
    return write_report(run_dir)


def _open(tmp_path, page: str) -> tuple[dict, str, list[str]]:
    """Load ``page`` with the probe: (what the probe saw, the DOM after load, console errors on stderr)."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>\n" + PROBE, 1))
    done = dump_dom(probed)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    probe = re.search(r'<pre id="__probe">(.*?)</pre>', dom, re.S)
    assert probe, "the page never finished loading (no probe output in the DOM)"
    seen = json.loads(html.unescape(probe.group(1)))
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    return seen, dom, console


def test_the_probe_sees_errors_fetches_and_unrendered_plots(tmp_path):
    page = ('<!DOCTYPE html><html><head></head><body><div class="plot" id="fig-x"></div>'
            '<img src="http://example.invalid/x.png"><script>notDefinedAnywhere();</script></body></html>')
    seen, dom, console = _open(tmp_path, page)
    assert len(seen["errors"]) == 1 and "notDefinedAnywhere" in seen["errors"][0]
    assert seen["resources"] == ["http://example.invalid/x.png"]
    assert any("notDefinedAnywhere" in line for line in console), console
    plots = _Plots()
    plots.feed(dom)
    assert plots.rendered == {"fig-x": False}


def test_report_renders_in_chromium_without_errors(report, tmp_path):
    seen, dom, console = _open(tmp_path, report.read_text())
    assert seen["errors"] == [], seen["errors"]
    assert seen["resources"] == [], f"the report fetched {seen['resources']}"
    assert console == [], console

    plots = _Plots()
    plots.feed(dom)
    assert plots.sections == ["summary", "sensitivity", "roles", "schedule", "pareto", "history", "importances",
                              "prediction", "evaluation", "staged", "artifacts"]
    assert len(plots.rendered) == 8 and all(plots.rendered.values()), plots.rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # the hostile model name is shown as text


def test_report_screenshot(report, tmp_path):
    shot = screenshot(report, tmp_path / "report.png", height=7200)
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1280, 7200)
    assert shot.stat().st_size > 100_000  # a blank page compresses to a few kB
    print(f"report screenshot: {shot}")


def test_cli_report_saves_a_screenshot(report, tmp_path, capsys):
    from autocompress.cli import main

    png = tmp_path / "top.png"
    assert main(["report", str(report.parent), "--out", str(tmp_path / "r.html"), "--screenshot", str(png)]) == 0
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (1280, 2400)
    assert f"wrote {png}" in capsys.readouterr().out.replace("\n", "")
