"""Sensitivity of the units outside the decoder blocks: the token embedding (a tied head with
it) and an untied output head.

Such a unit touches the first and the last step of the model at once, so there is no cached
input to start from: each choice costs one full forward pass over the measured rows, against
the original's log-probabilities kept in 16 bits. There are only a handful of choices.

Example::

    units = measure_embedding_units(model, rows, load_space("default"))
    units[0].kl["embed:bits=6/g64"]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.prune import set_submodule
from ..compress.quant_embedding import embedding_replacements
from ..search.decisions import embedding_slots
from .artifact import UnitProfile


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def measure_embedding_units(model: nn.Module, rows: torch.Tensor, space, *, batch_size: int = 8,
                            advance=None) -> list[UnitProfile]:
    """One :class:`UnitProfile` per embedding or untied-head unit of ``space``: mean KL to the
    original's next-token distribution and loss change on ``rows`` [n, seq] for each choice."""
    slots = embedding_slots(space, model)
    if not slots:
        return []
    batches = rows.split(batch_size)
    reference = [_log_probs(model, batch).to(torch.float16) for batch in batches]
    base_nll = [-ref.float().gather(-1, batch[:, 1:, None]).sum().item() for ref, batch in zip(reference, batches)]
    count = sum(batch[:, 1:].numel() for batch in batches)
    units = []
    for slot in slots:
        name = slot.name
        original = model.get_submodule(name)
        weight = getattr(original, "weight", None)
        unit = UnitProfile(name=name, block=-1, role="head" if slot.name.endswith("lm_head") else "embedding",
                           relative_depth=0.0, parameters=int(weight.numel()) if weight is not None else 0)
        for option in slot.options:
            if not option.choice.quantized:
                continue
            replacements = embedding_replacements(model, name, option.choice)
            kept = {path: model.get_submodule(path) for path in replacements}
            try:
                for path, module in replacements.items():
                    set_submodule(model, path, module)
                kl_sum, nll_sum = 0.0, 0.0
                for batch, ref in zip(batches, reference):
                    log_probs = _log_probs(model, batch)
                    kl_sum += F.kl_div(log_probs, ref.float(), log_target=True, reduction="sum").item()
                    nll_sum += -log_probs.gather(-1, batch[:, 1:, None]).sum().item()
            finally:
                for path, module in kept.items():
                    set_submodule(model, path, module)
            unit.kl[option.label] = max(kl_sum / count, 0.0)
            unit.loss_delta[option.label] = (nll_sum - sum(base_nll)) / count
            if advance is not None:
                advance()
        units.append(unit)
    return units
