"""The checked transfer: exchanges keep the bytes, and measuring them fixes a wrong placement."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.compress.tiny_models import random_tokens, sampled_tokens, tiny_model
from autocompress.models import LoadedModel
from autocompress.profile.run import ProfileSettings, profile_model
from autocompress.schedule import Choice, Schedule
from autocompress.transfer import transfer_schedule
from autocompress.transfer.check import exchanges
from autocompress.transfer.coordinates import model_coordinates
from autocompress.transfer.repair import no_upgrade_fits
from autocompress.transfer.sensitivity import LossTable
from space_helpers import rtn_space
from transfer_helpers import allocated_at_uniform, kl_between, memory_budget


def _budget(model, space, bits=3):
    return memory_budget(model, Schedule.uniform(model, space.quant_choice(bits)))


@pytest.fixture(scope="module")
def space():
    return rtn_space("rtn-quant-only")


@pytest.fixture(scope="module")
def source_schedule(space):
    """A tiny Llama's profile-allocated schedule at uniform-3-bit size: it saves on the last block."""
    model = tiny_model("llama", layers=4)
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, additivity=False, progress=False)
    profile = profile_model(LoadedModel(model, None, "tiny-llama", "hub"), sampled_tokens(model, 4, 64, seed=1),
                            space, settings)
    schedule = allocated_at_uniform(model, space, profile)
    assert schedule.units["model.layers.3"].bits == 2  # the premise of the test below
    return schedule


def test_exchanges_swap_two_slots_and_keep_the_bytes(space):
    model = tiny_model("qwen2", layers=5)
    budget, memory, limit = _budget(model, space)
    bits = {0: 4, 1: 3, 2: 3, 3: 3, 4: 2}
    schedule = Schedule("x", {f"model.layers.{i}": space.quant_choice(b) for i, b in bits.items()})
    found = exchanges(schedule, model, budget, space, LossTable(model_coordinates(model), {}, "prior"), count=4)
    assert len(found) == 4
    for candidate in found:
        changed = [u for u in schedule.units if candidate.units[u] != schedule.units[u]]
        assert len(changed) == 2
        a, b = changed
        assert candidate.units[a] == schedule.units[b] and candidate.units[b] == schedule.units[a]
        assert memory.schedule_bytes(candidate) == memory.schedule_bytes(schedule)
    assert len({tuple(sorted(c.units.items())) for c in found}) == 4


def test_check_moves_a_saving_the_target_cannot_afford(source_schedule, space):
    # Blocks 1 and 2 of the target write a tenth as much into the residual stream as the source's
    # did (nearly skipped blocks): on the target they are the cheap places to save, not the last
    # block where the source saved. The transfer cannot know; measuring its exchanges can.
    target = tiny_model("llama", layers=4, seed=1)
    with torch.no_grad():
        for index in (1, 2):
            target.model.layers[index].mlp.down_proj.weight.mul_(0.1)
            target.model.layers[index].self_attn.o_proj.weight.mul_(0.1)
    budget, memory, limit = _budget(target, space)
    plain = transfer_schedule(source_schedule, target, budget, space=space)
    assert plain.units["model.layers.3"].bits == 2
    checked = transfer_schedule(source_schedule, target, budget, space=space,
                                check_tokens=sampled_tokens(target, 4, 64, seed=5), check_count=4)
    check = checked.meta["transfer"]["check"]
    assert 5 <= len(check["candidates"]) <= 6 and check["tokens"] == 256  # transfer, 4 exchanges, a neighbour
    assert check["chosen"] != 0
    assert check["candidates"][check["chosen"]]["kl"] < check["candidates"][0]["kl"]
    assert checked.units["model.layers.3"].bits > 2
    assert min(checked.units[f"model.layers.{i}"].bits for i in (1, 2)) == 2
    # the same bytes as the repaired transfer, within the budget, and still no upgrade fits
    assert memory.schedule_bytes(checked) == memory.schedule_bytes(plain) <= limit
    assert no_upgrade_fits(checked, budget, space, space.units(target))
    # better on text the check never saw
    held_out = random_tokens(256, 2, 64, seed=9)
    kl_checked = kl_between(target, apply(copy.deepcopy(target), checked, progress=False), held_out)
    kl_plain = kl_between(target, apply(copy.deepcopy(target), plain, progress=False), held_out)
    assert kl_checked < kl_plain


def test_unchecked_transfer_records_no_check(source_schedule, space):
    target = tiny_model("qwen2", layers=6, seed=1)
    budget, _, _ = _budget(target, space)
    assert transfer_schedule(source_schedule, target, budget, space=space).meta["transfer"]["check"] is None
    assert Choice() not in transfer_schedule(source_schedule, target, budget, space=space).units.values()
