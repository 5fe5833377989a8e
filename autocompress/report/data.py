"""What the report shows, as plain data: read a run directory and extract each section's numbers.

Nothing here draws. Like Optuna's ``visualization`` (an ``_get_*_info`` step returning plain
values, then a plotting step), every function returns small dataclasses or lists that
:mod:`autocompress.report.figures` turns into plotly figures, so the numbers are tested
without plotly or a browser.

Every artifact of a run is optional: :func:`load_run` keeps what exists and records, for each
missing or unreadable file, one line saying why, which the page shows in place of the section.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..profile.artifact import Profile
from ..schedule import Choice, Schedule, SparsityPattern
from ..search.result import SearchResult, TrialRecord

MIB = 2**20


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
    return run


# --- small helpers ---------------------------------------------------------------------------

def _get(record: dict[str, Any] | None, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present (and not None) in ``record``."""
    if not record:
        return default
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return default


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``model.layers.2`` before ``model.layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_bytes(count: float | None) -> str:
    """``812 B``, ``3.4 KiB``, ``12.3 MiB``, ``1.20 GiB`` (or ``-``)."""
    if count is None:
        return "-"
    if count < 2**10:
        return f"{count:.0f} B"
    if count < 2**20:
        return f"{count / 2**10:.1f} KiB"
    if count < 2**30:
        return f"{count / MIB:,.1f} MiB"
    return f"{count / 2**30:.2f} GiB"


def format_number(value: float | None, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (or ``-``)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def choice_label(choice: Choice) -> str:
    """A short label of a choice in the profile's vocabulary (``bits=3``, ``bits=4 + 2:4``, ``drop``)."""
    if choice.drop:
        return "drop"
    parts = [f"bits={choice.bits}"] if choice.quantized else []
    if choice.pattern is SparsityPattern.TWO_FOUR:
        parts.append("2:4")
    elif choice.pattern is SparsityPattern.UNSTRUCTURED and choice.sparsity > 0:
        parts.append(f"sparsity={choice.sparsity:g}")
    if choice.head_ratio > 0:
        parts.append(f"heads={choice.head_ratio:g}")
    if choice.channel_ratio > 0:
        parts.append(f"channels={choice.channel_ratio:g}")
    return " + ".join(parts) or "16-bit"


# --- sensitivity and roles ------------------------------------------------------------------

@dataclass
class SensitivityInfo:
    """KL per (unit, probe choice): ``kl[i][j]`` for ``units[i]`` under ``labels[j]`` (None: not measured)."""

    units: list[str]
    labels: list[str]
    kl: list[list[float | None]]


def sensitivity_info(profile: Profile) -> SensitivityInfo:
    """The unit x choice KL matrix of a profile, units in model order, labels in measured order."""
    labels = profile.labels()
    for unit in profile.units:  # labels measured but absent from ``choices`` still get a column
        labels += [label for label in unit.kl if label not in labels]
    units = sorted(profile.units, key=lambda u: (u.block, natural_key(u.name)))
    return SensitivityInfo([u.name for u in units], labels,
                           [[_number(u.kl.get(label)) for label in labels] for u in units])


def additivity_rows(profile: Profile) -> list[tuple[str, str, str, str]]:
    """(bits, predicted KL, measured KL, measured/predicted) of the profile's additivity checks:
    every unit changed at once, against the sum of single-unit KLs."""
    rows = []
    for check in sorted(profile.additivity, key=lambda c: c.bits):
        ratio = check.measured_kl / check.predicted_kl if check.predicted_kl > 0 else None
        rows.append((f"bits={check.bits}", format_number(check.predicted_kl), format_number(check.measured_kl),
                     format_number(ratio, 3)))
    return rows


def proxy_rows(profile: Profile) -> list[tuple[str, str]]:
    """(proxy, Spearman rho with measured KL), best-ranking proxy first."""
    pairs = [(name, _number(rho)) for name, rho in profile.proxy_spearman.items()]
    pairs.sort(key=lambda p: -abs(p[1]) if p[1] is not None else 0)
    return [(name, format_number(rho, 3)) for name, rho in pairs]


@dataclass
class RoleCurveInfo:
    """Selectivity of each linguistic probe task per layer (layer 0 = embeddings) and each block's dominant task."""

    layers: list[int]
    curves: dict[str, list[float | None]]
    dominant: list[tuple[int, str]]


def role_curve_info(profile: Profile) -> RoleCurveInfo:
    """The role curves across depth; falls back to the per-unit ``roles`` when the profile has no curves."""
    curves = {task: [_number(v) for v in values] for task, values in profile.role_curves.items()}
    if not curves:  # rebuild from block units (layer i + 1 is the output of block i)
        blocks = sorted({u.block: u for u in profile.units if u.roles}.items())
        tasks = sorted({task for _, unit in blocks for task in unit.roles})
        curves = {task: [None] + [_number(unit.roles.get(task)) for _, unit in blocks] for task in tasks}
    length = max((len(v) for v in curves.values()), default=0)
    dominant = sorted({(u.block, u.dominant_role) for u in profile.units if u.dominant_role})
    return RoleCurveInfo(list(range(length)), curves, dominant)


def _ranges(numbers: list[int]) -> str:
    """``0-3, 7, 12-14`` from sorted integers."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def dominant_groups(info: RoleCurveInfo) -> list[tuple[str, str]]:
    """(task, the blocks it dominates as ranges), tasks in order of their first block."""
    groups: dict[str, list[int]] = {}
    for block, role in info.dominant:
        groups.setdefault(role, []).append(block)
    return [(role, _ranges(sorted(blocks))) for role, blocks in groups.items()]


# --- schedule --------------------------------------------------------------------------------

@dataclass
class ScheduleInfo:
    """The chosen schedule unit by unit, beside the profile's sensitivity of that unit."""

    units: list[str]
    labels: list[str]
    bits: list[int]
    sparsity: list[float]
    head_ratio: list[float]
    channel_ratio: list[float]
    drop: list[bool]
    chosen_kl: list[float | None]  # additive KL of the chosen choice under the profile
    worst_kl: list[float | None]  # the unit's largest measured KL over the probe choices
    average_bits: float | None


def _chosen_kl(choice: Choice, kl: dict[str, float]) -> float | None:
    """The profile's additive KL of ``choice``: the sum of its single-axis parts (None if one is unmeasured)."""
    if choice.drop:
        return _number(kl.get("drop"))
    label = choice_label(choice)
    if label == "16-bit":
        return 0.0
    values = [_number(kl.get(part)) for part in label.split(" + ")]
    return None if any(v is None for v in values) else sum(values)


def schedule_info(schedule: Schedule, profile: Profile | None = None) -> ScheduleInfo:
    """Per-unit bits and ratios of ``schedule``, with each unit's KL from ``profile`` where measured.

    ``average_bits`` weighs units by their parameter count when the profile knows it.
    """
    names = sorted(schedule.units, key=natural_key)
    units = {u.name: u for u in profile.units} if profile else {}
    info = ScheduleInfo(names, [], [], [], [], [], [], [], [], None)
    weighted, weights = 0.0, 0
    for name in names:
        choice = schedule.units[name]
        unit = units.get(name)
        info.labels.append(choice_label(choice))
        info.bits.append(0 if choice.drop else choice.bits)
        info.sparsity.append(choice.sparsity)
        info.head_ratio.append(choice.head_ratio)
        info.channel_ratio.append(choice.channel_ratio)
        info.drop.append(choice.drop)
        info.chosen_kl.append(_chosen_kl(choice, unit.kl) if unit else None)
        measured = [v for v in (_number(x) for x in unit.kl.values()) if v is not None] if unit else []
        info.worst_kl.append(max(measured) if measured else None)
        weight = unit.parameters if unit and unit.parameters else 1
        if not choice.drop:
            weighted += choice.bits * weight
            weights += weight
    info.average_bits = weighted / weights if weights else None
    return info


# --- search ----------------------------------------------------------------------------------

METRIC = "KL to the original"


@dataclass
class TrialPoint:
    """One trial (or a baseline) of the search, as plotted. ``quality`` is measured KL where the
    trial was measured, else the corrected prediction, else the additive one."""

    number: int | None
    source: str
    memory: float | None  # bytes
    latency: float | None  # milliseconds
    predicted: float | None  # additive KL from the profile
    corrected: float | None  # learned correction of it
    measured: float | None
    measured_ppl: float | None = None
    feasible: bool = True
    state: str = "COMPLETE"

    @property
    def quality(self) -> float | None:
        """The measured KL where there is one, else the best prediction."""
        for value in (self.measured, self.corrected, self.predicted):
            if value is not None:
                return value
        return None


def trial_point(record: TrialRecord, source: str | None = None) -> TrialPoint:
    """A :class:`TrialPoint` of a ``search.json`` trial (``source`` renames it, for baselines)."""
    return TrialPoint(record.number, source or record.source, _number(record.memory_bytes),
                      _number(record.latency_ms), _number(record.predicted_kl), _number(record.corrected_kl),
                      _number(record.measured_kl), _number(record.measured_ppl), bool(record.feasible),
                      str(record.state))


def search_trials(search: SearchResult) -> list[TrialPoint]:
    """Every trial in trial order."""
    return [trial_point(t) for t in sorted(search.trials, key=lambda t: t.number)]


def search_baselines(search: SearchResult) -> list[TrialPoint]:
    """The baselines (uniform choices, knapsack, greedy), named, with their trial's figures.

    A baseline whose trial is not in ``trials`` keeps the figures its own record has.
    """
    out = []
    for name, record in search.baselines.items():
        number = record.get("trial")
        try:
            point = trial_point(search.trial(number), source=name)
        except KeyError:
            point = TrialPoint(number if isinstance(number, int) else None, name,
                               _number(record.get("memory_bytes")), _number(record.get("latency_ms")),
                               _number(record.get("predicted_kl")), _number(record.get("corrected_kl")),
                               _number(record.get("measured_kl")), _number(record.get("measured_ppl")))
        for attr, key in (("measured", "measured_kl"), ("measured_ppl", "measured_ppl"), ("memory", "memory_bytes")):
            if getattr(point, attr) is None and _number(record.get(key)) is not None:
                setattr(point, attr, _number(record[key]))
        out.append(point)
    return out


def search_best(search: SearchResult) -> TrialPoint | None:
    """The chosen trial, or None when the search chose none."""
    if search.best is None:
        return None
    try:
        return trial_point(search.trial(search.best))
    except KeyError:
        return None


def pareto_front(points: list[TrialPoint]) -> list[TrialPoint]:
    """The feasible points no other point beats on both memory and quality, by increasing memory."""
    usable = sorted((p for p in points if p.feasible and p.memory is not None and p.quality is not None),
                    key=lambda p: (p.memory, p.quality))
    front, best_quality = [], math.inf
    for point in usable:
        if point.quality < best_quality:
            front.append(point)
            best_quality = point.quality
    return front


@dataclass
class ParetoInfo:
    """Trials, baselines, the memory x quality front, the search's own Pareto set and the chosen point."""

    trials: list[TrialPoint]
    baselines: list[TrialPoint]
    front: list[TrialPoint]
    search_pareto: list[TrialPoint]
    best: TrialPoint | None
    budget_memory: float | None
    metric: str = METRIC


def budget_memory(search: SearchResult) -> float | None:
    """The memory limit in bytes, where the budget has one."""
    return _number((search.budget.get("limits") or {}).get("memory_bytes"))


def pareto_info(search: SearchResult) -> ParetoInfo:
    """Memory vs quality of every trial and baseline; the 2-D front is computed from the points shown
    (the search's own Pareto set, over up to three objectives, is listed apart)."""
    trials, baselines = search_trials(search), search_baselines(search)
    chosen = set(search.pareto)
    return ParetoInfo(trials, baselines, pareto_front(trials), [t for t in trials if t.number in chosen],
                      search_best(search), budget_memory(search))


@dataclass
class HistoryInfo:
    """Quality per trial in trial order and the best feasible value so far."""

    numbers: list[int]
    values: list[float]
    best_so_far: list[float]
    sources: list[str]


def history_info(search: SearchResult) -> HistoryInfo:
    """The optimisation history from ``search.json`` (drawn when the Optuna study cannot be opened)."""
    info, best = HistoryInfo([], [], [], []), math.inf
    for trial in search_trials(search):
        if trial.quality is None:
            continue
        if trial.feasible:
            best = min(best, trial.quality)
        info.numbers.append(trial.number)
        info.values.append(trial.quality)
        info.best_so_far.append(best if math.isfinite(best) else trial.quality)
        info.sources.append(trial.source)
    return info


@dataclass
class PredictionInfo:
    """Predicted vs measured KL of the trials measured for real, and how well they agree."""

    points: list[TrialPoint]
    spearman_additive: float | None
    spearman_corrected: float | None
    median_ratio: float | None  # median of measured / additive prediction


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); None for fewer than 3 points or a constant side."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else None


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def prediction_info(search: SearchResult) -> PredictionInfo:
    """Trials completed with both an additive prediction and a measurement (pruned trials left out:
    their measurement is a partial running mean)."""
    points = [p for p in search_trials(search)
              if p.predicted is not None and p.measured is not None and p.state == "COMPLETE"]
    corrected = [p for p in points if p.corrected is not None]
    return PredictionInfo(
        points,
        spearman([p.predicted for p in points], [p.measured for p in points]),
        spearman([p.corrected for p in corrected], [p.measured for p in corrected]),
        _median([p.measured / p.predicted for p in points if p.predicted > 0]),
    )


def study_location(search: SearchResult, run_dir: Path) -> tuple[str, str] | str:
    """The Optuna storage URL and study name of the search, or why it cannot be opened.

    A relative sqlite path or journal file that does not exist from here is looked for in the
    run directory; a sqlite file that exists nowhere is reported rather than opened (opening
    would create an empty database).
    """
    storage, name = search.storage, search.study_name
    if not storage or not name:
        return "search.json names no Optuna storage and study"
    if storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///"):])
        if not path.exists() and not path.is_absolute() and (run_dir / path.name).exists():
            path = (run_dir / path.name).resolve()
            storage = f"sqlite:///{path}"
        if not path.exists():
            return f"the study's storage {storage} does not exist here"
    elif "://" not in storage:
        path = Path(storage)
        if not path.exists() and (run_dir / path.name).exists():
            path = (run_dir / path.name).resolve()
            storage = str(path)
        if not path.exists():
            return f"the study's journal file {storage} does not exist here"
    return storage, name


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
        or _get(original, "model") or _get(evaluation, "model")
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
        rows.append(("evaluation data", f"{_get(evaluation, 'data', default='-')} "
                                        f"({_get(evaluation, 'tokens', default=0):,} tokens)"))
    best = search_best(search) if search else None
    original_figures = (search.budget.get("original") or {}) if search else {}
    memory = best.memory if best and best.memory is not None else _number(_get(evaluation, "size_bytes"))
    original_size = _number(original_figures.get("memory_bytes")) or _number(_get(original, "size_bytes"))
    if memory is not None:
        rows.append(("achieved memory", format_bytes(memory) + (
            f" ({100 * memory / original_size:.1f}% of the original {format_bytes(original_size)})"
            if original_size else "")))
    if best and best.latency is not None:
        source = search.trial(best.number).latency_source or search.budget.get("latency_source") or "cost model"
        original_latency = _number(original_figures.get("latency_ms"))
        rows.append(("achieved latency", f"{best.latency:.3g} ms per decode step ({source})"
                     + (f"; original {original_latency:.3g} ms" if original_latency else "")))
    if run.schedule:
        average = schedule_info(run.schedule, profile).average_bits
        if average is not None:
            rows.append(("average bits (kept units)", f"{average:.2f}"))
    if best is not None:
        ppl0 = _number((search.original or {}).get("ppl"))
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
    ppl, ppl0 = _number(_get(evaluation, "perplexity")), _number(_get(original, "perplexity"))
    if ppl is not None:
        rows.append(("evaluation perplexity", f"{ppl:.4g}" + _relative(ppl, ppl0)
                     + (f"; original {ppl0:.4g}" if ppl0 is not None else "")))
    kl = _number(_get(evaluation, "kl"))
    if kl is not None:
        rows.append(("evaluation KL to the original", f"{kl:.4g} nats/token"))
    return rows


def baseline_rows(search: SearchResult) -> list[tuple[str, str, str, str, str, str]]:
    """(name, memory, latency, predicted KL, measured KL, measured perplexity) of the chosen
    schedule and of every baseline."""
    best = search_best(search)
    entries = ([(f"chosen (trial {best.number}, {best.source})", best)] if best else []) \
        + [(b.source, b) for b in search_baselines(search)]
    return [(name, format_bytes(p.memory), "-" if p.latency is None else f"{p.latency:.3g} ms",
             format_number(p.predicted), format_number(p.measured), format_number(p.measured_ppl))
            for name, p in entries]


EVAL_FIELDS = (("perplexity", "perplexity", 4), ("loss", "loss (nats/token)", 4), ("kl", "KL to reference", 4),
               ("top1", "top-1 agreement", 4), ("size_bytes", "size as stored", 0),
               ("parameters", "parameters", 0), ("tokens_per_second", "prefill tokens/s", 0),
               ("decode_tokens_per_second", "decode tokens/s", 3), ("tokens", "tokens", 0),
               ("threads", "torch threads", 0))


def eval_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    """The evaluation table: header (metric, then one column per evaluated model) and rows."""
    columns = [(name, ev) for name, ev in (("original", run.original), ("compressed", run.evaluation)) if ev]
    header = ["metric"] + [f"{name}: {_get(ev, 'model', default='-')}" for name, ev in columns]
    rows = []
    for key, label, digits in EVAL_FIELDS:
        values = [_number(ev.get(key)) for _, ev in columns]
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
    return {key: _number(record.get(key)) for key in ("perplexity", "loss", "kl", "bytes", "parameters")}


def staged_info(staged: dict[str, Any]) -> StagedInfo:
    """The staged-compression history (written by :func:`autocompress.compress.staged.staged_apply`)."""
    steps = []
    for record in staged.get("steps") or []:
        if not isinstance(record, dict):
            continue
        recovered = record.get("recovered")
        steps.append(StagedStep(
            index=int(record.get("index", len(steps) + 1)), units=[str(u) for u in record.get("units") or []],
            bytes_before=_number(record.get("bytes_before")), bytes_after=_number(record.get("bytes_after")),
            before=_quality(record.get("before")), after=_quality(record.get("after")),
            recovered=_quality(recovered) if isinstance(recovered, dict) else None,
            gate=str(record.get("gate", "-")), failures=[str(f) for f in record.get("failures") or []],
            seconds=_number(record.get("seconds"))))
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
