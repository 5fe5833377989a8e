"""A sensitivity predictor: per-unit KL of a probe choice, guessed from cheap features.

Trained on stored profiles (every unit x probe label is one row), a random forest
(scikit-learn) maps

* the unit's role (one-hot), relative depth and relative size,
* the choice (bits, sparsity, 2:4, head and channel ratios, drop),
* the profile's cheap proxies (``fisher``, ``block_influence``, ``weight_kurtosis``...), each
  turned into its rank within the model, since raw values do not compare across models,

to log KL minus the model's median log KL (so only *relative* sensitivity is learned, which is
what allocation and ranking need). The spread of the trees' predictions says how sure it is:
:func:`select_units_to_measure` picks the units to measure for real.

It is saved as JSON, never pickled: the file holds the training table and the forest's
settings, and loading refits the forest (deterministic, seeded; a second or two).

Example::

    predictor = SensitivityPredictor.from_profiles([(profile_a, model_a), (profile_b, model_b)])
    predictor.save("predictor.json")
    SensitivityPredictor.load("predictor.json").spearman(profile_c, model_c)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import read_artifact, write_artifact
from ..errors import UserError
from ..schedule import Choice, SparsityPattern
from .coordinates import UnitCoordinates, model_coordinates

PREDICTOR_TYPE = "sensitivity-predictor"
PREDICTOR_VERSION = 1
ROLES = ("block", "q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "head")
BASE_FEATURES = ("relative_depth", "relative_size", "bits", "sparsity", "two_four", "head_ratio",
                 "channel_ratio", "drop") + tuple(f"role_{r}" for r in ROLES)
MIN_KL = 1e-9  # KLs below this are measurement noise; the log is floored there


def choice_features(choice: Choice) -> dict[str, float]:
    """The choice as numbers (bits 16 = unquantized)."""
    return {"bits": float(choice.bits), "sparsity": choice.sparsity,
            "two_four": float(choice.pattern is SparsityPattern.TWO_FOUR), "head_ratio": choice.head_ratio,
            "channel_ratio": choice.channel_ratio, "drop": float(choice.drop)}


def _ranks(values: dict[str, float]) -> dict[str, float]:
    """Each unit's proxy as its rank in [0, 1] among the model's units (ties averaged)."""
    if not values:
        return {}
    order = sorted(values, key=lambda k: values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = ((i + j) / 2) / max(len(order) - 1, 1)
        i = j + 1
    return ranks


def unit_rows(units: list[tuple[UnitCoordinates, Choice, dict[str, float]]]) -> list[dict[str, float]]:
    """Feature rows for (coordinates, choice, raw proxies) of one model; proxies become ranks.

    A proxy named ``NAME:LABEL`` (the profiler's per-choice Fisher score, ``fisher:bits=3``) is
    one feature ``NAME@choice`` read only on rows of that choice, ranked among them.
    """
    from .sensitivity import choice_labels  # noqa: PLC0415

    labels = ["+".join(choice_labels(choice)) for _, choice, _ in units]
    ranks: dict[tuple[str, str | None], dict[str, float]] = {}
    for key in sorted({p for _, _, proxies in units for p in proxies}):
        base, _, label = key.partition(":")
        values = {c.name: proxies[key] for (c, _, proxies), row_label in zip(units, labels)
                  if key in proxies and proxies[key] is not None and math.isfinite(proxies[key])
                  and (not label or row_label == label)}
        ranks[(key, label or None)] = _ranks(values)
    rows = []
    for (coords, choice, _), row_label in zip(units, labels):
        row = {"relative_depth": coords.relative_depth, "relative_size": coords.relative_size,
               **choice_features(choice), **{f"role_{r}": float(coords.role == r) for r in ROLES}}
        for (key, label), ranked in ranks.items():
            if coords.name not in ranked:
                continue
            if label is None:
                row[f"proxy_{key}"] = ranked[coords.name]
            elif label == row_label:
                row[f"proxy_{key.partition(':')[0]}@choice"] = ranked[coords.name]
        rows.append(row)
    return rows


def profile_rows(profile, model=None) -> tuple[list[dict[str, float]], list[float], list[tuple[str, str]]]:
    """Training rows of one profile: features, normalised log KL, and (unit, label) keys.

    ``model`` gives exact coordinates; without it they come from the profile itself.
    """
    coordinates = model_coordinates(model) if model is not None else _profile_coordinates(profile)
    choices = {label: Choice.from_json(data, f"profile.choices[{label!r}]") for label, data in profile.choices.items()}
    entries, targets, keys = [], [], []
    for unit in profile.units:
        if unit.name not in coordinates:
            continue
        for label, kl in unit.kl.items():
            if kl is None or not math.isfinite(kl) or label not in choices:
                continue
            entries.append((coordinates[unit.name], choices[label], unit.proxies))
            targets.append(math.log(max(kl, MIN_KL)))
            keys.append((unit.name, label))
    if not targets:
        raise UserError(f"profile of {profile.model} has no finite KL measurements to learn from")
    median = float(np.median(targets))
    return unit_rows(entries), [t - median for t in targets], keys


def _profile_coordinates(profile) -> dict[str, UnitCoordinates]:
    from .coordinates import relative_depth  # noqa: PLC0415

    blocks = max((u.block for u in profile.units), default=0) + 1
    by_role: dict[str, list[int]] = {}
    for u in profile.units:
        by_role.setdefault("block" if u.role == "block" else "linear", []).append(u.parameters)
    means = {k: (sum(v) / len(v) if v and sum(v) else 1.0) for k, v in by_role.items()}
    return {u.name: UnitCoordinates(u.name, u.block, u.role, relative_depth(u.block, blocks),
                                    (u.parameters or means["block" if u.role == "block" else "linear"])
                                    / means["block" if u.role == "block" else "linear"], u.parameters)
            for u in profile.units}


@dataclass
class SensitivityPredictor:
    """A random forest over profile rows; :meth:`save` / :meth:`load` go through JSON only."""

    rows: list[dict[str, float]] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # one model name per training profile
    trees: int = 200
    seed: int = 0
    _forest: Any = None
    _features: tuple[str, ...] = ()

    @classmethod
    def from_profiles(cls, profiles: list, *, trees: int = 200, seed: int = 0) -> SensitivityPredictor:
        """Train on ``profiles``: each a Profile or a (Profile, model) pair (model for exact coordinates)."""
        predictor = cls(trees=trees, seed=seed)
        for item in profiles:
            profile, model = item if isinstance(item, tuple) else (item, None)
            rows, targets, _ = profile_rows(profile, model)
            predictor.rows += rows
            predictor.targets += targets
            predictor.sources.append(profile.model)
        if not predictor.rows:
            raise UserError("no profiles to train the sensitivity predictor on")
        return predictor

    def features(self, available: set[str] | None = None) -> tuple[str, ...]:
        """Features used: the base ones plus every proxy the training rows (and ``available``) share."""
        proxies = sorted({k for row in self.rows for k in row if k.startswith("proxy_")})
        if available is not None:
            proxies = [p for p in proxies if p in available]
        return BASE_FEATURES + tuple(proxies)

    def _fit(self, features: tuple[str, ...]):
        from sklearn.ensemble import RandomForestRegressor  # noqa: PLC0415

        if self._forest is not None and self._features == features:
            return self._forest
        x = np.array([[row.get(f, np.nan) for f in features] for row in self.rows], dtype=np.float64)
        forest = RandomForestRegressor(n_estimators=self.trees, min_samples_leaf=2, max_features=0.6,
                                       random_state=self.seed, n_jobs=1)
        forest.fit(x, np.asarray(self.targets))
        self._forest, self._features = forest, features
        return forest

    def predict_rows(self, rows: list[dict[str, float]]) -> list[tuple[float, float]]:
        """(mean, spread across trees) of normalised log KL for feature rows of one model."""
        available = {k for row in rows for k in row}
        features = self.features(available)
        forest = self._fit(features)
        x = np.array([[row.get(f, np.nan) for f in features] for row in rows], dtype=np.float64)
        per_tree = np.stack([tree.predict(x) for tree in forest.estimators_])
        return list(zip(per_tree.mean(axis=0).tolist(), per_tree.std(axis=0).tolist()))

    def predict_units(self, units: list[tuple[UnitCoordinates, Choice, dict[str, float]]]) -> list[tuple[float, float]]:
        """(mean, spread) of normalised log KL for each (coordinates, choice, proxies) of one model."""
        return self.predict_rows(unit_rows(units))

    def spearman(self, profile, model=None) -> dict[str, float]:
        """Spearman rho of predicted vs measured KL on ``profile``: over all rows, and the mean over labels."""
        from scipy.stats import spearmanr  # noqa: PLC0415

        rows, targets, keys = profile_rows(profile, model)
        predicted = [m for m, _ in self.predict_rows(rows)]
        overall = float(spearmanr(predicted, targets).statistic)
        per_label = {}
        for label in sorted({k[1] for k in keys}):
            idx = [i for i, k in enumerate(keys) if k[1] == label]
            if len(idx) > 2 and len({targets[i] for i in idx}) > 1:
                per_label[label] = float(spearmanr([predicted[i] for i in idx], [targets[i] for i in idx]).statistic)
        within = float(np.mean(list(per_label.values()))) if per_label else float("nan")
        return {"overall": overall, "within_label": within, **{f"label:{k}": v for k, v in per_label.items()}}

    def to_json(self) -> dict[str, Any]:
        """The training table and settings (the forest is refit on load)."""
        return {"trees": self.trees, "seed": self.seed, "sources": self.sources,
                "rows": self.rows, "targets": self.targets}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the predictor as a versioned JSON artifact."""
        return write_artifact(path, PREDICTOR_TYPE, PREDICTOR_VERSION, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityPredictor:
        """Read a predictor written by :meth:`save`, strictly."""
        data = read_artifact(path, PREDICTOR_TYPE, PREDICTOR_VERSION)
        known = {"trees", "seed", "sources", "rows", "targets"}
        if not isinstance(data, dict) or set(data) != known:
            raise UserError(f"{path}: a sensitivity predictor needs exactly {', '.join(sorted(known))}")
        rows, targets = data["rows"], data["targets"]
        if (not isinstance(rows, list) or not isinstance(targets, list) or len(rows) != len(targets) or not rows
                or not all(isinstance(r, dict) and all(isinstance(v, (int, float)) for v in r.values()) for r in rows)
                or not all(isinstance(t, (int, float)) for t in targets)):
            raise UserError(f"{path}: rows must be a non-empty list of feature objects, one target number each")
        if not isinstance(data["trees"], int) or data["trees"] < 1 or not isinstance(data["seed"], int):
            raise UserError(f"{path}: trees must be a positive integer and seed an integer")
        return cls(rows=rows, targets=[float(t) for t in targets], sources=list(data["sources"]),
                   trees=data["trees"], seed=data["seed"])


def select_units_to_measure(predictor: SensitivityPredictor, model, probe_choices: list[tuple[str, Choice]],
                            proxies: dict[str, dict[str, float]] | None = None, *, units: list[str] | None = None,
                            fraction: float = 0.25, minimum: int = 2) -> list[str]:
    """The units of ``model`` the predictor is least sure of, most uncertain first.

    Uncertainty is the spread of the forest's trees, averaged over ``probe_choices``; the top
    ``fraction`` of ``units`` (at least ``minimum``) are returned, the rest can take predicted
    values (:func:`predicted_kl`). The first and last block are always measured: they are
    the most sensitive in every model we profiled and the cheapest mistakes to avoid.
    """
    coordinates = model_coordinates(model)
    units = units if units is not None else [n for n, c in coordinates.items() if c.role == "block"]
    entries = [(coordinates[u], choice, (proxies or {}).get(u, {})) for u in units for _, choice in probe_choices]
    spread = [s for _, s in predictor.predict_units(entries)]
    per_unit = {u: float(np.mean(spread[i * len(probe_choices):(i + 1) * len(probe_choices)]))
                for i, u in enumerate(units)}
    count = min(len(units), max(minimum, math.ceil(fraction * len(units))))
    ends = [u for u in units if coordinates[u].relative_depth in (0.0, 1.0)]
    ranked = sorted(units, key=lambda u: -per_unit[u])
    chosen = ends[:count] + [u for u in ranked if u not in ends]
    return chosen[:count]


def predicted_kl(predictor: SensitivityPredictor, model, probe_choices: list[tuple[str, Choice]], units: list[str],
                 proxies: dict[str, dict[str, float]] | None = None, *, scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Predicted KL per unit and probe label (``scale`` times exp of the normalised log KL;
    take ``scale`` as the measured units' median KL to put predictions on the model's level)."""
    coordinates = model_coordinates(model)
    entries = [(coordinates[u], choice, (proxies or {}).get(u, {})) for u in units for _, choice in probe_choices]
    means = [m for m, _ in predictor.predict_units(entries)]
    out: dict[str, dict[str, float]] = {}
    for i, u in enumerate(units):
        out[u] = {label: scale * math.exp(means[i * len(probe_choices) + j])
                  for j, (label, _) in enumerate(probe_choices)}
    return out


__all__ = ["SensitivityPredictor", "select_units_to_measure", "predicted_kl", "profile_rows", "unit_rows",
           "choice_features"]
