"""Repair: make a schedule meet a budget exactly, spending bytes where predicted loss per byte is best.

Two greedy passes over the search space's candidate choices of each unit (every bit width,
alone or with one pruning choice, as the search combines them):

* **down** while the budget is broken: take the move to a smaller choice that adds the least
  predicted loss per byte saved;
* **up** while something still fits: take the move to a larger choice that removes the most
  predicted loss per byte spent, skipping moves that would break the budget; stop when no
  improving move fits.

So the result fits and no single improving change of one unit fits any more: the budget is met
"exactly" at the granularity of the space. Like exllamav3's allocator it is a few dozen lines
of plain Python, with the budget only asked ``fits(schedule)``.
"""
from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..schedule import Choice, Schedule
from .sensitivity import LossTable


def candidate_choices(space, unit_is_block: bool = True) -> list[Choice]:
    """Every choice a unit may take in ``space``: each bit width alone or with one pruning choice."""
    out = []
    prunes = [c for _, c in space.prune_choices() if unit_is_block or not c.structural]
    for bits in space.bits:
        quant = space.quant_choice(bits) if bits < 16 else Choice()
        out.append(quant)
        for prune in prunes:
            if prune.drop:
                continue
            out.append(dataclasses.replace(quant, sparsity=prune.sparsity, pattern=prune.pattern,
                                           head_ratio=prune.head_ratio, channel_ratio=prune.channel_ratio))
    if unit_is_block and space.drop:
        out.append(Choice(drop=True))
    return out


def snap(choice: Choice, candidates: list[Choice]) -> Choice:
    """The candidate closest to ``choice``: same pruning kind if offered, nearest bits (ties up)."""
    def kind(c: Choice) -> tuple:
        return (c.drop, c.pattern, c.head_ratio > 0, c.channel_ratio > 0)

    def distance(c: Choice) -> tuple:
        return (kind(c) != kind(choice), abs(c.sparsity - choice.sparsity) + abs(c.head_ratio - choice.head_ratio)
                + abs(c.channel_ratio - choice.channel_ratio), abs(c.bits - choice.bits), -c.bits)

    return min(candidates, key=distance)


def _describe_budget(budget) -> str:
    for attr in ("describe", "label"):
        value = getattr(budget, attr, None)
        if value is not None:
            return value() if callable(value) else str(value)
    return str(budget)


def _budget_violation(budget, schedule: Schedule) -> str:
    violations = getattr(budget, "violations", None)
    if callable(violations):
        found = violations(schedule)
        if isinstance(found, dict):
            return "; ".join(f"{k}: {v}" for k, v in found.items())
        return "; ".join(str(v) for v in found) if not isinstance(found, str) else found
    return f"does not fit {_describe_budget(budget)}"


def repair(schedule: Schedule, model, budget, space, losses: LossTable, *, units: list[str] | None = None,
           memory=None) -> Schedule:
    """``schedule`` changed unit by unit until ``budget.fits`` it and no improving change fits.

    ``units`` are the units repair may change (default: the space's units of ``model``); the
    others keep the schedule's choice. ``losses`` prices each (unit, choice). Raises
    :class:`UserError` when even the smallest choice of every unit does not fit.
    """
    from ..compress.memory import MemoryModel, unit_bytes  # noqa: PLC0415

    memory = memory or MemoryModel.from_model(model)
    units = units if units is not None else space.units(model)
    block_units = {f"{memory.blocks_path}.{i}" for i in range(len(memory.blocks))}
    candidates = {u: candidate_choices(space, u in block_units) for u in units}
    current = dict(schedule.units)
    for u in units:
        current[u] = snap(current.get(u, Choice()), candidates[u])

    cost = {}
    loss = {}
    for u in units:
        for c in candidates[u]:
            cost[u, c] = unit_bytes(memory, u, c)
            loss[u, c] = losses.loss(u, c)

    def build() -> Schedule:
        return dataclasses.replace(schedule, units={k: v for k, v in current.items() if v != Choice()
                                                    or k not in units})

    def kept_blocks() -> int:
        return sum(1 for b in block_units if not current.get(b, Choice()).drop)

    smallest = dict(current)
    for u in units:
        smallest[u] = min(candidates[u], key=lambda c: (cost[u, c], loss[u, c]))
    if block_units and all(smallest.get(b, Choice()).drop for b in block_units):
        keep = min(block_units & set(units), key=lambda b: min(cost[b, c] for c in candidates[b] if not c.drop))
        smallest[keep] = min((c for c in candidates[keep] if not c.drop), key=lambda c: cost[keep, c])
    floor = dataclasses.replace(schedule, units=smallest)
    if not budget.fits(floor):
        raise UserError(f"budget {_describe_budget(budget)} is below the minimum this search space reaches on "
                        f"this model (smallest choice everywhere: {_budget_violation(budget, floor)}); "
                        f"raise the budget or allow smaller choices")

    while not budget.fits(build()):
        best = None
        for u in units:
            now = current[u]
            for c in candidates[u]:
                saved = cost[u, now] - cost[u, c]
                if saved <= 0 or (c.drop and not now.drop and kept_blocks() <= 1):
                    continue
                ratio = (loss[u, c] - loss[u, now]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, u, c)
        if best is None:  # cannot happen after the floor check, but never loop forever
            raise UserError(f"cannot bring the schedule within {_describe_budget(budget)}")
        current[best[1]] = best[2]

    while True:
        moves = []
        for u in units:
            now = current[u]
            for c in candidates[u]:
                spent = cost[u, c] - cost[u, now]
                gain = loss[u, now] - loss[u, c]
                if gain > 0:
                    moves.append((gain / spent if spent > 0 else float("inf"), spent, u, c))
        moves.sort(key=lambda m: (-m[0], m[1]))
        for _, _, u, c in moves:
            before = current[u]
            current[u] = c
            if budget.fits(build()):
                break
            current[u] = before
        else:
            break
    return build()


def no_upgrade_fits(schedule: Schedule, budget, space, units: list[str]) -> bool:
    """Whether no unit of ``units`` can move one bit width up in ``space`` and still fit (a check for tests)."""
    bits = sorted(space.bits)
    for u in units:
        now = schedule.units.get(u, Choice())
        if now.drop or now.bits == bits[-1]:
            continue
        higher = next(b for b in bits if b > now.bits)
        up = dataclasses.replace(now, bits=higher) if higher < 16 else dataclasses.replace(now, bits=16)
        trial = dataclasses.replace(schedule, units={**schedule.units, u: up})
        if budget.fits(trial):
            return False
    return True


__all__ = ["repair", "candidate_choices", "snap", "no_upgrade_fits"]
