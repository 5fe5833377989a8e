"""The report in a real browser: headless Chromium opens it from a file URL, offline.

Asserts (with :func:`autocompress.report.browser.check_page`: an error collector injected at the
top of a copy of the page writes what it saw into the DOM; Chromium's console log on stderr is
checked too) that no JavaScript error happened, that the page fetched nothing and that every
section rendered (each plotly div holds its SVG); saves a screenshot whose path is printed. The
committed demo reports in ``reports/`` get the same check. Skipped, saying why, where no Chromium
binary exists (``.ci/run`` installs Debian's ``chromium`` when run as root).
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from report_run import build_run

from autocompress.report import write_report
from autocompress.report.browser import check_page, find_chromium, screenshot

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary on PATH (as root, .ci/run installs "
                                                         "Debian's chromium package; without root it cannot)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.mktemp("browser") / "run", model="<script>alert(1)</script>")
    return write_report(run_dir)


def test_the_probe_sees_errors_fetches_and_unrendered_plots(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><section id="s"><div class="plot" id="fig-x"></div>'
                    '</section><img src="http://example.invalid/x.png"><script>notDefinedAnywhere();</script>'
                    '<script>alert("hi")</script></body></html>')
    check = check_page(page)
    assert len(check.errors) == 2 and "notDefinedAnywhere" in check.errors[0] and check.errors[1] == "alert: hi"
    assert check.resources == ["http://example.invalid/x.png"]
    assert any("notDefinedAnywhere" in line for line in check.console), check.console
    assert check.sections == ["s"] and check.unrendered == ["fig-x"]


def test_report_renders_in_chromium_without_errors(report):
    check = check_page(report)
    assert check.errors == [] and check.console == [], (check.errors, check.console)
    assert check.resources == [], f"the report fetched {check.resources}"
    assert check.sections == ["summary", "sensitivity", "roles", "schedule", "pareto", "history", "importances",
                              "prediction", "evaluation", "frontier", "staged", "artifacts"]
    assert len(check.plots) == 9 and check.unrendered == [], check.plots
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in check.dom  # the hostile model name is shown as text


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


REPORTS = sorted((Path(__file__).parent.parent / "reports").glob("*.html"))


@pytest.mark.skipif(not REPORTS, reason="no committed report in reports/ yet (make demo writes it)")
@pytest.mark.parametrize("page", REPORTS, ids=[p.name for p in REPORTS])
def test_committed_reports_render_offline_without_errors(page):
    check = check_page(page)
    assert check.errors == [] and check.console == [] and check.resources == [], check
    assert check.plots and check.unrendered == [], check.plots
    assert page.stat().st_size < 5_000_000
