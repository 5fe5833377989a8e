"""The HTML report of a run: ``write_report(run_dir)`` writes ``run_dir/report.html``.

:mod:`.data` (with :mod:`.profile_info`, :mod:`.search_info` and :mod:`.formats`) extracts each
section's numbers without plotting, :mod:`.figures` draws them with plotly, :mod:`.html`
assembles one self-contained page (plotly.js inlined once, every string escaped), :mod:`.build`
ties them together and :mod:`.browser` checks or photographs a page in headless Chromium.
"""
from .build import build_sections, render_report, write_report
from .data import Run, load_run

__all__ = ["Run", "build_sections", "load_run", "render_report", "write_report"]
