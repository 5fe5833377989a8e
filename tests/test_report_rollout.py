"""The report's rollout section, drawn from the event log of a real ``serve`` session.

Two tiny models are served over loopback HTTP (as in test_serve_http): an admin pause and
resume, enough healthy load to be promoted from 50% to 100%, then an injected fault until
the policy fails over. ``autocompress report RUN`` must then show the share steps, each
stage's monitors and the reasons, escaped; without a log there is no such section, and a
damaged line is a note, not a crash.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest
from serve_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from serve_helpers import run_load, tiny_pair

from autocompress.cli import main
from autocompress.report.rollout_info import rollout_info
from autocompress.serve.engine import Fault, FaultKind
from autocompress.serve.events import read_events
from autocompress.serve.policy import Policy
from autocompress.serve.server import ServeConfig, Server

pytestmark = pytest.mark.timeout(180)

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    """RUN with RUN/serve/events.jsonl from a session that paused, was promoted and failed over."""
    run = tmp_path_factory.mktemp("rollout") / "run"
    token = run.parent / "token"
    token.write_text("s3cret-token\n")
    config = ServeConfig(f"orig {EVIL}", f"cand {EVIL}", str(run / "serve"), shadow=100.0, model_name="tiny",
                         admin_token_file=str(token))
    pair = tiny_pair(tokenizer)
    server = Server(config, pair[0], pair[1], Policy(stages=(50, 100), min_requests=8, min_shadow=3), bucket_s=1.0)
    server.start()
    try:
        auth = {"Authorization": "Bearer s3cret-token"}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/admin/pause", headers=auth).json()["status"] == "paused"
            assert client.post("/admin/pause", headers=auth, json={"paused": False}).json()["status"] == "ramping"
        for _ in range(6):  # bounded: at most 6 x 24 requests
            assert run_load(server.url, 24, workers=4).failed == 0
            if server.controller.rollout.share == 100:
                break
        assert server.controller.rollout.share == 100
        server.engine.fault = Fault(FaultKind.ERRORS)
        assert run_load(server.url, 40, workers=4).failed == 0  # retried on the original
        assert server.controller.rollout.share == 0
    finally:
        server.stop()
    return run


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    assert main(["report", str(run_dir)]) == 0
    return (run_dir / "report.html").read_text()


def _section(page: str) -> str:
    match = re.search(r'<section id="rollout">(.*?)</section>', page, re.S)
    assert match, "no rollout section"
    return match.group(1)


def test_share_steps_stages_and_counts_follow_the_log(run_dir):
    events = read_events(run_dir / "serve" / "events.jsonl")
    info = rollout_info(run_dir / "serve" / "events.jsonl")
    assert info.problems == [] and info.events == len(events)
    assert info.share == [50.0, 100.0, 0.0, 0.0]  # start, promotion, failover, drawn on to the last event
    assert info.share_t == sorted(info.share_t) and info.share_t[0] == 0.0
    assert [s.share for s in info.stages] == [50.0, 100.0, 0.0]
    assert [s.opened_by for s in info.stages] == ["started (policy stage 0)", "promoted (policy stage 1)",
                                                  "failed over"]
    assert [c.kind for c in info.changes] == ["pause", "pause", "promote", "failover"]
    assert info.status == "failed_over" and "error rate" in info.reason
    # each stage counts exactly the requests and shadow scores logged from its opening event to the next
    cuts = [0, *(i for i, e in enumerate(events) if e["type"] in ("promote", "failover")), len(events)]
    for stage, low, high in zip(info.stages, cuts, cuts[1:]):
        inside = events[low:high]
        for arm in ("original", "candidate"):
            requests = [e for e in inside if e["type"] == "request" and e["arm"] == arm]
            assert stage.arms[arm]["requests"] == len(requests), (stage.number, arm)
            assert stage.arms[arm]["errors"] == sum(bool(e["error"]) for e in requests), (stage.number, arm)
        assert stage.shadow["scores"] == sum(e["type"] == "shadow" for e in inside)
    assert info.stages[0].arms["candidate"]["requests"] >= 8 and info.stages[0].shadow["scores"] >= 3
    assert info.stages[1].arms["candidate"]["errors"] >= 1  # the fault, before the failover
    assert sum(s.arms["original"]["retried"] for s in info.stages) >= 1  # its requests, served by the original


def test_report_shows_the_rollout_section_escaped(page, run_dir):
    body = _section(page)
    assert '<a href="#rollout">' in page and 'id="fig-rollout"' in body
    failover = next(e for e in read_events(run_dir / "serve" / "events.jsonl") if e["type"] == "failover")
    assert ">" in failover["reason"] and failover["reason"].replace(">", "&gt;") in body
    assert "orig &lt;script&gt;alert(1)&lt;/script&gt;" in body and EVIL not in page
    for header in ("latency p95", "TTFT p50", "tokens/s", "top-1 agreement", "candidate log-prob"):
        assert f"<th>{header}</th>" in body
    assert body.count("<td>candidate</td>") == 3 and body.count("<td>original</td>") == 3  # three stages
    assert "<td>promoted by an admin</td>" not in body and "within thresholds" in body  # the policy's own reason
    figure = json.loads(re.search(r'var f = (\{.*?\}); window\.plotlyReady', body, re.S).group(1))
    share = figure["data"][0]
    assert share["y"] == [50.0, 100.0, 0.0, 0.0] and share["line"]["shape"] == "hv"
    markers = {trace["name"]: trace for trace in figure["data"][1:]}
    assert set(markers) == {"promote", "failover", "pause"}
    assert markers["failover"]["text"] == [failover["reason"].replace(">", "&gt;")]  # plotly's HTML subset


def test_no_log_no_section(tmp_path):
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert 'id="rollout"' not in page and "#rollout" not in page


def test_damaged_lines_are_notes_not_crashes(run_dir, tmp_path):
    lines = (run_dir / "serve" / "events.jsonl").read_text().splitlines()
    copy = tmp_path / "run"
    (copy / "serve").mkdir(parents=True)
    request = next(json.loads(line) for line in lines if '"type":"request"' in line)
    del request["arm"]
    damaged = [*lines[:3], f"not json {EVIL}", json.dumps(request), '{"v":9,"t":1,"type":"x"}', *lines[3:],
               '{"v":1,"t":1,"ty']  # the last one torn, as by a killed server: dropped silently
    (copy / "serve" / "events.jsonl").write_text("\n".join(damaged))
    info = rollout_info(copy / "serve" / "events.jsonl")
    assert len(info.problems) == 3 and info.share == [50.0, 100.0, 0.0, 0.0]
    assert "line 4 is not JSON" in info.problems[0] and "line 6: not an autocompress serve event" in info.problems[1]
    assert "readable event 4 (request)" in info.problems[2] and "'arm'" in info.problems[2]
    assert main(["report", str(copy)]) == 0
    body = _section((copy / "report.html").read_text())
    assert body.count("Not shown: damaged event log") == 3 and 'id="fig-rollout"' in body
    (copy / "serve" / "events.jsonl").write_bytes(b"\xff\xfe not text\n")
    assert main(["report", str(copy)]) == 0
    body = _section((copy / "report.html").read_text())
    assert "cannot read the event log" in body and "no usable event" in body
