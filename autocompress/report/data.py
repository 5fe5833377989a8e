"""What the report shows, as plain data: read a run directory and extract each section's numbers.

Nothing here draws. Like Optuna's ``visualization`` (an ``_get_*_info`` step returning plain
values, then a plotting step), every function returns small dataclasses or lists that
:mod:`autocompress.report.figures` turns into plotly figures, so the numbers are tested
without plotly or a browser. This module reads the run and extracts the summary, evaluation
and staged history; :mod:`.profile_info` and :mod:`.search_info` extract the profile's,
schedule's and search's sections, and are re-exported here so a caller needs one namespace.

Every artifact of a run is optional: :func:`load_run` keeps what exists and records, for each
missing or unreadable file, one line saying why, which the page shows in place of the section.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..profile.artifact import Profile
from ..schedule import Schedule
from ..search.result import SearchResult
from .formats import MIB, as_number, choice_label, format_bytes, format_number, get_field, natural_key
from .profile_info import (RoleCurveInfo, ScheduleInfo, SensitivityInfo, additivity_rows, dominant_groups,
                           proxy_table, role_curve_info, schedule_info, sensitivity_info)
from .search_info import (METRIC, HistoryInfo, ParetoInfo, PredictionInfo, TrialPoint, baseline_rows,
                          history_info, pareto_front, pareto_info, prediction_info, search_baselines, search_best,
                          search_trials, spearman, study_location, trial_point)

__all__ = ["METRIC", "MIB", "HistoryInfo", "ParetoInfo", "PredictionInfo", "RoleCurveInfo", "Run", "ScheduleInfo",
           "SensitivityInfo", "StagedInfo", "StagedStep", "TrialPoint", "additivity_rows", "as_number", "baseline_rows",
           "choice_label", "dominant_groups", "eval_rows", "format_bytes", "format_number", "get_field",
           "history_info", "load_run", "natural_key", "pareto_front", "pareto_info", "prediction_info",
           "proxy_table", "role_curve_info", "schedule_info", "search_baselines", "search_best", "search_trials",
           "sensitivity_info", "spearman", "staged_info", "staged_rows", "study_location", "summary_rows",
           "trial_point"]


@dataclass
class Run:
    """The artifacts found in one run directory; ``missing`` maps an artifact to why it is absent."""

    run_dir: Path
    profile: Profile | None = None
    search: SearchResult | None = None
    schedule: Schedule | None = None
    evaluation: dict[str, Any] | None = None  # eval.json of the compressed model
    original: dict[str, Any] | None = None  # eval_original.json: the same evaluation of the original
    staged: dict[str, Any] | None = None
    missing: dict[str, str] = field(default_factory=dict)
    storage: str | None = None  # the study's storage as the user named it (``report --storage``)


def _read_json_artifact(path: Path) -> dict[str, Any]:
    """The ``data`` of a versioned artifact (or the whole object of a plain JSON file)."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.name}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and set(raw) == {"type", "version", "data"}:
        raw = raw["data"]
    if not isinstance(raw, dict):
        raise UserError(f"{path.name}: expected a JSON object")
    return raw


def load_run(run_dir: str | Path) -> Run:
    """Read every artifact of ``run_dir`` that exists; a missing or broken one is noted, not fatal.

    A path that is not a directory is a :class:`UserError`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory; pass the --out directory of `autocompress profile`")
    run = Run(run_dir)
    readers = {
        "profile": ("profile.json", Profile.load),
        "search": ("search.json", SearchResult.load),
        "schedule": ("schedule.json", Schedule.load),
        "evaluation": ("eval.json", _read_json_artifact),
        "original": ("eval_original.json", _read_json_artifact),
        "staged": ("staged.json", _read_json_artifact),
    }
    for attr, (name, reader) in readers.items():
        path = run_dir / name
        if attr == "evaluation" and not path.exists() and (run_dir / "model" / "eval.json").exists():
            path = run_dir / "model" / "eval.json"  # where `autocompress eval RUN/model` writes it
        if not path.exists():
            run.missing[name] = f"no {name} in {run_dir}"
            continue
        try:
            setattr(run, attr, reader(path))
        except UserError as exc:
            run.missing[name] = f"{name} could not be read: {exc}"
    if run.profile and run.search and run.search.model_fingerprint != run.profile.model_fingerprint:
        run.missing["search.json"] = (f"search.json was made for another model ({run.search.model_fingerprint}) "
                                      f"than profile.json ({run.profile.model_fingerprint}); re-run "
                                      f"`autocompress search`")
        run.search = None
    return run

# --- summary and tables ----------------------------------------------------------------------

def _relative(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f" ({100 * (value / reference - 1):+.1f}% vs the original)"


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """The headline figures as (label, value) rows: model, data, budget, achieved memory and
    latency, quality against the original and the best baseline, from whichever artifacts exist."""
    rows: list[tuple[str, str]] = []
    profile, search, evaluation, original = run.profile, run.search, run.evaluation, run.original
    model = (profile.model if profile else None) or (search.model if search else None) \
        or get_field(original, "model") or get_field(evaluation, "model")
    rows.append(("model", str(model or "-")))
    if profile:
        rows.append(("profile data", f"{profile.data} ({profile.calibration_tokens:,} calibration tokens, "
                                     f"{profile.granularity} units, space {profile.space})"))
    if search:
        holdout = search.holdout or {}
        rows.append(("search", f"space {search.space}, objective {search.objective}, {len(search.trials)} trials, "
                               f"measured on {holdout.get('tokens', '?')} held-aside tokens of "
                               f"{holdout.get('data', '?')}"))
        rows.append(("budget", ", ".join(map(str, search.budget.get("specs") or [])) or "-"))
    if evaluation:
        rows.append(("evaluation data", f"{get_field(evaluation, 'data', default='-')} "
                                        f"({get_field(evaluation, 'tokens', default=0):,} tokens)"))
    best = search_best(search) if search else None
    original_figures = (search.budget.get("original") or {}) if search else {}
    memory = best.memory if best and best.memory is not None else as_number(get_field(evaluation, "size_bytes"))
    original_size = as_number(original_figures.get("memory_bytes")) or as_number(get_field(original, "size_bytes"))
    if memory is not None:
        rows.append(("achieved memory", format_bytes(memory) + (
            f" ({100 * memory / original_size:.1f}% of the original {format_bytes(original_size)})"
            if original_size else "")))
    if best and best.latency is not None:
        source = search.trial(best.number).latency_source or search.budget.get("latency_source") or "cost model"
        original_latency = as_number(original_figures.get("latency_ms"))
        rows.append(("achieved latency", f"{best.latency:.3g} ms per decode step ({source})"
                     + (f"; original {original_latency:.3g} ms" if original_latency else "")))
    if run.schedule:
        average = schedule_info(run.schedule, profile).average_bits
        if average is not None:
            rows.append(("average bits (kept units)", f"{average:.2f}"))
    if best is not None:
        ppl0 = as_number((search.original or {}).get("ppl"))
        rows.append(("search quality (held-aside)",
                     f"KL {format_number(best.measured)} measured, {format_number(best.predicted)} predicted; "
                     f"perplexity {format_number(best.measured_ppl)}" + _relative(best.measured_ppl, ppl0)
                     + (f", original {ppl0:.4g}" if ppl0 else "")))
        baselines = [b for b in search_baselines(search) if b.measured is not None]
        if baselines:
            top = min(baselines, key=lambda b: b.measured)
            verdict = "beats every baseline" if search.beat_baselines else "does not beat the best baseline"
            rows.append(("against the baselines", f"{verdict}; best baseline {top.source}: KL "
                                                  f"{format_number(top.measured)}, perplexity "
                                                  f"{format_number(top.measured_ppl)}"))
    ppl, ppl0 = as_number(get_field(evaluation, "perplexity")), as_number(get_field(original, "perplexity"))
    if ppl is not None:
        rows.append(("evaluation perplexity", f"{ppl:.4g}" + _relative(ppl, ppl0)
                     + (f"; original {ppl0:.4g}" if ppl0 is not None else "")))
    kl = as_number(get_field(evaluation, "kl"))
    if kl is not None:
        rows.append(("evaluation KL to the original", f"{kl:.4g} nats/token"))
    return rows


EVAL_FIELDS = (("perplexity", "perplexity", 4), ("loss", "loss (nats/token)", 4), ("kl", "KL to reference", 4),
               ("top1", "top-1 agreement", 4), ("size_bytes", "size as stored", 0),
               ("parameters", "parameters", 0), ("tokens_per_second", "prefill tokens/s", 0),
               ("decode_tokens_per_second", "decode tokens/s", 3), ("tokens", "tokens", 0),
               ("threads", "torch threads", 0))


def eval_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    """The evaluation table: header (metric, then one column per evaluated model) and rows."""
    columns = [(name, ev) for name, ev in (("original", run.original), ("compressed", run.evaluation)) if ev]
    header = ["metric"] + [f"{name}: {get_field(ev, 'model', default='-')}" for name, ev in columns]
    rows = []
    for key, label, digits in EVAL_FIELDS:
        values = [as_number(ev.get(key)) for _, ev in columns]
        if all(v is None for v in values):
            continue
        cells = []
        for value in values:
            if value is None:
                cells.append("-")
            elif key == "size_bytes":
                cells.append(format_bytes(value))
            elif key == "top1":
                cells.append(f"{100 * value:.2f}%")
            elif digits == 0:
                cells.append(f"{value:,.0f}")
            else:
                cells.append(format_number(value, digits))
        rows.append([label] + cells)
    return header, rows


@dataclass
class StagedStep:
    """One step of a staged compression: size and validation quality before, after, after recovery."""

    index: int
    units: list[str]
    bytes_before: float | None
    bytes_after: float | None
    before: dict[str, float | None]  # perplexity, loss, kl
    after: dict[str, float | None]
    recovered: dict[str, float | None] | None
    gate: str
    failures: list[str]
    seconds: float | None


@dataclass
class StagedInfo:
    """The history of ``staged.json``: the original's quality and size, the steps, the final state."""

    original: dict[str, float | None]
    steps: list[StagedStep]
    final: dict[str, float | None] | None
    complete: bool
    frozen: list[str]


def _quality(record: Any) -> dict[str, float | None]:
    record = record if isinstance(record, dict) else {}
    return {key: as_number(record.get(key)) for key in ("perplexity", "loss", "kl", "bytes", "parameters")}


def staged_info(staged: dict[str, Any]) -> StagedInfo:
    """The staged-compression history (written by :func:`autocompress.compress.staged.staged_apply`)."""
    steps = []
    for record in staged.get("steps") or []:
        if not isinstance(record, dict):
            continue
        recovered = record.get("recovered")
        steps.append(StagedStep(
            index=int(record.get("index", len(steps) + 1)), units=[str(u) for u in record.get("units") or []],
            bytes_before=as_number(record.get("bytes_before")), bytes_after=as_number(record.get("bytes_after")),
            before=_quality(record.get("before")), after=_quality(record.get("after")),
            recovered=_quality(recovered) if isinstance(recovered, dict) else None,
            gate=str(record.get("gate", "-")), failures=[str(f) for f in record.get("failures") or []],
            seconds=as_number(record.get("seconds"))))
    final = staged.get("final")
    return StagedInfo(_quality(staged.get("original")), steps, _quality(final) if isinstance(final, dict) else None,
                      bool(staged.get("complete")), [str(u) for u in staged.get("frozen") or []])


def _units_text(units: list[str]) -> str:
    shown = ", ".join(units[:3])
    return f"{shown} and {len(units) - 3} more" if len(units) > 3 else shown


def staged_rows(info: StagedInfo) -> tuple[list[str], list[list[str]]]:
    """The staged history as a table: one row per step."""
    header = ["step", "units", "size before", "size after", "perplexity before", "after", "after recovery",
              "KL after", "gate", "failures", "seconds"]
    rows = []
    for step in info.steps:
        final = step.recovered or step.after
        rows.append([str(step.index), _units_text(step.units), format_bytes(step.bytes_before),
                     format_bytes(step.bytes_after), format_number(step.before["perplexity"]),
                     format_number(step.after["perplexity"]),
                     format_number(step.recovered["perplexity"]) if step.recovered else "-",
                     format_number(final["kl"]), step.gate, "; ".join(step.failures) or "-",
                     format_number(step.seconds, 3)])
    return header, rows
