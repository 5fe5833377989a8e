"""Headless Chromium for the report: a screenshot (for the README) and the rendered DOM (for tests).

Chromium is optional: :func:`find_chromium` returns None where it is not installed (Debian:
``apt-get install chromium``). Every run is offline (all host names resolve to nothing) and
uses a throw-away profile directory.

Example::

    screenshot("runs/x/report.html", "reports/demo.png", height=2400)
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
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
