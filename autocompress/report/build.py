"""``write_report``: read a run directory, draw what it holds, write one self-contained HTML file."""
from __future__ import annotations

import datetime
from pathlib import Path

from ..artifacts import atomic_write_bytes
from . import data, figures
from .html import Section, esc, figure_html, missing_html, render_page, table_html

HINTS = {
    "profile.json": "run `autocompress profile MODEL --out RUN`",
    "search.json": "run `autocompress search RUN --budget ...`",
    "schedule.json": "run `autocompress search RUN --budget ...`",
    "eval.json": "run `autocompress eval RUN/model --reference MODEL --out RUN/eval.json`",
    "eval_original.json": "run `autocompress eval MODEL --out RUN/eval_original.json`",
}


def _absent(run: data.Run, name: str) -> str:
    reason = run.missing.get(name, f"no {name}")
    hint = HINTS.get(name)
    return f"{reason} ({hint})" if hint and reason.startswith("no ") else reason


def _summary(run: data.Run) -> Section:
    body = table_html(None, data.summary_rows(run), align=False)
    if run.search:
        rows = data.baseline_rows(run.search)
        if rows:
            body += "<h3>Chosen schedule against the baselines (held-aside calibration slice)</h3>" + table_html(
                ["schedule", "memory", "latency", "predicted KL", "measured KL", "measured perplexity"], rows)
        if run.search.notes:
            body += "<h3>Notes of the search</h3><ul>" + "".join(
                f"<li>{esc(note)}</li>" for note in run.search.notes) + "</ul>"
    return Section("summary", "Summary",
                   "What was compressed, under which budget, what it achieved, and how its quality compares with "
                   "the original model and with the baselines every search starts from (uniform choices that fit "
                   "the budget, and the exact knapsack allocation under the additive sensitivity model).", body)


def _sensitivity(run: data.Run) -> Section:
    section = Section("sensitivity", "Sensitivity per unit and choice",
                      "KL of the model's next-token distribution from the original's when only this unit is "
                      "changed to this choice, measured on calibration tokens. Colour is on a log scale: each "
                      "step of the scale is ten times more damage. Bright rows are the units to spare.")
    if run.profile is None:
        section.missing = _absent(run, "profile.json")
    elif not run.profile.units:
        section.missing = "the profile has no units"
    else:
        section.body = figure_html(figures.sensitivity_figure(data.sensitivity_info(run.profile)), "fig-sensitivity")
        additivity, (proxy_header, proxies) = data.additivity_rows(run.profile), data.proxy_table(run.profile)
        if additivity:
            section.body += ("<h3>Additivity: every unit at once against the sum of single units</h3>"
                             + table_html(["choice", "sum of single-unit KLs", "measured KL", "measured / sum"],
                                          additivity))
        if proxies:
            section.body += ("<h3>Cheap proxies against measured KL (Spearman rank correlation over units)</h3>"
                             + table_html(proxy_header, proxies))
    return section


def _roles(run: data.Run) -> Section:
    section = Section("roles", "Linguistic roles across depth",
                      "How well a linear probe on each layer's hidden states solves each task (lexical identity, "
                      "morphology, word class, nesting depth, next-token prediction), above a control baseline. "
                      "Where a task peaks tells which blocks carry it, and what compressing them risks.")
    if run.profile is None:
        section.missing = _absent(run, "profile.json")
        return section
    info = data.role_curve_info(run.profile)
    if not info.curves:
        section.missing = "the profile has no linguistic-role measurements"
        return section
    section.body = figure_html(figures.role_curve_figure(info), "fig-roles")
    if info.dominant:
        section.body += "<h3>Blocks by dominant task</h3>" + table_html(
            ["dominant task", "blocks"], data.dominant_groups(info), align=False)
    return section


def _schedule(run: data.Run) -> Section:
    section = Section("schedule", "Chosen schedule",
                      "Per unit: bits of the quantized weights, share of weights, heads or channels pruned, and "
                      "beside them the unit's sensitivity from the profile: the KL its chosen choice costs alone, "
                      "and the largest KL any probe choice caused. Sensitive units should get more bits.")
    if run.schedule is None:
        section.missing = _absent(run, "schedule.json")
    elif not run.schedule.units:
        section.missing = "the schedule keeps every unit as it is"
    else:
        info = data.schedule_info(run.schedule, run.profile)
        section.body = figure_html(figures.schedule_figure(info), "fig-schedule")
        if run.profile is None:
            section.body += missing_html("sensitivity: " + _absent(run, "profile.json"))
    return section


def _pareto(run: data.Run) -> Section:
    section = Section("pareto", "Pareto front: memory against quality",
                      "Every trial of the search (hollow: over budget) and every baseline, by stored memory and "
                      "quality loss (measured where the trial was evaluated for real, predicted otherwise). The "
                      "dotted step line is the front no point beats on both axes; the star is the chosen schedule.")
    if run.search is None:
        section.missing = _absent(run, "search.json")
        return section
    info = data.pareto_info(run.search)
    if not info.front:
        section.missing = "search.json has no trial with both memory and quality"
    else:
        section.body = figure_html(figures.pareto_figure(info), "fig-pareto")
    return section


def _optuna_sections(run: data.Run) -> list[Section]:
    history = Section("history", "Optimization history",
                      "The objective of each trial in order, and the best value so far: where the curve flattens, "
                      "more trials stop paying.")
    importances = Section("importances", "Parameter importances",
                          "Which units' choices matter most for reaching a good objective across the trials "
                          "(Optuna's default importance evaluator, PED-ANOVA in Optuna 5): the units where the "
                          "choice matters.")
    if run.search is None:
        history.missing = importances.missing = _absent(run, "search.json")
        return [history, importances]
    location = data.study_location(run.search, run.run_dir, run.storage)
    drawn = (figures.optuna_figures(*location) if isinstance(location, tuple)
             else {key: location for key in ("history", "importances")})
    metric = data.METRIC
    if isinstance(drawn["history"], str):
        info = data.history_info(run.search)
        if info.numbers:
            history.body = (missing_html(drawn["history"] + "; drawn from search.json instead")
                            + figure_html(figures.history_figure(info, metric), "fig-history"))
        else:
            history.missing = drawn["history"]
    else:
        history.body = figure_html(drawn["history"], "fig-history")
    if isinstance(drawn["importances"], str):
        importances.missing = drawn["importances"]
    else:
        importances.body = figure_html(drawn["importances"], "fig-importances")
    return [history, importances]


def _prediction(run: data.Run) -> Section:
    section = Section("prediction", "Predicted against measured quality",
                      "The search ranks candidates with a cheap predictor (additive sensitivity plus a learned "
                      "correction) and measures the promising ones for real. Points on the dashed line were "
                      "predicted exactly; above it the predictor was optimistic.")
    if run.search is None:
        section.missing = _absent(run, "search.json")
        return section
    info = data.prediction_info(run.search)
    if not info.points:
        section.missing = "no trial of search.json was measured for real"
        return section
    section.explanation += (f" Here: {len(info.points)} trials measured; Spearman rank correlation with the "
                            f"measurement {data.format_number(info.spearman_additive, 3)} for the additive "
                            f"prediction and {data.format_number(info.spearman_corrected, 3)} for the corrected "
                            f"one; median measured/additive {data.format_number(info.median_ratio, 3)}.")
    correction = run.search.correction or {}
    if correction:
        section.explanation += " Correction: " + ", ".join(
            f"{key.replace('_', ' ')} {data.format_number(value, 3) if isinstance(value, float) else value}"
            for key, value in correction.items()) + "."
    section.body = figure_html(figures.prediction_figure(info, data.METRIC), "fig-prediction")
    return section


def _evaluation(run: data.Run) -> Section:
    section = Section("evaluation", "Evaluation",
                      "Held-out evaluation of the compressed model (eval.json) beside the same evaluation of the "
                      "original (eval_original.json): perplexity over non-overlapping windows, KL and top-1 "
                      "agreement to the original, size as stored and speed on the machine that ran it.")
    header, rows = data.eval_rows(run)
    if not rows:
        section.missing = _absent(run, "eval.json")
    else:
        section.body = table_html(header, rows)
        for name in ("eval.json", "eval_original.json"):
            if name in run.missing:
                section.body += missing_html(_absent(run, name))
    return section


def _frontier(run: data.Run) -> Section:
    from .frontier_info import frontier_info, prediction_gap_rows, read_frontier  # noqa: PLC0415

    section = Section("frontier", "Quality per byte: this model against the recipes of its size",
                      "Every byte counted, embeddings included: perplexity against size of the recipes a user "
                      "would otherwise pick (uniform RTN, GPTQ and HQQ; llama.cpp's legacy types), measured by "
                      "bench/frontier.py on the same evaluation tokens, and this run's model as a star. Rows "
                      "marked grid-aligned reproduce the demo model's own Q4_1 grid (groups of 32) and flatter it.")
    info = frontier_info(read_frontier(run.run_dir), run.evaluation)
    gap = prediction_gap_rows(run.schedule.meta if run.schedule else {}, run.evaluation)
    if info is None or not (info.points or info.own):
        section.missing = "no frontier.json (run bench/frontier.py) and no eval.json"
    else:
        if not info.points:
            section.body += missing_html("no frontier.json in this run: run bench/frontier.py to measure the "
                                         "recipes beside it")
        section.body += figure_html(figures.frontier_figure(info), "fig-frontier")
    if gap:
        section.body += ("<h3>Predicted against final quality</h3>"
                         + table_html(["KL to the original", "value"], gap, align=False))
    return section


def _staged(run: data.Run) -> Section | None:
    if run.staged is None:
        return None
    section = Section("staged", "Staged compression history",
                      "Compression applied in steps, most robust units first: after each step the quality was "
                      "checked against the gates, recovered by distillation when a gate failed, and the step "
                      "rolled back when recovery could not pass it.")
    info = data.staged_info(run.staged)
    if not info.steps:
        section.missing = "staged.json has no steps yet"
        return section
    original, final = info.original, info.final
    state = "complete" if info.complete else "not complete (interrupted or still running)"
    summary = [("original", f"perplexity {data.format_number(original['perplexity'])}, "
                            f"{data.format_bytes(original['bytes'])}"),
               ("state", f"{len(info.steps)} steps, {state}")]
    if final:
        summary.append(("final", f"perplexity {data.format_number(final['perplexity'])}, KL "
                                 f"{data.format_number(final['kl'])}, {data.format_bytes(final['bytes'])}"))
    if info.frozen:
        summary.append(("frozen after a failed gate", ", ".join(info.frozen)))
    section.body = (table_html(None, summary, align=False)
                    + figure_html(figures.staged_figure(info), "fig-staged")
                    + table_html(*data.staged_rows(info)))
    return section


def _rollout(run: data.Run) -> Section | None:
    from . import rollout_info as ri  # noqa: PLC0415

    path = ri.rollout_log(run.run_dir)
    if path is None:
        return None
    section = Section("rollout", "Canary rollout (autocompress serve)",
                      "The candidate served beside the original by `autocompress serve`, from its event log: the "
                      "share of traffic sent to the candidate over time, the monitors of each stage (a stage is a "
                      "stretch of constant share; latency, TTFT and tokens/s over its most recent 1000 requests "
                      "per arm), the shadow scores of the candidate's completions by the original, and every "
                      "promotion, failover, rollback and pause with its reason.")
    info = ri.rollout_info(path)
    section.body = "".join(missing_html(f"damaged event log: {problem}") for problem in info.problems[:20])
    if len(info.problems) > 20:
        section.body += missing_html(f"and {len(info.problems) - 20} more damaged lines")
    if not info.stages:
        section.missing = "the event log holds no usable event"
        return section
    section.body += (table_html(None, ri.summary_rows(info), align=False)
                     + figure_html(figures.rollout_figure(info), "fig-rollout")
                     + "<h3>Monitors per stage and arm</h3>" + table_html(ri.STAGE_HEADER, ri.stage_rows(info))
                     + "<h3>Shadow scores per stage (the candidate's completions scored by the original)</h3>"
                     + table_html(ri.SHADOW_HEADER, ri.shadow_rows(info)))
    changes = ri.change_rows(info)
    section.body += ("<h3>Promotions, failovers, rollbacks and pauses</h3>"
                     + (table_html(ri.CHANGE_HEADER, changes) if changes else "<p>None.</p>"))
    return section


def _artifacts(run: data.Run) -> Section:
    names = ["profile.json", "search.json", "schedule.json", "eval.json", "eval_original.json", "staged.json"]
    rows = [(name, "missing" if name in run.missing else "read", run.missing.get(name, "")) for name in names]
    return Section("artifacts", "Artifacts of this run", "The files this report was drawn from.",
                   table_html(["file", "status", "note"], rows))


def build_sections(run: data.Run) -> list[Section]:
    """Every section of the report, in page order (the staged history only when staged.json exists,
    the rollout only when ``RUN/serve/events.jsonl`` does)."""
    sections = [_summary(run), _sensitivity(run), _roles(run), _schedule(run), _pareto(run),
                *_optuna_sections(run), _prediction(run), _evaluation(run), _frontier(run), _staged(run),
                _rollout(run), _artifacts(run)]
    return [s for s in sections if s is not None]


def render_report(run: data.Run) -> str:
    """The report of ``run`` as one HTML string."""
    from plotly.offline import get_plotlyjs  # noqa: PLC0415

    rows = dict(data.summary_rows(run))
    model = rows.get("model", "-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return render_page(f"autocompress report: {model}", f"run {run.run_dir} · written {stamp}",
                       build_sections(run), get_plotlyjs(),
                       footer="Written by autocompress report. Self-contained: opens offline, fetches nothing.")


def write_report(run_dir: str | Path, out: str | Path | None = None, *, storage: str | None = None) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``run_dir/report.html``) atomically.

    Artifacts that are missing are named on the page in place of their sections; a path
    that is not a directory is a :class:`~autocompress.errors.UserError`.

    Example::

        write_report("runs/x")                 # runs/x/report.html
        write_report("runs/x", "reports/demo.html")
        write_report("runs/x", storage="postgresql://host/db")  # a study kept outside the run
    """
    run = data.load_run(run_dir)
    run.storage = storage
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_bytes(out, render_report(run).encode("utf-8"))
    return out
