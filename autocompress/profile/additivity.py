"""The additivity check: is the KL of "every unit at b bits" the sum of the single-unit KLs?

The search ranks candidates by that sum, so the profile measures, for each bit width, the
real KL of changing every unit at once (the same compressed units the single-unit
measurement used, chained in one forward pass over the cached block-0 inputs) and stores
both figures. A measured/predicted ratio far from 1 is what the search's learned
correction has to close.
"""
from __future__ import annotations

import torch
from torch import nn

from ..compress.apply import DroppedBlock
from ..compress.calibrate import BlockInputs, run_block
from .artifact import AdditivityCheck, UnitProfile
from .sensitivity import Trace, swapped


@torch.no_grad()
def measure_all_changed(trace: Trace, replacements: dict[int, nn.Module | dict[str, nn.Module]]) -> tuple[float, float]:
    """Mean KL and loss delta with several blocks changed at once.

    ``replacements`` maps a block index to its replacement block, or to a dict of linear
    path (inside the block) -> replacement module; other blocks stay original.
    """
    hidden = trace.hidden[0]
    for index, block in enumerate(trace.blocks):
        change = replacements.get(index)
        if isinstance(change, DroppedBlock):
            continue
        if isinstance(change, dict):
            with swapped(block, change):
                hidden = run_block(block, BlockInputs(hidden, trace.kwargs), batch_size=trace.batch_size)
        else:
            hidden = run_block(change if change is not None else block, BlockInputs(hidden, trace.kwargs),
                               batch_size=trace.batch_size)
    return trace.measure_final(hidden)


def additivity_check(trace: Trace, units: list[UnitProfile], bits: int,
                     replacements: dict[int, nn.Module | dict[str, nn.Module]], label: str | None = None) -> AdditivityCheck:
    """Predicted (sum over ``units`` of their KL at ``label``, default ``bits=<bits>``) against measured."""
    label = label or f"bits={bits}"
    kl, delta = measure_all_changed(trace, replacements)
    return AdditivityCheck(bits=bits,
                           predicted_kl=sum(u.kl[label] for u in units),
                           measured_kl=kl,
                           predicted_loss_delta=sum(u.loss_delta[label] for u in units),
                           measured_loss_delta=delta)
