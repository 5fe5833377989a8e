"""Repair: make a schedule meet a budget exactly, spending bytes where predicted loss per byte is best.

Two greedy passes over the search space's candidate choices of each unit (every bit width,
alone or with one pruning choice, as the search combines them):

* **down** while the budget is broken: take the move to a smaller choice that adds the least
  predicted loss per byte saved;
* **up** while something still fits: take the move to a larger choice that removes the most
  predicted loss per byte spent, skipping moves that would break the budget; stop when no
  improving move fits.

So the result fits and no single improving change of one unit fits any more: the budget is met
"exactly" at the granularity of the space. When no single move fits, a pair move (one slot
up, another down) that lowers the predicted loss is tried before stopping. Like exllamav3's allocator it is a few dozen lines
of plain Python, with the budget only asked ``fits(schedule)``.
"""
from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..schedule import Choice, Schedule
from .sensitivity import LossTable


def candidate_choices(space, unit_is_block: bool = True) -> list[Choice]:
    """Every choice a unit may take in ``space``: the search's options (each bit width alone or
    with one pruning choice, or ``drop``), structural ones only for blocks."""
    from ..search.decisions import space_options  # noqa: PLC0415

    return [o.choice for o in space_options(space) if unit_is_block or not o.choice.structural]


def snap(choice: Choice, candidates: list[Choice]) -> Choice:
    """The candidate closest to ``choice``: same pruning kind if offered, nearest bits (ties up)."""
    def kind(c: Choice) -> tuple:
        return (c.drop, c.pattern, c.head_ratio > 0, c.channel_ratio > 0)

    def distance(c: Choice) -> tuple:
        return (kind(c) != kind(choice), abs(c.sparsity - choice.sparsity) + abs(c.head_ratio - choice.head_ratio)
                + abs(c.channel_ratio - choice.channel_ratio), abs(c.bits - choice.bits), -c.bits)

    return min(candidates, key=distance)


def _describe_budget(budget) -> str:
    specs = getattr(budget, "specs", None)
    if specs:
        return ",".join(specs)
    for attr in ("describe", "label"):
        value = getattr(budget, attr, None)
        if value is not None:
            return value() if callable(value) else str(value)
    return str(budget)


def _budget_figures(budget, schedule: Schedule) -> str:
    """The schedule's figures against each limit, when the budget can say them."""
    limits, evaluate = getattr(budget, "limits", None), getattr(budget, "evaluate", None)
    if limits and callable(evaluate):
        figures = evaluate(schedule)
        return ", ".join(f"{limit.kind}={limit.describe(figures[limit.figure])} (limit {limit.describe(limit.value)})"
                         for limit in limits)
    return f"does not fit {_describe_budget(budget)}"


def repair(schedule: Schedule, model, budget, space, losses: LossTable, *, memory=None) -> Schedule:
    """``schedule`` changed slot by slot until ``budget.fits`` it and no improving change fits.

    The slots are the search's (:func:`~autocompress.search.decisions.build_slots`: one per
    unit, or per group of linears tied by the space); units outside them keep the schedule's
    choice. ``losses`` prices each (unit, choice). Raises :class:`UserError` when even the
    smallest option of every slot does not fit.
    """
    from ..compress.memory import MemoryModel, unit_bytes  # noqa: PLC0415
    from ..search.decisions import build_slots  # noqa: PLC0415

    memory = memory or MemoryModel.from_model(model)
    slots = build_slots(space, model)
    block_units = {f"{memory.blocks_path}.{i}" for i in range(len(memory.blocks))}
    candidates = {s.name: [o.choice for o in s.options if s.members[0] in block_units or not o.choice.structural]
                  for s in slots}
    members = {s.name: s.members for s in slots}
    current = {s.name: snap(schedule.units.get(s.members[0], Choice()), candidates[s.name]) for s in slots}
    cost, loss = {}, {}
    for name, options in candidates.items():
        for c in options:
            cost[name, c] = sum(unit_bytes(memory, u, c) for u in members[name])
            loss[name, c] = sum(losses.loss(u, c) for u in members[name])

    in_slots = {u for m in members.values() for u in m}

    def build(picks: dict[str, Choice]) -> Schedule:
        units = {k: v for k, v in schedule.units.items() if k not in in_slots}
        for name, choice in picks.items():
            if choice != Choice() and (choice.quantized or choice.structural or choice.sparsity > 0):
                units.update({u: choice for u in members[name]})
        return dataclasses.replace(schedule, units=units)

    def kept_blocks() -> int:
        return sum(1 for name, c in current.items() if name in block_units and not c.drop)

    smallest = {name: min(options, key=lambda c, n=name: (cost[n, c], loss[n, c])) for name, options in candidates.items()}
    block_slots = [n for n in smallest if n in block_units]
    if block_slots and len(block_slots) == len(block_units) and all(smallest[b].drop for b in block_slots):
        keep = min(block_slots, key=lambda b: min(cost[b, c] for c in candidates[b] if not c.drop))
        smallest[keep] = min((c for c in candidates[keep] if not c.drop), key=lambda c: cost[keep, c])
    floor = build(smallest)
    if not budget.fits(floor):
        raise UserError(f"budget {_describe_budget(budget)} is below the minimum this search space reaches on "
                        f"this model (smallest option everywhere: {_budget_figures(budget, floor)}); "
                        f"raise the budget or allow smaller choices")

    while not budget.fits(build(current)):
        best = None
        for name, options in candidates.items():
            now = current[name]
            for c in options:
                saved = cost[name, now] - cost[name, c]
                if saved <= 0 or (c.drop and not now.drop and kept_blocks() <= 1):
                    continue
                ratio = (loss[name, c] - loss[name, now]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, name, c)
        if best is None:  # cannot happen after the floor check, but never loop forever
            raise UserError(f"cannot bring the schedule within {_describe_budget(budget)}")
        current[best[1]] = best[2]

    while True:
        moves = []
        for name, options in candidates.items():
            now = current[name]
            for c in options:
                spent = cost[name, c] - cost[name, now]
                gain = loss[name, now] - loss[name, c]
                if gain > 0:
                    moves.append((gain / spent if spent > 0 else float("inf"), spent, name, c))
        moves.sort(key=lambda m: (-m[0], m[1]))
        for _, _, name, c in moves:
            before = current[name]
            current[name] = c
            if budget.fits(build(current)):
                break
            current[name] = before
        else:
            if not _swap(current, candidates, cost, loss, lambda: budget.fits(build(current))):
                break
    return build(current)


def _swap(current: dict, candidates: dict, cost: dict, loss: dict, fits, *, tries: int = 24) -> bool:
    """One improving pair move: upgrade one slot and pay for it by downgrading another, when
    the pair fits and lowers the predicted loss (greedy passes alone stop at e.g. uniform
    3 bits, where no single upgrade fits). Applies the best pair found; False if none."""
    ups = sorted(((loss[n, now] - loss[n, c], n, c) for n, now in current.items() for c in candidates[n]
                  if loss[n, c] < loss[n, now] and cost[n, c] > cost[n, now]), key=lambda m: -m[0])
    downs = sorted(((loss[n, c] - loss[n, now], n, c) for n, now in current.items() for c in candidates[n]
                    if cost[n, c] < cost[n, now]), key=lambda m: m[0])
    for gain, up_name, up in ups[:tries]:
        for added, down_name, down in downs:
            if added >= gain:
                break
            if down_name == up_name:
                continue
            before = current[up_name], current[down_name]
            current[up_name], current[down_name] = up, down
            if fits():
                return True
            current[up_name], current[down_name] = before
    return False


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
