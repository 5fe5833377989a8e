"""Predicted loss of a unit under a choice, from whatever knowledge is at hand.

Repair needs, for every unit of the *target* model and every candidate choice, a number that
ranks how much the choice hurts. In order of trust it comes from

1. a profile of the target model (measured KL per probe label),
2. the source schedule's profile summary, read at the same role and relative depth,
3. the sensitivity predictor (:mod:`autocompress.transfer.predictor`),
4. a noise prior (quantization error ~ 4^-bits, pruning ~ the share removed, ends of the
   network more sensitive), scaled to agree with whatever was known.

A choice that quantizes *and* prunes is priced as the sum of its two single-axis labels (the
additive model the profile measures), ``bits=16`` with no pruning costs nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..schedule import Choice, SparsityPattern, role_bits_label
from ..search.space import label_bits
from .coordinates import BLOCK_ROLE, UnitCoordinates

# Roles that are one fused linear in some families and several in others.
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
SPLIT = {part: fused for fused, parts in FUSED.items() for part in parts}


def choice_labels(choice: Choice) -> list[str]:
    """The probe labels whose KLs add up to ``choice`` (``bits=3/g128``, ``2:4``, ``heads=0.25``, ``drop``).

    A profile of a space with one group size labels its widths without it (``bits=3``);
    :meth:`LossTable.label_kl` falls back to that form.
    """
    if choice.drop:
        return ["drop"]
    group = "ch" if choice.group_size is None else choice.group_size
    mix = f":{role_bits_label(choice.role_bits)}" if choice.role_bits else ""
    labels = [f"bits={choice.bits}/g{group}{mix}"] if choice.quantized else []
    if choice.pattern is SparsityPattern.TWO_FOUR:
        labels.append("2:4")
    elif choice.pattern is SparsityPattern.UNSTRUCTURED:
        labels.append(f"sparsity={choice.sparsity:g}")
    if choice.head_ratio > 0:
        labels.append(f"heads={choice.head_ratio:g}")
    if choice.channel_ratio > 0:
        labels.append(f"channels={choice.channel_ratio:g}")
    return labels


def _group(label: str) -> str | None:
    return label.split("/", 1)[1] if "/" in label else None


def _end_weight(depth: float) -> float:
    # First and last blocks are the sensitive ones in every model we measured (SmolLM2: blocks 0 and 29).
    return 1.0 + 2.0 * math.exp(-10.0 * depth) + 2.0 * math.exp(-10.0 * (1.0 - depth))


def prior_kl(label: str, coords: UnitCoordinates) -> float:
    """A model-free guess of the KL of one probe label on one unit (only its ratios matter)."""
    kind, _, value = label.partition("=")
    size = coords.relative_size * _end_weight(coords.relative_depth)
    if kind == "bits":
        return size * 256.0 * 4.0 ** (-label_bits(label))  # quantization noise power ~ 4^-bits; 1 at 4 bits
    if kind == "sparsity":
        return size * 4.0 * float(value)
    if label == "2:4":
        return size * 3.0
    if kind == "heads":
        return size * 12.0 * float(value)
    if kind == "channels":
        return size * 8.0 * float(value)
    if label == "drop":
        return size * 24.0
    raise ValueError(f"unknown probe label {label!r}")


@dataclass
class LossTable:
    """Per-unit KL by probe label (possibly partial) plus the prior for labels nobody measured.

    ``source`` says where the numbers came from (``profile``, ``source-profile``, ``predictor``,
    ``prior``), for the transfer report.
    """

    coordinates: dict[str, UnitCoordinates]
    kl: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "prior"
    prior_weight: dict[str, float] = field(default_factory=dict)  # unit -> multiplier of the prior
    _scale: float | None = None

    def scale(self) -> float:
        """Median ratio of known KL to the prior: brings prior-only labels to the known units' level."""
        if self._scale is None:
            ratios = sorted(v / prior_kl(label, self.coordinates[name])
                            for name, labels in self.kl.items() if name in self.coordinates
                            for label, v in labels.items() if v > 0 and math.isfinite(v))
            self._scale = ratios[len(ratios) // 2] if ratios else 1.0
        return self._scale

    def label_kl(self, unit: str, label: str) -> float:
        """KL of ``label`` on ``unit``: known, else interpolated over bits, else the scaled prior."""
        known = self.kl.get(unit, {})
        value = known.get(label)
        if value is None and "/" in label:  # a profile of a one-group-size space: ``bits=3``
            value = known.get(label.split("/", 1)[0])
        if value is not None and math.isfinite(value):
            return max(value, 0.0)
        if label.startswith("bits="):
            group = _group(label)
            estimate = _bits_estimate({k: v for k, v in known.items() if _group(k) in (None, group)},
                                      label_bits(label))
            if estimate is not None:
                return estimate
        return self.scale() * self.prior_weight.get(unit, 1.0) * prior_kl(label, self.coordinates[unit])

    def loss(self, unit: str, choice: Choice) -> float:
        """Predicted KL of ``unit`` under ``choice`` (additive over the choice's labels)."""
        return sum(self.label_kl(unit, label) for label in choice_labels(choice))


def _bits_estimate(known: dict[str, float], bits: int) -> float | None:
    # log KL is close to linear in bits (about x4 per bit); fit through the nearest measured widths.
    points = sorted((label_bits(k), math.log(v)) for k, v in known.items()
                    if k.startswith("bits=") and ":" not in k and v is not None and v > 0 and math.isfinite(v))
    if not points:
        return None
    if len(points) == 1:
        b, lv = points[0]
        return math.exp(lv + (b - bits) * math.log(4.0))
    lower = [p for p in points if p[0] <= bits]
    upper = [p for p in points if p[0] >= bits]
    (b0, l0), (b1, l1) = (lower[-1], upper[0]) if lower and upper else (points[:2] if not lower else points[-2:])
    if b0 == b1:
        return math.exp(l0)
    slope = (l1 - l0) / (b1 - b0)
    return math.exp(l0 + slope * (bits - b0))


def from_profile(profile, coordinates: dict[str, UnitCoordinates]) -> LossTable:
    """The target model's own measurements."""
    kl = {u.name: {label: v for label, v in u.kl.items() if v is not None} for u in profile.units}
    return LossTable(coordinates, {k: v for k, v in kl.items() if k in coordinates}, "profile")


def _role_candidates(role: str, entries: list[dict]) -> tuple[list[dict], float]:
    """Summary entries standing in for ``role`` and the factor their KL is scaled by."""
    same = [e for e in entries if e["role"] == role]
    if same:
        return same, 1.0
    if role in FUSED:
        parts = [e for e in entries if e["role"] in FUSED[role]]
        if parts:
            return parts, float(len(FUSED[role]))  # the fused linear carries all its parts
    if role in SPLIT:
        fused = [e for e in entries if e["role"] == SPLIT[role]]
        if fused:
            return fused, 1.0 / len(FUSED[SPLIT[role]])
    if role == BLOCK_ROLE:
        linears = [e for e in entries if e["role"] not in (BLOCK_ROLE, "head")]
        if linears:
            roles = {e["role"] for e in linears}
            return linears, float(len(roles))  # a block is roughly the sum of its linears
    blocks = [e for e in entries if e["role"] == BLOCK_ROLE]
    return blocks, 1.0 / 7.0 if blocks else 1.0


def interpolate_over_depth(points: list[tuple[float, float]], depth: float) -> float:
    """Linear interpolation of (relative depth, value) points at ``depth`` (flat beyond the ends);
    points at the same depth are averaged."""
    merged: dict[float, list[float]] = {}
    for d, v in points:
        merged.setdefault(round(d, 9), []).append(v)
    xs = sorted(merged)
    ys = [sum(merged[x]) / len(merged[x]) for x in xs]
    if depth <= xs[0]:
        return ys[0]
    if depth >= xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= depth <= x1:
            t = (depth - x0) / (x1 - x0) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0)
    return ys[-1]


def _summary_size(entry: dict, role: str) -> float:
    # A same-role source unit's KL is read per unit of its own relative size (a SmolLM2 k_proj is
    # a fifth of the mean linear, its KL is not that of a mean-sized unit); summaries written
    # before sizes were stored, and cross-role stand-ins (scaled by their factor), count as size 1.
    size = entry.get("relative_size", 1.0) if entry["role"] == role else 1.0
    return size if isinstance(size, (int, float)) and size > 0 else 1.0


def from_summary(summary: dict, coordinates: dict[str, UnitCoordinates], units: list[str]) -> LossTable:
    """The source model's normalised KL read at each target unit's role and relative depth.

    Interpolation is in log KL (sensitivities span orders of magnitude) per unit of the source
    unit's relative size, scaled by the target unit's relative size: a unit twice the mean holds
    twice the weights that get perturbed.
    """
    entries = summary.get("units", [])
    kl: dict[str, dict[str, float]] = {}
    for name in units:
        coords = coordinates[name]
        candidates, factor = _role_candidates(coords.role, entries)
        if not candidates:
            continue
        labels = {label for e in candidates for label, v in e["kl"].items() if v is not None and v > 0}
        out = {}
        for label in labels:
            points = [(e["relative_depth"], math.log(e["kl"][label] / _summary_size(e, coords.role)))
                      for e in candidates if e["kl"].get(label) is not None and e["kl"][label] > 0]
            out[label] = factor * coords.relative_size * math.exp(interpolate_over_depth(points, coords.relative_depth))
        kl[name] = out
    return LossTable(coordinates, kl, "source-profile")


def from_choices(mapped: dict[str, Choice], coordinates: dict[str, UnitCoordinates]) -> LossTable:
    """Sensitivity implied by the source's own allocation, when nothing was measured.

    A greedy allocation stops where every unit's next bit buys the same loss per byte. Under
    the prior's 4^-bits noise model that means sensitivity ~ 4^bits: a unit the source kept at
    one more bit was about four times as sensitive. Pricing the target this way keeps the
    source's relative allocation while repair moves the whole schedule to the new budget.
    """
    weights = {}
    for name, choice in mapped.items():
        if name not in coordinates:
            continue
        bits = 1 if choice.drop else min(choice.bits, 8)  # above 8 bits the noise model says nothing
        weights[name] = 4.0 ** (bits - 4) / _end_weight(coordinates[name].relative_depth)
    return LossTable(coordinates, {}, "source-choices", weights)


def from_predictor(predictor, model, coordinates: dict[str, UnitCoordinates], units: list[str], labels_choices,
                   proxies: dict[str, dict[str, float]] | None = None) -> LossTable:
    """The sensitivity predictor's estimate for each (unit, probe label) of the target."""
    rows = []
    for name in units:
        for label, choice in labels_choices:
            rows.append((name, label, choice))
    predictions = predictor.predict_units(
        [(coordinates[n], choice, (proxies or {}).get(n, {})) for n, _, choice in rows])
    kl: dict[str, dict[str, float]] = {}
    for (name, label, _), (mean, _std) in zip(rows, predictions):
        kl.setdefault(name, {})[label] = math.exp(mean)
    return LossTable(coordinates, kl, "predictor")


__all__ = ["LossTable", "choice_labels", "prior_kl", "from_profile", "from_summary", "from_predictor", "from_choices",
           "interpolate_over_depth", "FUSED", "SPLIT"]
