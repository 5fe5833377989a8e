"""Predicted quality: the profile's additive KL, and a learned correction from measured trials.

The additive model says a schedule's damage is the sum, over slots, of the KL the profile
measured with only that unit changed (bit width delta plus pruning delta). It ranks a
candidate in microseconds but under-predicts when many units change at once, so once a few
trials have been measured for real, a small scikit-learn regressor maps (log predicted KL,
share of slots at each bit width and pruning kind) to log measured KL.

Example::

    predictor = AdditivePredictor(slots, profile)
    kl = predictor.predict(picks)
    correction = Correction(slots); correction.fit([(picks, measured_kl), ...]); correction.predict(picks)
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from ..profile.artifact import Profile
from .decisions import Slot

KL_FLOOR = 1e-6  # the KL of the untouched model is 0; logs need a floor


class AdditivePredictor:
    """Sum of single-unit profile KLs for each slot's picked option."""

    def __init__(self, slots: list[Slot], profile: Profile, metric: str = "kl"):
        self.slots = slots
        self.tables: list[dict[str, float]] = []
        for slot in slots:
            units = []
            for member in slot.members:
                try:
                    units.append(profile.unit(member))
                except KeyError:
                    raise UserError(f"profile.json has no unit {member!r}; profile with the same search space "
                                    f"granularity ({'linear' if member.count('.') > 2 else 'block'})") from None
            table = {}
            for option in slot.options:
                total = 0.0
                for label in option.probe_labels:
                    for unit in units:
                        values = getattr(unit, metric)
                        if label not in values:
                            raise UserError(f"profile.json has no {label!r} measurement for {unit.name}; re-run "
                                            f"`autocompress profile` with this search space")
                        # A unit improving the loss by chance must not make the sum cheaper than doing nothing.
                        total += max(float(values[label]), 0.0)
                table[option.label] = total
            self.tables.append(table)

    def predict(self, picks: dict[str, str]) -> float:
        """Predicted KL of the picks (one option label per slot)."""
        return sum(table[picks[slot.name]] for slot, table in zip(self.slots, self.tables))

    def option_values(self) -> list[np.ndarray]:
        """Per slot, the predicted KL of each option in the slot's option order."""
        return [np.array([table[o.label] for o in slot.options]) for slot, table in zip(self.slots, self.tables)]


class Correction:
    """Learned map from the additive prediction (plus the option mix) to measured KL.

    A ridge regression on log KL: with tens of measured trials, a few well-chosen features
    beat a flexible model. Until ``min_points`` trials are measured it returns None.
    """

    def __init__(self, slots: list[Slot], min_points: int = 4, alpha: float = 1.0):
        self.slots = slots
        self.min_points = min_points
        self.alpha = alpha
        self.kinds = sorted({k for slot in slots for o in slot.options for k in self._kinds(o.label)})
        self.model = None
        self.fitted_on = 0
        self.error_before = None
        self.error_after = None

    @staticmethod
    def _kinds(label: str) -> list[str]:
        kinds = []
        for part in label.split("+"):
            kinds.append(part.split("=")[0] if not part.startswith("bits=") else part)
        return kinds

    def features(self, picks: dict[str, str], predicted: float) -> np.ndarray:
        """[log predicted KL, share of slots per bit width / pruning kind]."""
        counts = dict.fromkeys(self.kinds, 0.0)
        for slot in self.slots:
            for kind in self._kinds(picks[slot.name]):
                counts[kind] += 1.0
        share = [counts[k] / len(self.slots) for k in self.kinds]
        return np.array([math.log(max(predicted, KL_FLOOR))] + share)

    def fit(self, samples: list[tuple[dict[str, str], float, float]]) -> None:
        """Fit on (picks, predicted KL, measured KL) triples; a no-op below ``min_points``."""
        samples = [s for s in samples if s[2] is not None and s[2] > 0]
        if len(samples) < self.min_points:
            self.model = None
            return
        from sklearn.linear_model import Ridge  # noqa: PLC0415

        x = np.stack([self.features(p, pred) for p, pred, _ in samples])
        y = np.log([m for _, _, m in samples])
        self.model = Ridge(alpha=self.alpha).fit(x, y)
        self.fitted_on = len(samples)
        self.error_before = float(np.mean(np.abs(x[:, 0] - y)))
        self.error_after = float(np.mean(np.abs(self.model.predict(x) - y)))

    def predict(self, picks: dict[str, str], predicted: float) -> float | None:
        """Corrected KL, or None when not fitted yet."""
        if self.model is None:
            return None
        return float(math.exp(self.model.predict(self.features(picks, predicted)[None])[0]))

    def to_json(self) -> dict:
        """What was fitted and how well (mean |log error| of the additive model vs corrected, in-sample)."""
        return {"regressor": "sklearn Ridge on log KL", "fitted_on": self.fitted_on,
                "mean_abs_log_error_additive": self.error_before, "mean_abs_log_error_corrected": self.error_after}
