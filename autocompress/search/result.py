"""``search.json``: what a search tried, measured and chose, for the report and for humans.

Example::

    result = SearchResult.load("runs/x/search.json")
    best = result.trial(result.best)
    best.measured_kl, best.memory_bytes, best.latency_ms, best.latency_source
    [result.trial(n) for n in result.pareto]
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import read_artifact, type_error, write_artifact
from ..errors import UserError

SEARCH_TYPE = "search"
SEARCH_VERSION = 1


@dataclass
class TrialRecord:
    """One trial of the study.

    ``source`` says where its choices came from: ``uniform:bits=3``, ``knapsack``, ``greedy``,
    ``warm-start``, ``local`` (a neighbour of the best measured trial), ``tpe`` or ``nsga2``. ``choices`` maps each slot to its option label.
    ``predicted_kl`` is the additive sum of profile KLs, ``corrected_kl`` the learned
    correction of it (None before enough trials were measured), ``measured_kl`` the KL to the
    original on the held-aside calibration slice (None when not measured; for a pruned trial,
    the running mean when it was stopped), ``window_kl`` the same per held-aside window (the
    windows are the same for every trial, so two trials compare pairwise). ``state`` is
    Optuna's (COMPLETE, PRUNED, FAIL...).
    """

    number: int
    source: str
    choices: dict[str, str]
    predicted_kl: float
    corrected_kl: float | None
    measured_kl: float | None
    measured_loss: float | None
    measured_ppl: float | None
    memory_bytes: int
    avg_bits: float
    params: int
    latency_ms: float
    latency_source: str
    feasible: bool
    state: str
    seconds: float = 0.0
    window_kl: list[float] | None = None  # each held-aside window's mean KL, when measured


@dataclass
class SearchResult:
    """A whole search: settings, the original's quality, every trial, baselines, best and Pareto set.

    ``baselines`` maps a baseline name (``uniform:bits=3``, ``knapsack``, ``greedy``) to
    ``{"trial": number, "measured_kl": ..., "measured_ppl": ..., "memory_bytes": ...}``.
    ``original`` holds the 16-bit model's ``loss``, ``ppl`` on the held-aside slice and its
    figures. ``beat_baselines`` is False when the best trial is a baseline itself.
    """

    model: str
    model_fingerprint: str
    budget: dict[str, Any]  # Budget.to_json(): specs, resolved limits, original figures, latency source
    space: str
    storage: str
    study_name: str
    objective: str  # "kl" (single objective, TPE) or "pareto" (NSGA-II: kl, memory, latency)
    holdout: dict[str, Any]  # data, split, start, tokens, window
    original: dict[str, Any]
    trials: list[TrialRecord]
    baselines: dict[str, dict[str, Any]]
    best: int | None
    pareto: list[int] = field(default_factory=list)
    beat_baselines: bool = False
    correction: dict[str, Any] = field(default_factory=dict)  # regressor, fitted on, mean |error| before/after
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def trial(self, number: int) -> TrialRecord:
        """The record of trial ``number``."""
        for trial in self.trials:
            if trial.number == number:
                return trial
        raise KeyError(f"no trial {number} in this search")

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike = "search.json") -> SearchResult:
        """Strict inverse of :meth:`to_json`: a missing field, an unknown one or a wrong type names it."""
        if (error := type_error(data, cls, "search")) is not None:
            raise UserError(f"{path}: not a valid search result ({error}); re-run `autocompress search`")
        try:
            trials = [TrialRecord(**t) for t in data["trials"]]
            rest = {k: v for k, v in data.items() if k != "trials"}
            return cls(trials=trials, **rest)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a valid search result ({exc}); re-run `autocompress search`") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``search.json`` atomically."""
        return write_artifact(path, SEARCH_TYPE, SEARCH_VERSION, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read a result written by :meth:`save`."""
        return cls.from_json(read_artifact(path, SEARCH_TYPE, SEARCH_VERSION), path)


def paired_gap(values: list[float] | None, reference: list[float] | None) -> tuple[float, float] | None:
    """Mean and standard error of ``values`` minus ``reference``, paired window by window (two
    models measured on the same windows, e.g. two trials' ``window_kl``); None unless both hold
    the same number of windows, at least two.

    Example::

        mean, error = paired_gap(result.trial(7).window_kl, result.trial(result.best).window_kl)
    """
    if not values or not reference or len(values) != len(reference) or len(values) < 2:
        return None
    gaps = [x - y for x, y in zip(values, reference)]
    return statistics.fmean(gaps), statistics.stdev(gaps) / math.sqrt(len(gaps))
