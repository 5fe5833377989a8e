"""Fading: structure a step will remove is scaled down to zero while distillation trains the rest.

A hard cut (heads, MLP channels or a whole block removed at once) moves the model's output a
long way, and recovery then has to find its way back. Fading takes the same structure out
smoothly instead: the step's removals are chosen first (with the very scores the operators
use), their contribution is multiplied by ``alpha``, and ``alpha`` goes from 1 to 0 over the
step's distillation while the weights that stay learn to do without them. At ``alpha`` = 0
the faded columns are zeroed in the weights, so the step's real compression then picks
exactly them (their score is 0) and removing them changes nothing. This is gradual pruning
(Zhu & Gupta's schedule of masks, NVIDIA Minitron's compress-then-distill) at the scale of
one step.

What fades: MLP channels (the down projection's input columns), key/value head groups with
their query heads (the output projection's input columns) and dropped blocks (the block's
change to the residual stream). Quantization does not fade; it is applied when the step
compresses, and recovery after that is the usual one.

Example::

    fades = plan_fades(model, step_units, rows, fingerprint, teacher)
    with fading(model, fades) as set_alpha:
        distill(model, teacher, rows, config, before_step=lambda i, n: set_alpha(linear_ramp(i, n)))
    compress_step_(model, step_units, rows, fingerprint, teacher)   # removes exactly the faded parts
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..models import adapter_for
from ..schedule import Choice, PruneScore
from .apply import channels_to_keep, heads_to_keep
from .staging import StageUnit, relative_choice, schedule_of


@dataclass
class BlockFade:
    """What one block loses in a step: MLP channels, o_proj input columns (whole heads), or all of it."""

    index: int
    channels: torch.Tensor | None = None  # down-projection input columns to remove
    head_columns: torch.Tensor | None = None  # o-projection input columns to remove
    drop: bool = False

    @property
    def empty(self) -> bool:
        """True when the block loses no structure."""
        return not self.drop and self.channels is None and self.head_columns is None


def _removed(kept: torch.Tensor, total: int) -> torch.Tensor:
    """The indices below ``total`` not in ``kept``."""
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


@torch.no_grad()
def _input_sqnorms(model: nn.Module, modules: dict[str, nn.Module], rows: torch.Tensor,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Sum over tokens of each input column squared, for ``modules``, on ``rows`` of the model as it is."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for start in range(0, rows.shape[0], batch_size):
            model(input_ids=rows[start:start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def plan_fades(model: nn.Module, units: list[StageUnit], rows: torch.Tensor | None, fingerprint: str,
               teacher: nn.Module, batch_size: int = 8) -> list[BlockFade]:
    """The structure ``units`` will remove from ``model`` as it is now, scored as the operators score it.

    Wanda scores use the inputs of the output and down projections on ``rows`` (one forward of
    the whole model); magnitude scores need no rows. Blocks whose projections are not plain
    linears (quantized at an earlier level) are left out: they are cut, not faded.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    originals = adapter.blocks(teacher)
    step = schedule_of(fingerprint, units)
    paths = list(adapter.linears.values())
    o_path, down_path = adapter.linears["o"], adapter.linears["down"]
    plans: dict[int, Choice] = {}
    for unit in units:
        if unit.index is None:
            continue
        choice, _ = step.block_plan(adapter.blocks_path, unit.index, paths)
        block = blocks[unit.index]
        if not choice.drop and not all(isinstance(block.get_submodule(p), nn.Linear) for p in (o_path, down_path)):
            continue
        plans[unit.index] = relative_choice(choice, block, originals[unit.index], model)
    wanda = {i: c for i, c in plans.items() if not c.drop and c.score is PruneScore.WANDA
             and (c.channel_ratio > 0 or c.head_ratio > 0)}
    modules = {f"{i}.{p}": blocks[i].get_submodule(p) for i in wanda for p in (o_path, down_path)}
    if modules and rows is None:
        raise ValueError("fading Wanda-scored removals needs calibration rows")
    sqnorms = _input_sqnorms(model, modules, rows, batch_size) if modules else {}

    fades = []
    for index, choice in sorted(plans.items()):
        fade = BlockFade(index, drop=choice.drop)
        block = blocks[index]
        heads = heads_to_keep(block, adapter, model.config, choice, sqnorms.get(f"{index}.{o_path}"))
        if heads is not None:
            layout, groups = heads
            heads_removed = (_removed(groups, layout.num_kv_heads)[:, None] * layout.group_size
                             + torch.arange(layout.group_size)).reshape(-1)
            fade.head_columns = (heads_removed[:, None] * layout.head_dim + torch.arange(layout.head_dim)).reshape(-1)
        channels = channels_to_keep(block, adapter, choice, sqnorms.get(f"{index}.{down_path}"))
        if channels is not None:
            fade.channels = _removed(channels, adapter.mlp_channels(block))
        if not fade.empty:
            fades.append(fade)
    return fades


def linear_ramp(step: int, steps: int, share: float = 0.75) -> float:
    """``alpha`` for distillation step ``step`` of ``steps``: 1 -> 0 over the first ``share``, then 0."""
    span = max(1, round(share * steps))
    return max(0.0, 1.0 - (step + 1) / span)


def _column_scaler(columns: torch.Tensor, alpha: list[float]):
    def scale(module, args):
        x = args[0]
        factor = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        factor[columns.to(x.device)] = alpha[0]
        return (x * factor, *args[1:])
    return scale


def _residual_scaler(alpha: list[float]):
    def scale(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, (tuple, list)) else output
        mixed = hidden + alpha[0] * (out - hidden)
        return (mixed, *output[1:]) if isinstance(output, (tuple, list)) else mixed
    return scale


@contextlib.contextmanager
def fading(model: nn.Module, fades: list[BlockFade]):
    """Scale the planned removals by a shared ``alpha`` (starts at 1); yields ``set_alpha``.

    On a normal exit the faded columns are zeroed in the weights (the state ``alpha`` = 0
    stands for) so compressing afterwards removes exactly them; a faded block runs again until
    the step drops it. The hooks go either way.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    o_path, down_path = adapter.linears["o"], adapter.linears["down"]
    alpha = [1.0]
    handles = []
    for fade in fades:
        block = blocks[fade.index]
        if fade.drop:
            handles.append(block.register_forward_hook(_residual_scaler(alpha), with_kwargs=True))
            continue
        if fade.head_columns is not None:
            handles.append(block.get_submodule(o_path).register_forward_pre_hook(_column_scaler(fade.head_columns, alpha)))
        if fade.channels is not None:
            handles.append(block.get_submodule(down_path).register_forward_pre_hook(_column_scaler(fade.channels, alpha)))

    def set_alpha(value: float) -> None:
        alpha[0] = float(value)

    try:
        yield set_alpha
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for fade in fades:
            block = blocks[fade.index]
            if fade.head_columns is not None:
                block.get_submodule(o_path).weight[:, fade.head_columns] = 0
            if fade.channels is not None:
                block.get_submodule(down_path).weight[:, fade.channels] = 0
