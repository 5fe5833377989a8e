"""Where trials come from besides the sampler: baselines, warm starts, and local moves.

* baselines: the uniform options that fit (best predicted first), the exact knapsack and
  the greedy allocation under the additive model (:mod:`.baselines`);
* warm starts: schedules transferred from another model (:mod:`autocompress.transfer`);
* local moves: the most promising untried neighbour of the best measured trial.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .collect import _measured_samples
from .objective import Correction

if TYPE_CHECKING:
    from .study import Context

def uniform_fits(ctx: Context, limits: np.ndarray) -> list[tuple[str, dict[str, str]]]:
    """Uniform baselines that fit, best predicted first: one option for every block, combined
    with each option of the embedding and head slots (``bits=4+embed:bits=8/g128``)."""
    import itertools  # noqa: PLC0415

    from . import baselines  # noqa: PLC0415

    index_of = {slot.name: i for i, slot in enumerate(ctx.slots)}
    blocks = [s for s in ctx.slots if s.block >= 0]
    extra = [s for s in ctx.slots if s.block < 0]
    if not blocks:
        return []
    labels = [o.label for o in blocks[0].options]
    if any([o.label for o in s.options] != labels for s in blocks):
        return []
    fits = []
    for combo in itertools.product(*[range(len(s.options)) for s in extra]):
        picks = [0] * len(ctx.slots)
        for slot, option in zip(extra, combo):
            picks[index_of[slot.name]] = option
        for option in range(len(labels)):
            if labels[option] == "drop":  # dropping every block is no model
                continue
            for slot in blocks:
                picks[index_of[slot.name]] = option
            if baselines.fits(ctx.tables, picks, limits):
                name = "+".join([labels[option]] + [s.options[o].label for s, o in zip(extra, combo)])
                fits.append((sum(v[i] for v, i in zip(ctx.values, picks)), name, ctx.label_picks(list(picks))))
    fits.sort(key=lambda item: item[0])
    return [(name, picks) for _, name, picks in fits]


def baseline_picks(ctx: Context) -> list[tuple[list[str], dict[str, str]]]:
    """(sources, picks) of the baselines: best-predicted uniform fits, knapsack, greedy; equal picks merged."""
    from . import baselines  # noqa: PLC0415

    limits = ctx.budget.raw_limits() - ctx.base
    out: list[tuple[str, dict[str, str]]] = []
    out += [(f"uniform:{name}", picks) for name, picks in uniform_fits(ctx, limits)[: ctx.settings.uniform_baselines]]
    for name, picks in (("knapsack", baselines.knapsack_multi(ctx.values, ctx.tables, limits)),
                        ("greedy", baselines.greedy(ctx.values, ctx.tables, limits))):
        if picks is not None:
            out.append((name, ctx.label_picks(picks)))
    unique: dict[tuple, tuple[list[str], dict[str, str]]] = {}
    for source, picks in out:
        unique.setdefault(tuple(sorted(picks.items())), ([], picks))[0].append(source)
    return [(sources, picks) for sources, picks in unique.values()]


def warm_start_picks(ctx: Context) -> tuple[list[dict[str, str]], list[str]]:
    """Picks from ``--warm-start`` schedules (the transfer module), and notes on what was skipped."""
    try:
        from ..transfer import warm_start_schedules  # noqa: PLC0415
    except ImportError:
        raise UserError("--warm-start needs autocompress.transfer, which this installation lacks") from None
    from .decisions import schedule_picks  # noqa: PLC0415

    schedules = warm_start_schedules(ctx.settings.warm_start, ctx.model, ctx.space, ctx.budget, profile=ctx.profile)
    picks_list, notes = [], []
    for number, schedule in enumerate(schedules):
        picks = schedule_picks(ctx.slots, schedule)
        if picks is not None:
            picks_list.append(picks)
        else:
            notes.append(f"warm-start schedule {number} uses choices outside this space; skipped")
    return picks_list, notes


def local_move(ctx: Context, study, correction: Correction, rng, candidates: int = 400) -> bool:
    """Enqueue the most promising untried feasible neighbour of the best measured trial (source ``local``).

    Neighbours change one to three slots; the learned correction (the additive model until it
    is fitted) ranks them. This is where measured interactions, which the additive model and
    hence the knapsack cannot see, get exploited. Returns whether a trial was enqueued.
    """
    from optuna.trial import TrialState  # noqa: PLC0415

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    measured = [t for t in done if t.user_attrs.get("record", {}).get("measure_complete")
                and t.user_attrs["record"]["feasible"]]
    if not measured:
        return False
    best = min(measured, key=lambda t: t.user_attrs["record"]["measured_kl"])
    tried = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)}
    correction.fit(_measured_samples(study))
    start = ctx.index_picks(best.params)
    limits = ctx.budget.raw_limits()
    ranked = []
    for _ in range(candidates):
        picks = list(start)
        for slot in rng.choice(len(picks), size=int(rng.integers(1, min(3, len(picks)) + 1)), replace=False):
            picks[slot] = int(rng.integers(len(ctx.slots[slot].options)))
        raw = ctx.base + sum(table[i] for table, i in zip(ctx.tables, picks))
        if np.any(raw > limits + 1e-9 * np.abs(limits)):
            continue
        labels = ctx.label_picks(picks)
        if tuple(sorted(labels.items())) in tried:
            continue
        predicted = ctx.predictor.predict(labels)
        corrected = correction.predict(labels, predicted)
        ranked.append((corrected if corrected is not None else predicted, labels))
    if not ranked:
        return False
    study.enqueue_trial(min(ranked, key=lambda r: r[0])[1], user_attrs={"source": "local"})
    return True
