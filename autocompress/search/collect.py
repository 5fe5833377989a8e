"""From a finished study to the artifacts: ``search.json`` records, the best schedule, the table.

The best trial is the feasible one with the lowest *measured* KL; baselines are always
measured, so it is never worse than them, and when it is a baseline the notes say so.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .decisions import to_schedule
from .objective import Correction
from .result import SearchResult, TrialRecord

if TYPE_CHECKING:
    from .study import Context

BASELINE_SOURCES = ("uniform:", "knapsack", "greedy")


def _measured_samples(study) -> list[tuple[dict, float, float]]:
    out, seen = [], set()
    for t in study.get_trials(deepcopy=False):
        record = t.user_attrs.get("record", {})
        key = tuple(sorted(t.params.items()))
        if record.get("measure_complete") and key not in seen:  # a re-used measurement is no new evidence
            seen.add(key)
            out.append((t.params, record["predicted_kl"], record["measured_kl"]))
    return out


def _records(ctx: Context, study) -> list[TrialRecord]:
    records = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs.get("record")
        if a is None:
            continue
        records.append(TrialRecord(
            number=t.number, source=a.get("source", "tpe"), choices=dict(t.params), predicted_kl=a["predicted_kl"],
            corrected_kl=a.get("corrected_kl"), measured_kl=a.get("measured_kl"), measured_loss=a.get("measured_loss"),
            measured_ppl=a.get("measured_ppl"), memory_bytes=int(a["memory_bytes"]), avg_bits=a["avg_bits"],
            params=int(a["params"]), latency_ms=a["latency_ms"], latency_source=a["latency_source"],
            feasible=bool(a["feasible"]), state=t.state.name, seconds=a.get("seconds", 0.0),
            window_kl=a.get("measured_window_kl")))
    return records


def _pareto(records: list[TrialRecord]) -> list[int]:
    points = [(r.number, (r.measured_kl if r.measured_kl is not None else (r.corrected_kl or r.predicted_kl)),
               r.memory_bytes, r.latency_ms) for r in records if r.feasible and r.state == "COMPLETE"]
    front = []
    for n, *p in points:
        dominated = any(all(q[i] <= p[i] for i in range(3)) and any(q[i] < p[i] for i in range(3))
                        for _, *q in points)
        if not dominated:
            front.append(n)
    return sorted(front)


def collect(ctx: Context, study, url: str, name: str, notes: list[str], seconds: float) -> SearchResult:
    """Turn the study into a :class:`SearchResult` (best = lowest measured KL among feasible trials)."""
    records = _records(ctx, study)
    done = [r for r in records if r.state == "COMPLETE" and r.feasible]
    measured = [r for r in done if r.measured_kl is not None]
    if measured:
        best = min(measured, key=lambda r: (r.measured_kl, r.number))
    elif done:
        best = min(done, key=lambda r: (r.corrected_kl or r.predicted_kl, r.number))
        notes.append("no trial was measured; the best is chosen by predicted KL")
    else:
        best = None
        notes.append("no feasible trial finished")
    baselines = {}
    also = {t.number: t.user_attrs.get("also", []) for t in study.get_trials(deepcopy=False)}
    for r in records:
        for source in [r.source] + list(also.get(r.number, [])):
            if source.startswith(BASELINE_SOURCES) and r.state == "COMPLETE" and source not in baselines:
                    baselines[source] = {"trial": r.number, "measured_kl": r.measured_kl, "measured_ppl": r.measured_ppl,
                                     "predicted_kl": r.predicted_kl, "memory_bytes": r.memory_bytes,
                                     "avg_bits": r.avg_bits, "latency_ms": r.latency_ms}
    beat = best is not None and not best.source.startswith(BASELINE_SOURCES)
    if best is not None and not beat:
        notes.append(f"the search did not beat the best baseline: {best.source} (trial {best.number}) is kept")
    measured_base = [b["measured_kl"] for b in baselines.values() if b["measured_kl"] is not None]
    if best is not None and measured_base and best.measured_kl is not None:
        assert best.measured_kl <= min(measured_base) + 1e-12  # baselines are measured, so this holds by choice
    original = dict(ctx.evaluator.original_quality()) if measured else {}
    original.update(ctx.budget.original)
    correction = Correction(ctx.slots)
    correction.fit(_measured_samples(study))
    return SearchResult(
        model=ctx.model_name, model_fingerprint=ctx.fingerprint, budget=ctx.budget.to_json(), space=ctx.space.name,
        storage=url, study_name=name, objective="pareto" if ctx.settings.pareto else "kl",
        holdout=ctx.holdout_meta, original=original, trials=records, baselines=baselines,
        best=best.number if best else None, pareto=_pareto(records), beat_baselines=beat,
        correction=correction.to_json(), notes=notes, seconds=seconds)


def best_schedule(ctx: Context, result: SearchResult):
    """The best trial as a :class:`~autocompress.schedule.Schedule` with its figures in ``meta``."""
    best = result.trial(result.best)
    schedule = to_schedule(ctx.slots, best.choices, ctx.fingerprint)
    figures = ctx.budget.evaluate(schedule)
    meta = {"search": {"trial": best.number, "source": best.source, "study": result.study_name,
                       "storage": result.storage, "space": ctx.space.name, "budget": ctx.budget.to_json(),
                       "predicted_kl": best.predicted_kl, "corrected_kl": best.corrected_kl,
                       "measured_kl": best.measured_kl, "measured_ppl": best.measured_ppl,
                       "holdout": ctx.holdout_meta, **figures, "latency_source": ctx.budget.latency_source,
                       "pareto": result.pareto, "beat_baselines": result.beat_baselines}}
    schedule = to_schedule(ctx.slots, best.choices, ctx.fingerprint, meta)
    try:
        from ..transfer.coordinates import describe  # noqa: PLC0415
    except ImportError:
        result.notes.append("schedule.json has no model-agnostic coordinates (autocompress.transfer missing)")
        return schedule
    return describe(schedule, ctx.model, ctx.profile)


def result_table(result: SearchResult):
    """A rich table: the original, each baseline and the best trial, measured on the held-aside slice."""
    from rich.table import Table  # noqa: PLC0415

    from .budget import format_figure  # noqa: PLC0415

    source = result.budget.get("latency_source", "")
    table = Table(title=f"search {result.study_name} ({len(result.trials)} trials)",
                  caption=f"KL and ppl measured on held-aside calibration text; latency {source}")
    for column in ("what", "trial", "KL", "ppl", "KL pred.", "memory", "bits", "ms"):
        table.add_column(column, overflow="fold")
    if result.original:
        table.add_row("original", "-", "0", _fmt(result.original.get("ppl")), "0",
                      format_figure("memory_bytes", result.original["memory_bytes"]),
                      f"{result.original['avg_bits']:.2f}", f"{result.original['latency_ms']:.3g}")
    rows = [(name, b["trial"]) for name, b in result.baselines.items()]
    if result.best is not None:
        rows.append(("best", result.best))
    for what, number in rows:
        r = result.trial(number)
        table.add_row(what, str(number), _fmt(r.measured_kl), _fmt(r.measured_ppl), _fmt(r.predicted_kl),
                      format_figure("memory_bytes", r.memory_bytes), f"{r.avg_bits:.2f}", f"{r.latency_ms:.3g}")
    return table


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
