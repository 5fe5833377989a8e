"""Mixed blocks: some roles of a block at more bits (``Choice.role_bits``, the space's ``mixes``)."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel, stored_bytes
from autocompress.compress.saving import load_compressed, save_compressed
from autocompress.compress.staging import level_choice
from autocompress.compress.storage import round_to_storage
from autocompress.errors import UserError
from autocompress.models import adapter_for, model_fingerprint
from autocompress.schedule import Choice, QuantMethod, Schedule
from autocompress.search.decisions import build_slots, to_schedule
from autocompress.search.measure import SwapEvaluator
from autocompress.search.space import space_from_dict
from tiny import random_tokens, tiny_model

GPTQ = QuantMethod.GPTQ
MIXED = Choice(bits=4, group_size=32, method=GPTQ, act_order=True, role_bits=(("down", 5), ("v", 6)))


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_role_bits_resolve_per_role_and_round_trip_through_json():
    assert MIXED.for_role("v").bits == 6 and MIXED.for_role("down").bits == 5 and MIXED.for_role("q").bits == 4
    assert all(not MIXED.for_role(r).role_bits for r in ("q", "v"))
    assert [c.bits for c in MIXED.linear_variants()] == [4, 5, 6]
    data = MIXED.to_json()
    assert data["role_bits"] == {"down": 5, "v": 6}
    assert Choice.from_json(data) == MIXED
    assert "role_bits" not in Choice(bits=4).to_json()  # older files read and write the same
    # a linear-level override is explicit: the block's role widths no longer apply to it
    assert MIXED.with_linear(Choice(bits=8)).for_role("v").bits == 8


@pytest.mark.parametrize("data, words", [
    ({"bits": 4, "role_bits": {"value": 6}}, "roles are"),
    ({"bits": 4, "role_bits": {"v": 7}}, "must be one of"),
    ({"bits": 16, "role_bits": {"v": 6}}, "needs a quantizing choice"),
    ({"bits": 4, "role_bits": ["v", 6]}, "mapping of role to bit width"),
])
def test_bad_role_bits_are_one_line(data, words):
    with pytest.raises(UserError) as err:
        Choice.from_json(data)
    assert words in _one_line(err)


def test_role_bits_belong_to_a_block_not_a_linear():
    model = tiny_model("llama")
    schedule = Schedule(model_fingerprint(model), {"model.layers.0.self_attn.v_proj": MIXED})
    with pytest.raises(UserError) as err:
        schedule.validate(model)
    assert "role_bits can only be set on a block" in _one_line(err)


def test_space_mixes_add_one_option_per_width_below_8():
    space = space_from_dict({"name": "m", "bits": [3, 4, 6, 8, 16], "group_size": [32, 64], "method": "gptq",
                             "act_order": True, "mixes": [{"v": 2, "down": 1}]}, "t")
    labels = dict(space.quant_choices())
    assert labels["bits=4/g32:down5,v6"] == MIXED
    assert labels["bits=3/g64:down4,v5"].role_bits == (("down", 4), ("v", 5))
    assert labels["bits=6/g64:down8,v8"].role_bits == (("down", 8), ("v", 8))  # 7 is not packable: 8
    assert not any(label.startswith("bits=8/") and ":" in label for label in labels)
    assert space.to_json()["mixes"] == [{"down": 1, "v": 2}]
    assert space_from_dict(space.to_json(), "again") == space


@pytest.mark.parametrize("extra, words", [
    ({"mixes": [{"value": 1}]}, "mappings of role to extra bits"),
    ({"mixes": [{"v": 0}]}, "mappings of role to extra bits"),
    ({"mixes": {"v": 1}}, "mappings of role to extra bits"),
    ({"mixes": [{"v": 1}], "granularity": "linear"}, "mixes are block options"),
    ({"mixes": [{"v": 1}], "gguf": ["Q4_K"], "bits": [16]}, "a gguf space names its types"),
])
def test_bad_mixes_are_one_line(extra, words):
    with pytest.raises(UserError) as err:
        space_from_dict({"name": "m", "bits": [4, 16], **extra}, "t.yaml")
    assert words in _one_line(err)


def test_a_gradual_step_never_lowers_a_role_below_the_block():
    step = level_choice(Choice(bits=3, group_size=32, role_bits=(("v", 5),)), 1, 3)
    assert step.bits > 3 and dict(step.role_bits)["v"] >= step.bits
    first = level_choice(MIXED, 0, 3)
    assert not first.quantized and not first.role_bits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_mixed_block_ships_what_the_search_measured_with_exact_bytes(family, tmp_path):
    model = tiny_model(family)
    round_to_storage(model)
    space = space_from_dict({"name": "m", "bits": [4, 16], "group_size": [32], "method": "gptq", "act_order": True,
                             "sparsity": [0.5], "mixes": [{"v": 2, "down": 1}]}, "t")
    slots = build_slots(space, model)
    calibration = random_tokens(8 * 64, seed=1).view(8, 64)
    holdout = random_tokens(4 * 64, seed=2).view(4, 64)
    picks = {"model.layers.0": "bits=4:down5,v6", "model.layers.1": "bits=4:down5,v6+sparsity=0.5",
             "model.layers.2": "bits=4"}
    evaluator = SwapEvaluator(model, slots, holdout, calibration)
    seen, logits = [], evaluator._logits
    evaluator._logits = lambda batch: seen.append(logits(batch)) or seen[-1]
    plain = evaluator.measure({**picks, "model.layers.0": "bits=4", "model.layers.1": "bits=4+sparsity=0.5"})
    seen.clear()
    mixed = evaluator.measure(picks)
    assert mixed["kl"] < plain["kl"]  # more bits where it matters: closer to the original
    schedule = to_schedule(slots, picks, model_fingerprint(model))
    assert schedule.units["model.layers.0"].role_bits == (("down", 5), ("v", 6))
    shipped = apply(copy.deepcopy(model), schedule, calibration, progress=False)
    adapter = adapter_for(shipped)
    block = adapter.blocks(shipped)[0]
    assert {role: block.get_submodule(path).bits for role, path in adapter.linears.items()} == \
        {"q": 4, "k": 4, "v": 6, "o": 4, "gate": 4, "up": 4, "down": 5}
    with torch.no_grad():
        got = [shipped(input_ids=b, use_cache=False).logits[:, :-1].float() for b in holdout.split(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, seen))
    predicted = MemoryModel.from_model(model).schedule_bytes(schedule)
    assert stored_bytes(shipped) == predicted
    out = save_compressed(shipped, None, schedule, tmp_path / "m")
    loaded, _ = load_compressed(out)
    assert Schedule.load(out / "schedule.json").units["model.layers.0"] == schedule.units["model.layers.0"]
    with torch.no_grad():
        again = loaded(input_ids=holdout[:2], use_cache=False).logits[:, :-1].float()
    assert torch.equal(again, got[0])
