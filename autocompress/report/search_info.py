"""What the report shows of a search (``search.json``), as plain data (no plotting).

Trials and baselines as points on memory x quality, the 2-D Pareto front, the optimisation
history, predicted against measured quality, and where the Optuna study is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..search.result import SearchResult, TrialRecord
from .formats import as_number, format_bytes, format_number


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
    return TrialPoint(record.number, source or record.source, as_number(record.memory_bytes),
                      as_number(record.latency_ms), as_number(record.predicted_kl), as_number(record.corrected_kl),
                      as_number(record.measured_kl), as_number(record.measured_ppl), bool(record.feasible),
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
                               as_number(record.get("memory_bytes")), as_number(record.get("latency_ms")),
                               as_number(record.get("predicted_kl")), as_number(record.get("corrected_kl")),
                               as_number(record.get("measured_kl")), as_number(record.get("measured_ppl")))
        for attr, key in (("measured", "measured_kl"), ("measured_ppl", "measured_ppl"), ("memory", "memory_bytes")):
            if getattr(point, attr) is None and as_number(record.get(key)) is not None:
                setattr(point, attr, as_number(record[key]))
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
    return as_number((search.budget.get("limits") or {}).get("memory_bytes"))


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


def study_location(search: SearchResult, run_dir: Path, storage: str | None = None) -> tuple[str, str] | str:
    """The Optuna storage URL and study name of the search, or why it cannot be opened.

    A storage outside the run directory (a database server, a file elsewhere) is opened only
    when the user names it (``storage``): search.json alone never makes the report connect.

    A relative sqlite path or journal file that does not exist from here is looked for in the
    run directory; a sqlite file that exists nowhere is reported rather than opened (opening
    would create an empty database).
    """
    from ..search.storage import is_run_storage  # noqa: PLC0415

    named, (storage, name) = storage, (storage or search.storage, search.study_name)
    if not storage or not name:
        return "search.json names no Optuna storage and study"
    if named is None and not is_run_storage(storage, run_dir):
        return f"the study's storage {storage} is outside {run_dir}; pass --storage {storage} to read it"
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


def baseline_rows(search: SearchResult) -> list[tuple[str, str, str, str, str, str]]:
    """(name, memory, latency, predicted KL, measured KL, measured perplexity) of the chosen
    schedule and of every baseline."""
    best = search_best(search)
    entries = ([(f"chosen (trial {best.number}, {best.source})", best)] if best else []) \
        + [(b.source, b) for b in search_baselines(search)]
    return [(name, format_bytes(p.memory), "-" if p.latency is None else f"{p.latency:.3g} ms",
             format_number(p.predicted), format_number(p.measured), format_number(p.measured_ppl))
            for name, p in entries]
