"""The live dashboard: a data step (plain JSON from the monitor) and one HTML page that draws it.

The page loads plotly from the server itself (``/static/plotly.min.js``, the copy shipped in
the ``plotly`` package), so it works offline, and redraws from ``/dashboard.json`` every two
seconds: both arms side by side (counters, latency and TTFT quantiles, tokens/s), the
canary share over time, latency and request rate per arm, shadow agreement and KL, with
every promotion, failover, rollback and pause marked on each time axis.
"""
from __future__ import annotations

import functools
import time

from .monitor import Monitor
from .rollout import Rollout
from .routing import Arm
from .stats import finite_or_none, mean, quantile


def dashboard_data(monitor: Monitor, rollout: Rollout, now: float | None = None) -> dict:
    """Everything the page shows, as JSON-able lists (times in milliseconds since the epoch)."""
    buckets = list(monitor.series)
    width = monitor.bucket_s
    series = {
        "t": [b.start * 1000 for b in buckets],
        "share": [b.share for b in buckets],
        "rate": {arm.value: [b.requests[arm] / width for b in buckets] for arm in Arm},
        "errors": {arm.value: [b.errors[arm] for b in buckets] for arm in Arm},
        "p50": {arm.value: [finite_or_none(quantile(b.latencies[arm], 0.5)) for b in buckets] for arm in Arm},
        "p95": {arm.value: [finite_or_none(quantile(b.latencies[arm], 0.95)) for b in buckets] for arm in Arm},
        "agreement": [finite_or_none(mean(b.agreement)) for b in buckets],
        "kl": [finite_or_none(mean(b.kl)) for b in buckets],
    }
    now = time.time() if now is None else now
    # the share as steps at the exact times it changed, drawn on to now
    steps = list(monitor.shares) + ([(now, monitor.shares[-1][1])] if monitor.shares else [])
    series["share_t"] = [t * 1000 for t, _ in steps]
    series["share_steps"] = [share for _, share in steps]
    return {"now": now * 1000, "state": rollout.snapshot(),
            "thresholds": rollout.policy.to_dict()["thresholds"],
            "arms": {arm.value: monitor.arms[arm].summary() for arm in Arm},
            "shadow": monitor.shadow_summary(), "series": series,
            "markers": [{**m, "t": m["t"] * 1000} for m in monitor.markers]}


@functools.cache
def plotly_js() -> bytes:
    """The plotly.js bundle shipped inside the ``plotly`` Python package."""
    from plotly.offline import get_plotlyjs  # noqa: PLC0415

    return get_plotlyjs().encode()


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>autocompress serve</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
#status { font-size: 1.05em; margin-bottom: 1em; }
.badge { padding: .15em .5em; border-radius: .3em; color: white; background: #555; }
.badge.ramping { background: #2a7; } .badge.complete { background: #27a; } .badge.paused { background: #a82; }
.badge.failed_over, .badge.rolled_back { background: #c33; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: .25em .8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.plot { height: 300px; }
</style>
<script src="/static/plotly.min.js"></script>
</head><body>
<h1>autocompress serve: canary rollout</h1>
<section id="state"><div id="status">loading&hellip;</div></section>
<section id="arms">
<table id="arm-table"><thead><tr><th></th><th>original</th><th>candidate</th></tr></thead><tbody></tbody></table>
<table id="shadow-table"><thead><tr><th>shadow (candidate scored by the original)</th><th>value</th></tr></thead>
<tbody></tbody></table>
</section>
<section id="charts" class="grid">
<div class="plot" id="fig-share"></div>
<div class="plot" id="fig-latency"></div>
<div class="plot" id="fig-rate"></div>
<div class="plot" id="fig-shadow"></div>
</section>
<script>
"use strict";
var ROWS = [["requests", "requests", 0], ["errors", "errors", 0], ["retried here", "retried", 0],
            ["aborted by failover", "aborted", 0], ["latency p50 (ms)", "latency_p50", 1000],
            ["latency p95 (ms)", "latency_p95", 1000], ["latency p99 (ms)", "latency_p99", 1000],
            ["TTFT p50 (ms)", "ttft_p50", 1000], ["TTFT p95 (ms)", "ttft_p95", 1000],
            ["tokens/s", "tokens_per_s", 1]];
var COLORS = {original: "#1f77b4", candidate: "#ff7f0e"};
var MARK = {promote: "#2a7", failover: "#c33", rollback: "#c60", pause: "#888", start: "#999"};

function fmt(value, scale) {
  if (value === null || value === undefined) return "\\u2013";
  if (!scale) return String(value);
  return (value * scale).toFixed(scale === 1 ? 1 : 0);
}
function fill(body, rows) {
  body.textContent = "";
  rows.forEach(function (cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) { var td = document.createElement("td"); td.textContent = c; tr.appendChild(td); });
    body.appendChild(tr);
  });
}
function shapes(markers) {
  return markers.filter(function (m) { return m.kind !== "start"; }).map(function (m) {
    return {type: "line", xref: "x", yref: "paper", x0: m.t, x1: m.t, y0: 0, y1: 1,
            line: {color: MARK[m.kind] || "#888", dash: m.kind === "failover" ? "solid" : "dot", width: 2}};
  });
}
function layout(title, ytitle, markers, extra) {
  var l = {title: {text: title, font: {size: 14}}, margin: {l: 50, r: 10, t: 35, b: 35},
           xaxis: {type: "date"}, yaxis: {title: {text: ytitle}, rangemode: "tozero"},
           shapes: shapes(markers), legend: {orientation: "h"}};
  for (var k in extra) l[k] = extra[k];
  return l;
}
function render(d) {
  var s = d.state;
  var status = document.getElementById("status");
  status.textContent = "";
  var badge = document.createElement("span");
  badge.className = "badge " + s.status; badge.textContent = s.status.replace("_", " ");
  status.appendChild(badge);
  status.appendChild(document.createTextNode(" stage " + s.stage + " of " + (s.stages.length - 1) +
      " (stages " + s.stages.join(" \\u2192 ") + "%), canary share " + s.share + "%, " + s.stage_requests +
      " candidate requests and " + s.stage_shadow + " shadow scores in this stage" +
      (s.reason ? "; " + s.reason : "")));
  fill(document.querySelector("#arm-table tbody"), ROWS.map(function (r) {
    return [r[0], fmt(d.arms.original[r[1]], r[2]), fmt(d.arms.candidate[r[1]], r[2])];
  }));
  var t = d.thresholds;
  fill(document.querySelector("#shadow-table tbody"), [
    ["scores (dropped)", d.shadow.scores + " (" + d.shadow.dropped + ")"],
    ["top-1 agreement (floor " + t.agreement + ")", d.shadow.agreement === null ? "\\u2013" : d.shadow.agreement.toFixed(3)],
    ["KL, nats (ceiling " + t.kl + ")", d.shadow.kl === null ? "\\u2013" : d.shadow.kl.toFixed(4)],
    ["log-prob of candidate tokens", d.shadow.logprob === null ? "\\u2013" : d.shadow.logprob.toFixed(3)]]);
  var x = d.series.t, m = d.markers, config = {displayModeBar: false, staticPlot: false};
  var notes = m.filter(function (k) { return k.kind !== "start"; }).map(function (k) {
    return {x: k.t, y: k.share, text: k.kind, hovertext: k.text, showarrow: true, arrowhead: 2,
            font: {color: MARK[k.kind] || "#888"}};
  });
  Plotly.react("fig-share", [{x: d.series.share_t, y: d.series.share_steps, type: "scatter", mode: "lines",
                              line: {shape: "hv"},
                              name: "canary share %"}],
               layout("canary share (%)", "%", m, {annotations: notes, yaxis: {range: [0, 105]}}), config);
  var arms = ["original", "candidate"];
  Plotly.react("fig-latency", arms.map(function (a) {
    return {x: x, y: d.series.p95[a], type: "scatter", mode: "lines+markers", name: a + " p95",
            line: {color: COLORS[a]}};
  }).concat(arms.map(function (a) {
    return {x: x, y: d.series.p50[a], type: "scatter", mode: "lines", name: a + " p50",
            line: {color: COLORS[a], dash: "dot"}};
  })), layout("latency (s)", "s", m, {}), config);
  Plotly.react("fig-rate", arms.map(function (a) {
    return {x: x, y: d.series.rate[a], type: "bar", name: a, marker: {color: COLORS[a]}};
  }).concat(arms.map(function (a) {
    return {x: x, y: d.series.errors[a], type: "scatter", mode: "markers", name: a + " errors",
            marker: {color: COLORS[a], symbol: "x", size: 9}};
  })), layout("requests/s and errors", "", m, {barmode: "group"}), config);
  Plotly.react("fig-shadow", [
    {x: x, y: d.series.agreement, type: "scatter", mode: "lines+markers", name: "agreement"},
    {x: x, y: d.series.kl, type: "scatter", mode: "lines+markers", name: "KL", yaxis: "y2"}],
    layout("shadow quality", "agreement", m, {yaxis: {title: {text: "agreement"}, range: [0, 1.05]},
           yaxis2: {title: {text: "KL (nats)"}, overlaying: "y", side: "right", rangemode: "tozero"}}), config);
}
function refresh() {
  fetch("/dashboard.json", {cache: "no-store"}).then(function (r) { return r.json(); }).then(render)
    .catch(function (e) { document.getElementById("status").textContent = "server unreachable: " + e; });
}
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""
