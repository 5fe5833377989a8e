"""The live dashboard in headless Chromium, served over loopback by a running server.

Chromium opens ``http://127.0.0.1:PORT/`` (every host name resolves to nothing, so the page
can fetch only from the server), runs the page's scripts for a few seconds of virtual time
and dumps the DOM: every plot must hold plotly's SVG, both arms' columns must be filled, the
promotion and the failover must be marked, and the console must show no error. A screenshot
is saved too. Skipped, saying why, where no Chromium binary exists.
"""
from __future__ import annotations

import html
import re
import struct
import subprocess
import tempfile

import httpx
import pytest
from serve_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from serve_helpers import run_load, start_server, tiny_pair

from autocompress.report.browser import FLAGS, PlotScanner, find_chromium
from autocompress.serve.policy import Policy

pytestmark = [pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary on PATH (as root, .ci/run "
                                 "installs Debian's chromium package; without root it cannot)"),
              pytest.mark.timeout(180)]


# The report's flags, but the loopback address is left alone (every other host resolves to nothing).
LOOPBACK_FLAGS = tuple(f"{f}, EXCLUDE 127.0.0.1" if f.startswith("--host-resolver-rules") else f for f in FLAGS)


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``url`` with ``args`` (offline but for loopback, throw-away profile)."""
    with tempfile.TemporaryDirectory(prefix="autocompress-serve-chromium-") as profile:
        return subprocess.run([find_chromium(), *LOOPBACK_FLAGS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=6000",
                               *args, url], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("dashboard-token")
    server = start_server(tiny_pair(tokenizer), tmp_path_factory.mktemp("dash") / "run",
                          Policy(stages=(10, 50, 100), min_requests=10**9), shadow=50.0, admin_token_file=str(token))
    try:
        auth = {"Authorization": "Bearer dashboard-token"}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            run_load(server.url, 40)
            assert client.post("/admin/promote", headers=auth).status_code == 200
            run_load(server.url, 40)
            assert client.post("/admin/rollback", headers=auth).status_code == 200
            run_load(server.url, 20)
        yield server
    finally:
        server.stop()


def test_dashboard_renders_both_arms_and_the_markers(live):
    done = chromium(live.url + "/", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert console == []
    scanner = PlotScanner()
    scanner.feed(done.stdout)
    assert scanner.sections == ["state", "arms", "charts"]
    assert sorted(scanner.rendered) == ["fig-latency", "fig-rate", "fig-shadow", "fig-share"]
    assert all(scanner.rendered.values()), scanner.rendered
    text = html.unescape(re.sub(r"<[^>]+>", " ", done.stdout))
    assert "rolled back" in text and "rolled back by an admin" in text  # the status line
    rows = re.findall(r"<tr><td>requests</td><td>(\d+)</td><td>(\d+)</td></tr>", done.stdout)
    assert rows and all(int(n) > 0 for n in rows[0])  # both arms side by side
    # the promotion and the rollback are marked (annotations on the share plot)
    assert ">promote<" in done.stdout and ">rollback<" in done.stdout


def test_dashboard_screenshot(live, tmp_path):
    png = tmp_path / "dashboard.png"
    done = chromium(live.url + "/", "--window-size=1280,1100", f"--screenshot={png}")
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1280, 1100)
    assert png.stat().st_size > 50_000  # a blank page compresses to a few kB
    print(f"dashboard screenshot: {png}")
