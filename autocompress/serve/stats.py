"""Small statistics over plain lists: quantiles and means that answer NaN for no data."""
from __future__ import annotations

import math
from collections.abc import Iterable


def quantile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics; NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean; NaN when empty."""
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def finite_or_none(value: float) -> float | None:
    """``value`` for JSON: None instead of NaN or infinity."""
    return value if value is not None and math.isfinite(value) else None
