"""Shared by the transfer tests: KL between two models, and a budget at a schedule's exact size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autocompress.compress.memory import MemoryModel
from autocompress.search.budget import Budget


def kl_between(reference, model, tokens) -> float:
    """Mean KL(reference || model) per position on token rows."""
    with torch.no_grad():
        p = F.log_softmax(reference(tokens).logits.float(), -1)
        q = F.log_softmax(model(tokens).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def memory_budget(model, schedule) -> tuple[Budget, MemoryModel, int]:
    """A memory budget of exactly ``schedule``'s bytes on ``model``, its memory model and the limit."""
    memory = MemoryModel.from_model(model)
    limit = memory.schedule_bytes(schedule)
    return Budget.parse([f"memory={limit}b"], memory), memory, limit


def allocated_at_uniform(model, space, profile, bits: int = 3):
    """``profile``'s allocation at the size of uniform ``bits``-bit (repair from uniform), described
    with model-agnostic coordinates: a source schedule to transfer."""
    from autocompress.schedule import Schedule
    from autocompress.transfer import describe, repair
    from autocompress.transfer.coordinates import model_coordinates
    from autocompress.transfer.sensitivity import from_profile

    uniform = Schedule.uniform(model, space.quant_choice(bits))
    budget, _, _ = memory_budget(model, uniform)
    return describe(repair(uniform, model, budget, space, from_profile(profile, model_coordinates(model))),
                    model, profile)
