"""The additivity check: is the KL of "every unit at b bits" the sum of the single-unit KLs?

The search ranks candidates by that sum, so the profile measures, for each bit width, the
real KL of changing every unit at once (the same compressed units the single-unit
measurement used, chained in one forward pass over the cached block-0 inputs) and stores
both figures. A measured/predicted ratio far from 1 is what the search's learned
correction has to close. The profile feeds the compressed units to a :class:`ChainedRun` as it
measures them, so no more than one block's replacements are kept at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from ..compress.apply import DroppedBlock
from ..compress.calibrate import BlockInputs, run_block
from .artifact import AdditivityCheck, UnitProfile
from .sensitivity import Trace, swapped


class ChainedRun:
    """The model with several blocks changed at once, run as the changes arrive in block order.

    Instead of keeping every block's replacement until the end (a whole compressed model's
    worth), the hidden states go through block ``i`` as soon as a change for a later block
    arrives: only the current block's replacements are ever held. The blocks run in the same
    order on the same inputs as in one pass, so the result is the same to the bit.
    """

    def __init__(self, trace: Trace):
        self.trace = trace
        self.hidden = trace.hidden[0]
        self.next = 0  # the first block not run yet
        self.pending: dict[int, nn.Module | dict[str, nn.Module]] = {}

    def add(self, index: int, change: nn.Module | dict[str, nn.Module]) -> None:
        """Change block ``index`` (a replacement block, or linear path -> module, merged with
        the block's earlier ones); blocks before it are final from now on."""
        if index < self.next:
            raise ValueError(f"block {index} is already run; changes must come in block order")
        self._run_to(index)
        if isinstance(change, dict) and isinstance(self.pending.get(index), dict):
            self.pending[index].update(change)
        else:
            self.pending[index] = dict(change) if isinstance(change, dict) else change

    @torch.no_grad()
    def _run_to(self, stop: int) -> None:
        trace = self.trace
        for index in range(self.next, stop):
            block, change = trace.blocks[index], self.pending.pop(index, None)
            if isinstance(change, DroppedBlock):
                continue
            if isinstance(change, dict):
                with swapped(block, change):
                    self.hidden = run_block(block, BlockInputs(self.hidden, trace.kwargs), batch_size=trace.batch_size)
            else:
                self.hidden = run_block(change if change is not None else block,
                                        BlockInputs(self.hidden, trace.kwargs), batch_size=trace.batch_size)
        self.next = max(self.next, stop)

    def finish(self) -> tuple[float, float]:
        """Run the remaining blocks; mean KL and loss delta of the whole changed model."""
        self._run_to(len(self.trace.blocks))
        return self.trace.measure_final(self.hidden)


def measure_all_changed(trace: Trace, replacements: dict[int, nn.Module | dict[str, nn.Module]]) -> tuple[float, float]:
    """Mean KL and loss delta with several blocks changed at once.

    ``replacements`` maps a block index to its replacement block, or to a dict of linear
    path (inside the block) -> replacement module; other blocks stay original.
    """
    run = ChainedRun(trace)
    for index in sorted(replacements):
        run.add(index, replacements[index])
    return run.finish()


def additivity_check(trace: Trace, units: list[UnitProfile], bits: int,
                     replacements: dict[int, nn.Module | dict[str, nn.Module]] | ChainedRun,
                     label: str | None = None) -> AdditivityCheck:
    """Predicted (sum over ``units`` of their KL at ``label``, default ``bits=<bits>``) against measured;
    ``replacements`` as :func:`measure_all_changed` takes them, or a :class:`ChainedRun` fed with them."""
    label = label or f"bits={bits}"
    kl, delta = replacements.finish() if isinstance(replacements, ChainedRun) else measure_all_changed(trace, replacements)
    return AdditivityCheck(bits=bits,
                           predicted_kl=sum(u.kl[label] for u in units),
                           measured_kl=kl,
                           predicted_loss_delta=sum(u.loss_delta[label] for u in units),
                           measured_loss_delta=delta)
