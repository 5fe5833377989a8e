"""Plotly figures of the report, drawn from the plain data of :mod:`autocompress.report.data`.

Every text placed in a figure that came from a model, a file or a user goes through
:func:`label` (HTML-escaped: plotly renders a small HTML subset in text, so a unit named
``<b>`` must show as ``<b>``, not turn bold). Figures use one small template with the
system font, so nothing is fetched and the embedded JSON stays small.
"""
from __future__ import annotations

import html
import math
import warnings

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .data import (MIB, HistoryInfo, ParetoInfo, PredictionInfo, RoleCurveInfo, ScheduleInfo,
                   SensitivityInfo, StagedInfo, TrialPoint)

COLORS = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00",
          "#b82e2e", "#316395"]

TEMPLATE = go.layout.Template(layout=dict(
    font=dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", size=12,
              color="#222"),
    paper_bgcolor="white", plot_bgcolor="#fbfbfd", colorway=COLORS,
    margin=dict(l=60, r=20, t=40, b=50), hoverlabel=dict(font_size=12),
    xaxis=dict(gridcolor="#e6e6ee", zerolinecolor="#ccc", automargin=True),
    yaxis=dict(gridcolor="#e6e6ee", zerolinecolor="#ccc", automargin=True),
    legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
))


def label(text: object) -> str:
    """``text`` made safe to show in a plotly string (its HTML subset is escaped)."""
    return html.escape(str(text), quote=False)


def styled(fig: go.Figure, height: int = 420) -> go.Figure:
    """Apply the report's template and height (also to Optuna's figures)."""
    fig.update_layout(template=TEMPLATE, height=height)
    return fig


def value_axis(values) -> dict:
    """Axis settings for positive values: log with one labelled tick per decade when they span
    more than a decade, linear otherwise (a log axis over a narrow range labels every minor tick)."""
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 10:
        return dict(type="log", dtick=1, exponentformat="power")
    return dict(type="linear", exponentformat="none", tickformat=".3~g")


def sensitivity_figure(info: SensitivityInfo) -> go.Figure:
    """Heatmap unit x choice of KL on a log colour scale (plotly has none: log10 is plotted, KL is hovered)."""
    positive = [v for row in info.kl for v in row if v is not None and v > 0]
    floor = min(positive) if positive else 1e-6
    z = [[math.log10(max(v, floor)) if v is not None else None for v in row] for row in info.kl]
    text = [[("not measured" if v is None else f"{v:.3g}") for v in row] for row in info.kl]
    low = math.floor(min((v for row in z for v in row if v is not None), default=-6))
    high = math.ceil(max((v for row in z for v in row if v is not None), default=0))
    ticks = list(range(low, high + 1))
    fig = go.Figure(go.Heatmap(
        z=z, x=[label(x) for x in info.labels], y=[label(u) for u in info.units], text=text,
        colorscale="Viridis", hoverongaps=False,
        hovertemplate="%{y}<br>%{x}<br>KL %{text}<extra></extra>",
        colorbar=dict(title=dict(text="KL"), tickvals=ticks, ticktext=[f"{10.0 ** t:g}" for t in ticks]),
    ))
    fig.update_yaxes(autorange="reversed", title_text="unit")
    fig.update_xaxes(title_text="probe choice", side="top")
    return styled(fig, height=max(360, 60 + 16 * len(info.units)))


def role_curve_figure(info: RoleCurveInfo) -> go.Figure:
    """One line per linguistic probe task: selectivity across depth (layer 0 = embeddings)."""
    fig = go.Figure()
    for task, values in info.curves.items():
        fig.add_trace(go.Scatter(x=info.layers[: len(values)], y=values, mode="lines+markers", name=label(task),
                                 hovertemplate=f"{label(task)}<br>layer %{{x}}<br>selectivity %{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(title_text="layer (0 = embeddings, i = output of block i-1)")
    fig.update_yaxes(title_text="probe selectivity")
    return styled(fig, height=400)


def schedule_figure(info: ScheduleInfo) -> go.Figure:
    """Bits, pruning ratios and the unit's sensitivity, one column of bars per unit, sharing the unit axis."""
    x = [label(u) for u in info.units]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.34, 0.33, 0.33],
                        subplot_titles=("bits (0 = block dropped)", "pruning ratios",
                                        "KL of the unit alone (from the profile)"))
    fig.add_trace(go.Bar(x=x, y=info.bits, name="bits", marker_color=COLORS[0],
                         text=[label(t) for t in info.labels],
                         hovertemplate="%{x}<br>%{text}<extra></extra>", textposition="none"), row=1, col=1)
    for name, values, color in (("sparsity", info.sparsity, COLORS[1]), ("heads removed", info.head_ratio, COLORS[2]),
                                ("channels removed", info.channel_ratio, COLORS[3]),
                                ("dropped", [1.0 if d else 0.0 for d in info.drop], "#555")):
        if any(values):
            fig.add_trace(go.Bar(x=x, y=values, name=name, marker_color=color,
                                 hovertemplate=f"%{{x}}<br>{name} %{{y:.2f}}<extra></extra>"), row=2, col=1)
    for name, values, color in (("KL of the chosen choice", info.chosen_kl, COLORS[4]),
                                ("largest KL of any probe choice", info.worst_kl, "#aaa")):
        if any(v is not None for v in values):
            fig.add_trace(go.Scatter(x=x, y=[v if v and v > 0 else None for v in values], name=name,
                                     mode="markers+lines", marker_color=color, line=dict(width=1),
                                     hovertemplate=f"%{{x}}<br>{name} %{{y:.3g}}<extra></extra>"), row=3, col=1)
    fig.update_yaxes(**value_axis(info.chosen_kl + info.worst_kl), row=3, col=1)
    fig.update_yaxes(range=[0, 1], row=2, col=1)
    fig.update_layout(barmode="group")
    fig.update_xaxes(tickangle=-60, row=3, col=1)
    styled(fig, height=680)
    fig.update_layout(margin=dict(t=90), legend=dict(y=1.06))
    return fig


def _hover(point: TrialPoint) -> str:
    parts = [f"trial {point.number}" if point.number is not None else label(point.source),
             f"source {label(point.source)}",
             f"memory {point.memory / MIB:.2f} MiB" if point.memory is not None else "memory -"]
    if point.latency is not None:
        parts.append(f"latency {point.latency:.3g} ms")
    for name in ("predicted", "corrected", "measured"):
        if getattr(point, name) is not None:
            parts.append(f"{name} KL {getattr(point, name):.4g}")
    if point.measured_ppl is not None:
        parts.append(f"perplexity {point.measured_ppl:.4g}")
    if point.state != "COMPLETE":
        parts.append(label(point.state.lower()))
    if not point.feasible:
        parts.append("over budget")
    return "<br>".join(parts)


def pareto_figure(info: ParetoInfo) -> go.Figure:
    """Memory vs quality loss: trials by source, baselines labelled, the front as a step line, the chosen point starred."""
    fig = go.Figure()
    baseline_numbers = {p.number for p in info.baselines if p.number is not None}
    usable = [p for p in info.trials if p.memory is not None and p.quality is not None
              and p.number not in baseline_numbers]  # baselines are drawn once, as labelled diamonds
    for index, source in enumerate(sorted({p.source for p in usable})):
        points = [p for p in usable if p.source == source]
        fig.add_trace(go.Scatter(
            x=[p.memory / MIB for p in points], y=[p.quality for p in points], mode="markers", name=label(source),
            marker=dict(color=COLORS[index % len(COLORS)], size=7,
                        symbol=["circle" if p.feasible else "circle-open" for p in points], opacity=0.75),
            text=[_hover(p) for p in points], hovertemplate="%{text}<extra></extra>"))
    symbols = ["diamond", "square", "triangle-up", "cross", "x", "pentagon", "hexagon", "star-triangle-up"]
    baselines = [p for p in info.baselines if p.memory is not None and p.quality is not None]
    for index, point in enumerate(baselines):
        fig.add_trace(go.Scatter(
            x=[point.memory / MIB], y=[point.quality], mode="markers", name=label(point.source),
            marker=dict(symbol=symbols[index % len(symbols)], size=11, color=COLORS[(index + 3) % len(COLORS)],
                        line=dict(color="#222", width=1)),
            text=[_hover(point)], hovertemplate="%{text}<extra></extra>"))
    if info.front:
        fig.add_trace(go.Scatter(x=[p.memory / MIB for p in info.front], y=[p.quality for p in info.front],
                                 mode="lines", line=dict(shape="hv", color="#888", dash="dot"),
                                 name="Pareto front", hoverinfo="skip"))
    marked = [p for p in info.search_pareto if p.memory is not None and p.quality is not None]
    if marked:
        fig.add_trace(go.Scatter(x=[p.memory / MIB for p in marked], y=[p.quality for p in marked], mode="markers",
                                 name="search's Pareto set", hoverinfo="skip",
                                 marker=dict(symbol="circle-open", size=13, color="#222", line=dict(width=1.5))))
    if info.best and info.best.memory is not None and info.best.quality is not None:
        fig.add_trace(go.Scatter(x=[info.best.memory / MIB], y=[info.best.quality], mode="markers",
                                 name="chosen", marker=dict(symbol="star", size=18, color="#f5b400",
                                                            line=dict(color="#222", width=1)),
                                 text=[_hover(info.best)], hovertemplate="%{text}<extra></extra>"))
    if info.budget_memory:
        fig.add_vline(x=info.budget_memory / MIB, line=dict(color="#dc3912", dash="dash"),
                      annotation_text="memory budget", annotation_position="bottom left")
    fig.update_xaxes(title_text="memory (MiB)")
    fig.update_yaxes(title_text=label(info.metric) + " (lower is better)",
                     **value_axis([p.quality for p in info.trials + info.baselines]))
    return styled(fig, height=460)


def history_figure(info: HistoryInfo, metric: str) -> go.Figure:
    """Quality per trial and the best so far (drawn from search.json when the study is unavailable)."""
    fig = go.Figure()
    for index, source in enumerate(sorted(set(info.sources))):
        keep = [i for i, s in enumerate(info.sources) if s == source]
        fig.add_trace(go.Scatter(x=[info.numbers[i] for i in keep], y=[info.values[i] for i in keep],
                                 mode="markers", name=label(source), marker_color=COLORS[index % len(COLORS)]))
    fig.add_trace(go.Scatter(x=info.numbers, y=info.best_so_far, mode="lines", name="best feasible so far",
                             line=dict(color="#222", shape="hv")))
    fig.update_xaxes(title_text="trial")
    fig.update_yaxes(title_text=label(metric), **value_axis(info.values))
    return styled(fig, height=400)


def prediction_figure(info: PredictionInfo, metric: str) -> go.Figure:
    """Measured against predicted KL of the trials measured for real: the additive prediction and,
    where fitted, its learned correction, with the line measured = predicted."""
    fig = go.Figure()
    for name, attr, symbol, color in (("additive prediction", "predicted", "circle", COLORS[0]),
                                      ("corrected prediction", "corrected", "triangle-up", COLORS[1])):
        points = [p for p in info.points if getattr(p, attr) is not None]
        if points:
            fig.add_trace(go.Scatter(x=[getattr(p, attr) for p in points], y=[p.measured for p in points],
                                     mode="markers", name=name, marker=dict(size=8, color=color, symbol=symbol),
                                     text=[_hover(p) for p in points], hovertemplate="%{text}<extra></extra>"))
    values = [v for p in info.points for v in (p.predicted, p.corrected, p.measured) if v and v > 0]
    if values:
        low, high = min(values), max(values)
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="measured = predicted",
                                 line=dict(color="#888", dash="dash"), hoverinfo="skip"))
    axis = value_axis(values)
    fig.update_xaxes(title_text=f"predicted {label(metric)}", **axis)
    fig.update_yaxes(title_text=f"measured {label(metric)}", **axis)
    return styled(fig, height=420)


GATE_COLORS = {"passed": COLORS[3], "passed after recovery": COLORS[2], "rolled back": COLORS[1]}


def staged_figure(info: StagedInfo) -> go.Figure:
    """Validation perplexity per step (before, after compressing, after recovery) over the size kept."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.6, 0.4],
                        subplot_titles=("validation perplexity", "size after the step (MiB)"))
    x = [step.index for step in info.steps]
    for name, values, dash in (
            ("before the step", [s.before["perplexity"] for s in info.steps], "dot"),
            ("after compressing", [s.after["perplexity"] for s in info.steps], "solid"),
            ("after recovery", [s.recovered["perplexity"] if s.recovered else None for s in info.steps], "dash")):
        if any(v is not None for v in values):
            fig.add_trace(go.Scatter(x=x, y=values, name=name, mode="lines+markers", line=dict(dash=dash),
                                     hovertemplate=f"step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"), row=1, col=1)
    if info.original.get("perplexity") is not None:
        fig.add_hline(y=info.original["perplexity"], line=dict(color="#888", dash="dot"), row=1, col=1,
                      annotation_text="original", annotation_position="bottom right")
    fig.add_trace(go.Bar(x=x, y=[(s.bytes_after or 0) / MIB for s in info.steps], name="size after",
                         marker_color=[GATE_COLORS.get(s.gate, "#888") for s in info.steps],
                         text=[label(s.gate) for s in info.steps], showlegend=False,
                         hovertemplate="step %{x}<br>%{y:.1f} MiB<br>%{text}<extra></extra>", textposition="none"),
                  row=2, col=1)
    fig.update_xaxes(title_text="step (bar colour: green passed, orange passed after recovery, red rolled back)",
                     dtick=1, row=2, col=1)
    return styled(fig, height=520)


def _escaped_copy(study):
    """An in-memory copy of ``study``'s finished trials with every parameter name passed through :func:`label`.

    Parameter names are unit names, from the model; Optuna writes them into its figures' text
    and hover boxes as they are, where plotly would render their markup.
    """
    import optuna  # noqa: PLC0415

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials([optuna.trial.create_trial(
        state=t.state, values=t.values if t.state == optuna.trial.TrialState.COMPLETE else None,
        params={label(name): value for name, value in t.params.items()},
        distributions={label(name): d for name, d in t.distributions.items()})
        for t in study.get_trials(deepcopy=False, states=finished)])
    return copy


def optuna_figures(storage: str, study_name: str) -> dict[str, go.Figure | str]:
    """Optuna's optimisation history and parameter importances of the stored study.

    Each value is a figure, or the one-line reason it could not be drawn (the study cannot be
    opened, too few completed trials...), which the page shows in its place. A multi-objective
    study plots its first objective.
    """
    import optuna  # noqa: PLC0415
    from optuna.storages import JournalStorage  # noqa: PLC0415
    from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415
    from optuna.visualization import plot_optimization_history, plot_param_importances  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        opened = storage if "://" in storage else JournalStorage(JournalFileBackend(storage))
        study = _escaped_copy(optuna.load_study(study_name=study_name, storage=opened))
        kwargs = {}
        if len(study.directions) > 1:
            kwargs = dict(target=lambda t: t.values[0], target_name="objective 0")
        params = max((len(t.params) for t in study.get_trials(deepcopy=False)), default=0)
    except Exception as exc:  # noqa: BLE001 (any storage or study problem: shown as the reason)
        reason = f"the Optuna study {study_name!r} could not be opened from {storage}: {type(exc).__name__}: {exc}"
        return {"history": reason, "importances": reason}
    figures: dict[str, go.Figure | str] = {}
    for name, plot, height in (("history", plot_optimization_history, 420),
                               ("importances", plot_param_importances, max(320, 90 + 16 * min(params, 40)))):
        try:
            with warnings.catch_warnings():  # our targets are minimised, which is what PED-ANOVA assumes
                warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
                figures[name] = styled(plot(study, **kwargs), height=height).update_layout(title=None)
        except Exception as exc:  # noqa: BLE001 (e.g. importances need two completed trials)
            figures[name] = f"Optuna could not draw it: {type(exc).__name__}: {exc}"
    return figures


def frontier_figure(info) -> go.Figure:
    """Size against perplexity of every frontier row (one colour per family), this run as a star."""
    fig = go.Figure()
    families: dict[str, list] = {}
    for point in info.points:
        families.setdefault(point.family + (" (grid-aligned, not compared)" if point.aligned else ""), []).append(point)
    for family, points in sorted(families.items()):
        points = sorted(points, key=lambda p: p.bytes)
        fig.add_trace(go.Scatter(x=[p.bytes / MIB for p in points], y=[p.perplexity for p in points],
                                 mode="lines+markers" if family == "searched" else "markers",
                                 name=label(family), text=[label(p.name) for p in points],
                                 hovertemplate="%{text}<br>%{x:.1f} MiB<br>perplexity %{y:.3f}<extra></extra>"))
    if info.own is not None:
        fig.add_trace(go.Scatter(x=[info.own.bytes / MIB], y=[info.own.perplexity], mode="markers", name="this run",
                                 marker=dict(symbol="star", size=16, color="black"),
                                 hovertemplate="this run<br>%{x:.1f} MiB<br>perplexity %{y:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="size as stored (MiB, every byte counted)", yaxis_title="perplexity",
                      yaxis=value_axis([p.perplexity for p in info.points]))
    return styled(fig)


CHANGE_STYLE = {"promote": ("triangle-up", "#109618"), "failover": ("x", "#dc3912"),
                "rollback": ("triangle-down", "#990099"), "pause": ("square", "#ff9900")}


def rollout_figure(info) -> go.Figure:
    """The candidate's share as steps over time, every promotion, failover, rollback and pause marked."""
    fig = go.Figure(go.Scatter(x=info.share_t, y=info.share, mode="lines", line_shape="hv", name="canary share",
                               hovertemplate="%{x:.1f} s<br>share %{y:g}%<extra></extra>"))
    for kind, (symbol, color) in CHANGE_STYLE.items():
        changes = [c for c in info.changes if c.kind == kind]
        if changes:
            fig.add_trace(go.Scatter(
                x=[c.t for c in changes], y=[c.share for c in changes], mode="markers", name=kind,
                marker=dict(symbol=symbol, size=12, color=color), text=[label(c.reason) for c in changes],
                hovertemplate=f"{kind}<br>%{{x:.1f}} s<br>share after %{{y:g}}%<br>%{{text}}<extra></extra>"))
    fig.update_layout(xaxis_title="seconds since the log began", yaxis_title="share of traffic to the candidate (%)",
                      yaxis=dict(range=[-3, 103]))
    return styled(fig, height=360)
