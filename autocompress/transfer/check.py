"""Check a transfer on the target itself: measure a few close alternatives, keep the best.

Without a profile of the target, repair prices choices by the source's sensitivity at the same
role and depth. That says well *how many* bits each kind of unit can spare, and less well
*which* unit of the target should spare them: pruning changes blocks unevenly. On SmolLM2-135M
-> a copy with 6 blocks dropped and 25% of MLP channels removed, the source's cheapest block at
2 bits (block 7) made the target worse than uniform 3-bit, while block 4 or 5 at 2 bits beat it.

:func:`exchanges` lists the schedules one exchange away from the transfer: two slots of the
same size with different choices trade them, so the bytes and the mix of choices stay exactly
as repaired; they are ranked by the predicted loss change. :func:`check_transfer` measures the
transfer and the best-ranked exchanges end to end on a few calibration windows of the target
(KL to the target's own 16-bit next-token distribution, one forward pass each with cached
compressed blocks swapped in; nothing per unit, so no profile) and keeps the lowest.

Example::

    schedule = transfer_schedule(source, model, budget, check_tokens=calibration_ids)
    schedule.meta["transfer"]["check"]["candidates"]   # KL of each candidate measured
"""
from __future__ import annotations

import dataclasses
from itertools import combinations

import torch

from ..schedule import Choice, Schedule
from .sensitivity import LossTable

CHECK_WINDOW = 256  # tokens per window of the check


def exchanges(schedule: Schedule, model, budget, space, losses: LossTable, count: int = 6, *,
              memory=None) -> list[Schedule]:
    """Up to ``count`` schedules in which two slots of ``space`` swap their choices, cheapest
    predicted loss change first. Only swaps that leave the bytes as they were (the two slots
    cost the same under either choice) and fit ``budget`` are kept, so a schedule that met a
    budget exactly still does."""
    from ..compress.memory import MemoryModel, unit_bytes  # noqa: PLC0415
    from ..search.decisions import build_slots  # noqa: PLC0415

    memory = memory or MemoryModel.from_model(model)
    slots = build_slots(space, model)
    now = {s.name: schedule.units.get(s.members[0], Choice()) for s in slots}
    # every slot priced once under each choice the schedule uses (an exchange only moves those)
    cost = {(s.name, c): sum(unit_bytes(memory, u, c) for u in s.members) for s in slots for c in set(now.values())}
    loss = {(s.name, c): sum(losses.loss(u, c) for u in s.members) for s in slots for c in set(now.values())}

    ranked = []
    for a, b in combinations(slots, 2):
        ca, cb = now[a.name], now[b.name]
        if ca == cb or cost[a.name, cb] + cost[b.name, ca] != cost[a.name, ca] + cost[b.name, cb]:
            continue
        delta = loss[a.name, cb] + loss[b.name, ca] - loss[a.name, ca] - loss[b.name, cb]
        ranked.append((delta, a.name, b.name, a, b))
    ranked.sort(key=lambda m: m[:3])
    out = []
    for _, _, _, a, b in ranked:
        units = dict(schedule.units)
        for slot, choice in ((a, now[b.name]), (b, now[a.name])):
            for member in slot.members:
                if choice == Choice():
                    units.pop(member, None)
                else:
                    units[member] = choice
        candidate = dataclasses.replace(schedule, units=units)
        if budget.fits(candidate):
            out.append(candidate)
        if len(out) >= count:
            break
    return out


def check_rows(model, tokens: torch.Tensor, window: int = CHECK_WINDOW, bos: int | None = None) -> torch.Tensor:
    """``tokens`` (1-D) cut into rows of ``window`` tokens, or shorter where the model's context
    or the tokens are; each row BOS first with the tokenizer's ``bos`` id (within the context)."""
    from ..compress.calibrate import token_batch  # noqa: PLC0415

    context = getattr(model.config, "max_position_embeddings", None) or window + 1
    room = context - (bos is not None)
    return token_batch(tokens.reshape(-1), min(window, room, tokens.numel()), bos=bos)


def check_transfer(candidates: list[Schedule], model, space, rows: torch.Tensor) -> list[dict[str, float] | None]:
    """KL, loss and perplexity of each candidate on ``rows`` (calibration windows of the target,
    :func:`check_rows`), against the target's own output; None for a candidate with a choice
    outside ``space``."""
    from ..search.decisions import build_slots, schedule_picks  # noqa: PLC0415
    from ..search.measure import SwapEvaluator  # noqa: PLC0415

    slots = build_slots(space, model)
    evaluator = SwapEvaluator(model, slots, rows, rows)
    results = []
    for candidate in candidates:
        picks = schedule_picks(slots, candidate)
        measured = None if picks is None else evaluator.measure(picks)
        results.append(None if measured is None else {key: measured[key] for key in ("kl", "loss", "ppl")})
    return results


def distinct(schedules: list[Schedule]) -> list[Schedule]:
    """``schedules`` without repeats (same units and choices), first occurrence kept."""
    unique: dict[tuple, Schedule] = {}
    for schedule in schedules:
        unique.setdefault(tuple(sorted(schedule.units.items())), schedule)
    return list(unique.values())


def pick_checked(schedule: Schedule, model, budget, space, losses: LossTable, tokens: torch.Tensor, *,
                 count: int = 6, memory=None, others: list[Schedule] = (),
                 bos: int | None = None) -> tuple[Schedule, dict]:
    """The transfer, one of its :func:`exchanges` or one of ``others`` (e.g. its neighbours:
    one slot up, one down), whichever measures the lowest KL on ``tokens``; and the record for
    ``meta["transfer"]["check"]``. Only ``others`` with exactly the transfer's bytes are tried,
    so the budget stays met as exactly as repair met it. ``bos``: the tokenizer's BOS id, put
    before every window."""
    from ..compress.memory import MemoryModel  # noqa: PLC0415

    memory = memory or MemoryModel.from_model(model)
    size = memory.schedule_bytes(schedule)
    candidates = [schedule] + exchanges(schedule, model, budget, space, losses, count, memory=memory)
    candidates += [o for o in others if memory.schedule_bytes(o) == size and budget.fits(o)]
    candidates = distinct(candidates)
    rows = check_rows(model, tokens, bos=bos)
    measured = check_transfer(candidates, model, space, rows)
    scored = [(m["kl"], i) for i, m in enumerate(measured) if m is not None]
    best = min(scored)[1] if scored else 0
    record = {"tokens": int(tokens.numel()), "window": rows.shape[1] - (bos is not None), "chosen": best,
              "candidates": [{"changed": _changes(schedule, c), **({k: round(v, 6) for k, v in m.items()}
                                                                  if m is not None else {})}
                             for c, m in zip(candidates, measured)]}
    return candidates[best], record


def _changes(base: Schedule, other: Schedule) -> dict[str, dict]:
    """Units whose choice differs from ``base``, with the choice they take instead."""
    names = sorted(set(base.units) | set(other.units))
    return {n: other.units.get(n, Choice()).to_json() for n in names
            if base.units.get(n, Choice()) != other.units.get(n, Choice())}


__all__ = ["exchanges", "check_rows", "check_transfer", "distinct", "pick_checked", "CHECK_WINDOW"]
