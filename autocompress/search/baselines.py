"""The allocations a search must beat: uniform choices, and exact knapsack / greedy under the additive model.

All three read only per-slot tables: ``values[s][o]`` (predicted KL of option o of slot s)
and ``costs[s][o]`` (raw figures [bytes, weight bytes, params, seconds] relative to 16 bits,
from :meth:`~autocompress.search.cost.CostModel.slot_costs`). ``limits`` are the raw limits
minus the all-16-bit base, so a pick fits when its summed costs are <= limits everywhere.

Example::

    picks = knapsack(values, [c[:, 0] for c in costs], capacity)   # option index per slot, or None
"""
from __future__ import annotations

import math

import numpy as np


def fits(costs: list[np.ndarray], picks: list[int], limits: np.ndarray) -> bool:
    """Whether the picked options' summed raw costs are within ``limits`` (tiny float slack)."""
    total = sum(costs[s][o] for s, o in enumerate(picks))
    return bool(np.all(total <= limits + 1e-9 * np.maximum(np.abs(limits), 1.0)))


def uniform(option_count: int, costs: list[np.ndarray], limits: np.ndarray) -> list[int]:
    """Indices of the options that, given to every slot, fit the limits."""
    return [o for o in range(option_count) if fits(costs, [o] * len(costs), limits)]


def knapsack(values: list[np.ndarray], costs: list[np.ndarray], capacity: float, *,
             resolution: int = 4000, quantum: float | None = None) -> list[int] | None:
    """Exact multiple-choice knapsack: one option per slot, minimum summed value, summed cost <= capacity.

    Costs are rounded *up* to multiples of ``quantum`` (default: the feasible range over
    ``resolution``), so the answer always fits; with integer costs and ``quantum=1`` it is the
    exact optimum. Returns the option index per slot, or None when nothing fits.
    """
    lows = [float(c.min()) for c in costs]
    room = capacity - sum(lows)
    if room < -1e-9 * max(abs(capacity), 1.0):
        return None
    room = max(room, 0.0)
    if quantum is None:
        quantum = room / resolution if room > 0 else 1.0
    width = int(math.floor(room / quantum + 1e-9))
    inf = math.inf
    best = np.full(width + 1, inf)
    best[0] = 0.0  # best[w]: least value using exactly w quanta over the slots so far
    choice = np.zeros((len(costs), width + 1), dtype=np.int32)
    for s, (value, cost) in enumerate(zip(values, costs)):
        steps = np.ceil((cost - lows[s]) / quantum - 1e-9).astype(np.int64)
        new = np.full(width + 1, inf)
        for o, (v, w) in enumerate(zip(value, steps)):
            if w > width:
                continue
            shifted = np.full(width + 1, inf)
            shifted[w:] = best[: width + 1 - w] + v
            better = shifted < new
            new[better] = shifted[better]
            choice[s, better] = o
        best = new
    if not np.isfinite(best).any():
        return None
    w = int(np.argmin(best))
    picks = [0] * len(costs)
    for s in range(len(costs) - 1, -1, -1):
        o = int(choice[s, w])
        picks[s] = o
        w -= int(np.ceil((costs[s][o] - lows[s]) / quantum - 1e-9))
    return picks


def knapsack_multi(values: list[np.ndarray], costs: list[np.ndarray], limits: np.ndarray, *,
                   resolution: int = 4000) -> list[int] | None:
    """Knapsack on the tightest limited figure, tightened until every other limit holds too."""
    limited = [i for i in range(len(limits)) if np.isfinite(limits[i])]
    if not limited:
        return [int(np.argmin(v)) for v in values]
    low = sum(c.min(axis=0) for c in costs)
    high = sum(c.max(axis=0) for c in costs)
    # The tightest limit: the one leaving the smallest share of its range.
    primary = min(limited, key=lambda i: (limits[i] - low[i]) / max(high[i] - low[i], 1e-30))
    capacity = limits[primary]
    for _ in range(60):
        picks = knapsack(values, [c[:, primary] for c in costs], capacity, resolution=resolution)
        if picks is None:
            return None
        if fits(costs, picks, limits):
            return picks
        capacity = low[primary] + (capacity - low[primary]) * 0.97
    return None


def greedy(values: list[np.ndarray], costs: list[np.ndarray], limits: np.ndarray) -> list[int] | None:
    """ExLlama-style greedy: start from the cheapest options, buy the best KL drop per unit cost.

    The unit of cost is the tightest limited figure's share of its limit, summed over limits.
    """
    limited = [i for i in range(len(limits)) if np.isfinite(limits[i])]
    scale = np.zeros(len(limits))
    for i in limited:
        low = sum(float(c[:, i].min()) for c in costs)
        scale[i] = 1.0 / max(limits[i] - low, 1e-30)
    weight = [c @ scale for c in costs]
    picks = [int(np.argmin(w + 1e-12 * v)) for w, v in zip(weight, values)]
    if not fits(costs, picks, limits):
        return None
    total = sum(costs[s][o] for s, o in enumerate(picks))
    while True:
        best, best_gain = None, 0.0
        for s, (value, cost) in enumerate(zip(values, costs)):
            now = picks[s]
            for o in range(len(value)):
                drop = value[now] - value[o]
                if drop <= 0:
                    continue
                extra = max(weight[s][o] - weight[s][now], 1e-30)
                if drop / extra > best_gain and np.all(total - cost[now] + cost[o] <= limits + 1e-9 * np.abs(limits)):
                    best, best_gain = (s, o), drop / extra
        if best is None:
            return picks
        s, o = best
        total = total - costs[s][picks[s]] + costs[s][o]
        picks[s] = o
