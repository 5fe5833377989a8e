"""Quality per byte: group-size lists, GPTQ act-order, embedding units, the run's calibration rows,
and the property that ties them together: the model ``apply`` ships is the model the search measured."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from autocompress.compress.apply import apply, block_stats, compress_block, precompute_gptq
from autocompress.compress.calibrate import capture_block_inputs
from autocompress.compress.gptq import gptq_quantize, gptq_quantize_many
from autocompress.compress.memory import MemoryModel
from autocompress.compress.storage import round_to_storage
from autocompress.errors import UserError
from autocompress.kernels import packing
from autocompress.models import adapter_for, model_fingerprint
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.run_calibration import (CALIBRATION_FILE, CalibrationSet, load_calibration, rows_fingerprint,
                                          save_calibration)
from autocompress.schedule import ALLOWED_BITS, Choice, QuantMethod, Schedule
from autocompress.search.decisions import build_slots, embedding_options, space_options, to_schedule
from autocompress.search.measure import SwapEvaluator
from autocompress.search.space import check_space_measured, load_space, space_from_dict
from tiny import random_tokens, tiny_model

GPTQ = QuantMethod.GPTQ


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- search spaces ---------------------------------------------------------------------------

def test_allowed_bits_include_5_and_6():
    assert ALLOWED_BITS == (2, 3, 4, 5, 6, 8, 16)
    Choice(bits=5, group_size=64).check("x")
    Choice(bits=6, group_size=64).check("x")
    with pytest.raises(UserError, match="bits must be one of"):
        Choice(bits=7).check("x")


def test_space_yaml_with_group_list_act_order_and_embedding_bits(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngroup_size: [64, 128, null]\nmethod: gptq\nact_order: true\nbits: [4, 3, 16]\n"
                    "embedding_bits: [8, 4]\n")
    space = load_space(str(path))
    assert space.group_sizes == (64, 128, None) and space.group_size == 64
    assert space.act_order and space.method is GPTQ and space.bits == (3, 4, 16)
    assert space.embedding_bits == (4, 8, 16)  # 16 (kept) is always an embedding option
    assert [label for label, _ in space.quant_choices()] == [
        "bits=3/g64", "bits=3/g128", "bits=3/gch", "bits=4/g64", "bits=4/g128", "bits=4/gch"]
    assert dict(space.quant_choices())["bits=4/gch"] == Choice(bits=4, group_size=None, method=GPTQ, act_order=True)
    assert space.quant_label(16, 64) == "bits=16"
    assert [label for label, _ in space.embedding_choices()] == [
        "embed:bits=4/g64", "embed:bits=4/g128", "embed:bits=4/gch",
        "embed:bits=8/g64", "embed:bits=8/g128", "embed:bits=8/gch"]
    # the embedding is quantized round-to-nearest, whatever the blocks' method
    assert dict(space.embedding_choices())["embed:bits=8/g128"] == Choice(bits=8, group_size=128)
    assert space.probe_choices() == space.quant_choices()
    assert space_from_dict(space.to_json(), "again") == space
    assert space.to_json()["group_size"] == [64, 128, None] and space.to_json()["act_order"] is True


def test_one_group_size_keeps_the_plain_labels():
    space = space_from_dict({"name": "s", "group_size": [32], "bits": [3, 4, 16], "embedding_bits": [6]}, "t")
    assert space.group_sizes == (32,) and space.to_json()["group_size"] == 32
    assert [label for label, _ in space.quant_choices()] == ["bits=3", "bits=4"]
    assert [label for label, _ in space.embedding_choices()] == ["embed:bits=6"]
    assert space.quant_choice(3) == Choice(bits=3, group_size=32)  # RTN: act_order stays off
    assert [o.label for o in space_options(space)] == ["bits=3", "bits=4", "bits=16"]
    assert [o.label for o in embedding_options(space)] == ["embed:bits=16", "embed:bits=6"]
    # Option.quant: the quantization label the profile's deltas are read under
    assert [o.probe_labels for o in space_options(space)] == [("bits=3",), ("bits=4",), ()]


def test_options_combine_each_group_size_with_each_pruning_choice():
    space = space_from_dict({"name": "s", "group_size": [64, 128], "method": "gptq", "act_order": True,
                             "bits": [4, 16], "sparsity": [0.5], "drop": True}, "t")
    options = {o.label: o for o in space_options(space)}
    assert list(options) == ["bits=4/g64", "bits=4/g64+sparsity=0.5", "bits=4/g128", "bits=4/g128+sparsity=0.5",
                             "bits=16", "bits=16+sparsity=0.5", "drop"]
    merged = options["bits=4/g128+sparsity=0.5"]
    assert merged.choice.group_size == 128 and merged.choice.act_order and merged.choice.sparsity == 0.5
    assert merged.quant == "bits=4/g128" and merged.probe_labels == ("bits=4/g128", "sparsity=0.5")
    assert options["bits=16+sparsity=0.5"].probe_labels == ("sparsity=0.5",)


@pytest.mark.parametrize("yaml_text, words", [
    ("group_size: []", "group_size"),
    ("group_size: [64, 64]", "listed twice"),
    ("group_size: [64, abc]", "group_size"),
    ("group_size: [0]", "group_size"),
    ("group_size: true", "group_size"),
    ("act_order: true", "act-order is a GPTQ setting"),
    ("method: gptq\nact_order: yes please", "act_order"),
    ("embedding_bits: [7]", "embedding_bits"),
    ("embedding_bits: 4", "embedding_bits"),
    ("embedding_bits: [true]", "embedding_bits"),
    ("bits: [7, 16]", "bits"),
    ("embed_bits: [4]", "unknown setting 'embed_bits'"),
    ("observer: median", "observer"),
    ("method: gptq\nobserver: best", "needs act_order: true with gptq"),
])
def test_malformed_space_yaml_is_one_line(tmp_path, yaml_text, words):
    path = tmp_path / "bad.yaml"
    bits = "" if yaml_text.startswith("bits:") else "bits: [4, 16]\n"
    path.write_text(f"name: bad\n{bits}{yaml_text}\n")
    with pytest.raises(UserError) as err:
        load_space(str(path))
    assert words in _one_line(err)


def test_a_choice_of_group_sizes_or_of_embedding_widths_is_a_choice():
    with pytest.raises(UserError, match="offers no choice"):
        space_from_dict({"name": "s", "bits": [4]}, "t")
    assert space_from_dict({"name": "s", "bits": [4], "group_size": [64, 128]}, "t").group_sizes == (64, 128)
    assert space_from_dict({"name": "s", "bits": [16], "embedding_bits": [4]}, "t").embedding_bits == (4, 16)


@pytest.mark.parametrize("name", ["default", "quant-only", "quant-linear"])
def test_builtin_spaces_use_gptq_act_order_groups_and_embedding_units(name):
    space = load_space(name)
    assert space.method is GPTQ and space.act_order
    assert space.group_sizes == (64, 128)
    assert space.bits == (3, 4, 5, 6, 8, 16) and 2 not in space.bits
    assert space.embedding_bits == (4, 5, 6, 8, 16)
    labels = [label for label, _ in space.quant_choices()]
    # the default space adds the value projection 2 bits wider to each width below 8 (v5, v6, v8, v8)
    mixed = [label for label in labels if ":" in label]
    assert mixed == (["bits=3/g64:v5", "bits=3/g128:v5", "bits=4/g64:v6", "bits=4/g128:v6", "bits=5/g64:v8",
                      "bits=5/g128:v8", "bits=6/g64:v8", "bits=6/g128:v8"] if name == "default" else [])
    assert labels[:2] == ["bits=3/g64", "bits=3/g128"] and len(labels) - len(mixed) == 5 * 2
    assert all(c.act_order and c.method is GPTQ for _, c in space.quant_choices())
    # the Hessian-weighted observer for the blocks; the embedding (RTN) uses the space's observer too
    assert space.observer.value == "best"
    assert all(c.observer is space.observer for _, c in space.quant_choices() + space.embedding_choices())
    assert all(c.method is QuantMethod.RTN for _, c in space.embedding_choices())


def test_embedding_slots_come_first_and_cover_a_tied_head():
    from autocompress.compress.tiny_models import tiny_model as tied_model

    space = load_space("quant-only")
    untied = tiny_model("llama")  # tests/tiny.py: an untied head
    slots = build_slots(space, untied)
    assert [(s.name, s.block) for s in slots[:3]] == [("model.embed_tokens", -1), ("lm_head", -1),
                                                      ("model.layers.0", 0)]
    assert [o.label for o in slots[0].options][:3] == ["embed:bits=16", "embed:bits=4/g64", "embed:bits=4/g128"]
    tied = tied_model("llama")  # autocompress's tiny llama ties its head
    assert tied.config.tie_word_embeddings
    assert [s.name for s in build_slots(space, tied) if s.block < 0] == ["model.embed_tokens"]
    frozen = space_from_dict({**space.to_json(), "frozen": ["model.embed_tokens"]}, "t")
    assert [s.name for s in build_slots(frozen, untied) if s.block < 0] == ["lm_head"]
    # a schedule's embedding entry round-trips through the slots
    picks = {s.name: s.options[-1].label for s in slots}
    schedule = to_schedule(slots, picks, model_fingerprint(untied))
    embed = schedule.units["model.embed_tokens"]
    assert (embed.bits, embed.group_size, embed.method, embed.act_order) == (8, 128, QuantMethod.RTN, False)
    schedule.validate(untied)


# -- check_space_measured ---------------------------------------------------------------------

def _profile_of(space, **overrides) -> Profile:
    """A hand-made profile that measured ``space``'s choices (``overrides``: label -> measured Choice or None)."""
    choices = {label: c.to_json() for label, c in space.probe_choices() + space.embedding_choices()}
    for label, choice in overrides.items():
        if choice is None:
            choices.pop(label)
        else:
            choices[label] = choice.to_json()
    units = [UnitProfile("model.layers.0", 0, kl={label: 0.1 for label in choices if not label.startswith("embed:")})]
    return Profile("m", "fp", "d", "dfp", space.name, "sfp", "block", 512, 3.0, choices, units)


def test_check_space_measured_accepts_the_profile_of_the_same_space():
    space = load_space("default")
    check_space_measured(space, _profile_of(space))
    # a smaller space whose choices were all measured is fine too
    check_space_measured(load_space("quant-only"), _profile_of(space))


def test_a_profile_measured_with_rtn_does_not_serve_a_gptq_space():
    gptq = space_from_dict({"name": "g", "bits": [3, 4, 16], "method": "gptq"}, "t")
    rtn = space_from_dict({"name": "r", "bits": [3, 4, 16], "method": "rtn"}, "t")
    assert [label for label, _ in gptq.quant_choices()] == [label for label, _ in rtn.quant_choices()]
    with pytest.raises(UserError) as err:
        check_space_measured(gptq, _profile_of(rtn), "RUN/profile.json")
    text = _one_line(err)
    assert "'bits=3'" in text and "method='gptq'" in text and "method='rtn'" in text and "RUN/profile.json" in text
    act = space_from_dict({"name": "a", "bits": [3, 4, 16], "method": "gptq", "act_order": True}, "t")
    with pytest.raises(UserError, match="act_order=True.*act_order=False"):
        check_space_measured(act, _profile_of(gptq))


def test_a_profile_measured_with_another_observer_is_refused():
    best = space_from_dict({"name": "b", "bits": [3, 16], "method": "gptq", "act_order": True, "observer": "best"},
                           "t")
    minmax = space_from_dict({**best.to_json(), "observer": "minmax"}, "t")
    rtn_observed = space_from_dict({"name": "r", "bits": [3, 16], "observer": "mse"}, "t")  # RTN may use one too
    assert rtn_observed.quant_choice(3).observer.value == "mse"
    with pytest.raises(UserError) as err:
        check_space_measured(best, _profile_of(minmax))
    assert "observer='best'" in _one_line(err) and "observer='minmax'" in str(err.value)
    check_space_measured(best, _profile_of(best))


def test_a_group_size_never_measured_is_refused():
    measured = space_from_dict({"name": "m", "bits": [4, 16], "group_size": [64, 128]}, "t")
    wider = space_from_dict({"name": "w", "bits": [4, 16], "group_size": [32, 64, 128]}, "t")
    with pytest.raises(UserError) as err:
        check_space_measured(wider, _profile_of(measured))
    assert "'bits=4/g32'" in _one_line(err) and "never measured" in str(err.value)
    # same label, other group: a one-group space profiled at 128 searched at 64
    at_128 = space_from_dict({"name": "a", "bits": [4, 16], "group_size": 128}, "t")
    at_64 = space_from_dict({"name": "b", "bits": [4, 16], "group_size": 64}, "t")
    with pytest.raises(UserError, match="group_size=64.*group_size=128"):
        check_space_measured(at_64, _profile_of(at_128))
    # an embedding choice the profile lacks
    embed = space_from_dict({"name": "e", "bits": [4, 16], "group_size": 128, "embedding_bits": [6]}, "t")
    with pytest.raises(UserError, match="'embed:bits=6'.*never measured"):
        check_space_measured(embed, _profile_of(at_128))


def test_search_refuses_a_space_its_profile_measured_with_another_quantizer(tmp_path, tokenizer):
    from search_helpers import make_run
    from space_helpers import space_file

    from autocompress.search.study import SearchSettings, search

    run = make_run(tmp_path, tokenizer, space=space_file(tmp_path, "rtn-quant-only"))
    gptq = space_file(tmp_path / "g", "rtn-quant-only", method="gptq")  # the same labels, another quantizer
    settings = SearchSettings(str(run), ("memory=60%",), trials=2, space=gptq, holdout_tokens=512, window=128,
                              progress=False, storage=f"sqlite:///{tmp_path}/s.db")
    with pytest.raises(UserError) as err:
        search(settings)
    assert "method='gptq'" in _one_line(err) and "profile again" in str(err.value)


# -- GPTQ for several grids in one pass -----------------------------------------------------------

def _layer(seed: int, n: int, k: int):
    """A weight and the Hessian of correlated, unevenly scaled inputs (like a trained model's)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.05
    x = torch.randn(512, 12, generator=generator) @ torch.randn(12, k, generator=generator)
    x = (x + 0.1 * torch.randn(512, k, generator=generator)) * torch.logspace(-1, 1, k)
    return weight, 2 * x.t() @ x / 512


GRIDS = [(3, 64), (4, 128), (5, None), (6, 32), (2, 64), (8, 32)]


def _codes(q):
    return packing.unpack(q.packed, q.bits, q.in_features)


@pytest.mark.parametrize("seed, n, k", [(0, 96, 256), (1, 48, 200)])  # 200: a last partial group
def test_gptq_quantize_many_stacks_grids_without_changing_any(seed, n, k):
    weight, hessian = _layer(seed, n, k)
    many = gptq_quantize_many(weight, hessian, GRIDS)
    for (bits, group), q in zip(GRIDS, many):
        alone = gptq_quantize_many(weight, hessian, [(bits, group)])[0]
        assert (q.bits, q.group_size, q.in_features) == (bits, min(group or k, k), k)
        assert torch.equal(q.packed, alone.packed) and torch.equal(q.scales, alone.scales)
        assert torch.equal(q.zeros, alone.zeros)


@pytest.mark.parametrize("seed, n, k", [(0, 96, 256), (1, 48, 200)])
def test_gptq_quantize_many_matches_act_order_gptq(seed, n, k):
    """Same static groups, same column order: the same scales and zeros, and codes that differ at
    most by one step on a handful of weights (float rounding of the shared updates)."""
    weight, hessian = _layer(seed, n, k)
    for (bits, group), q in zip(GRIDS, gptq_quantize_many(weight, hessian, GRIDS)):
        reference = gptq_quantize(weight, hessian, bits, group, act_order=True)
        assert torch.equal(q.scales, reference.scales) and torch.equal(q.zeros, reference.zeros)
        differ = _codes(q).int() - _codes(reference).int()
        assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.01, (bits, group)
        # and GPTQ's objective (output error on the inputs) is the same to well under a percent
        def error(w):
            delta = w.dequantize() - weight
            return float(torch.einsum("nk,kl,nl->", delta, hessian, delta))
        assert error(q) == pytest.approx(error(reference), rel=5e-3)
    # act-order GPTQ beats round-to-nearest on these inputs, at every grid
    from autocompress.compress.quantize import quantize_rtn

    for (bits, group), q in zip(GRIDS, gptq_quantize_many(weight, hessian, GRIDS)):
        rtn = quantize_rtn(weight, bits, group)
        assert error(q) < error(rtn), (bits, group)


def test_gptq_quantize_many_matches_act_order_gptq_up_to_rounding_ties():
    """Same algorithm, other arithmetic order (codes round(w/s + z), updates in blocks of 32):
    at most one code step apart, on a tiny share of the codes."""
    from autocompress.kernels.packing import unpack

    for seed, n, k in ((0, 96, 256), (1, 48, 200), (2, 96, 256), (3, 48, 200)):
        weight, hessian = _layer(seed, n, k)
        for (bits, group), q in zip(GRIDS, gptq_quantize_many(weight, hessian, GRIDS)):
            ref = gptq_quantize(weight, hessian, bits, group, act_order=True)
            assert torch.equal(q.scales, ref.scales) and torch.equal(q.zeros, ref.zeros)
            diff = (unpack(q.packed, bits, k).int() - unpack(ref.packed, bits, k).int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.01, (bits, group, diff.float().mean())


@pytest.mark.parametrize("observer", ["mse", "hqq"])
def test_gptq_quantize_many_observers_fit_the_range_at_least_as_well(observer):
    weight, hessian = _layer(4, 64, 128)
    grids = [(3, 64), (4, 32)]
    minmax = gptq_quantize_many(weight, hessian, grids)
    other = gptq_quantize_many(weight, hessian, grids, observer=observer)
    for a, b in zip(minmax, other):
        assert a.scales.shape == b.scales.shape and not torch.equal(a.scales, b.scales)
        assert torch.isfinite(b.dequantize()).all()
    with pytest.raises(ValueError, match="observer must be one of"):
        gptq_quantize_many(weight, hessian, grids, observer="median")


def test_precomputed_gptq_codes_are_the_ones_compress_block_computes():
    """The profile and the search fill a memo of stacked GPTQ results (precompute_gptq); apply
    computes each block fresh. Both must give the same weights for the same choice."""
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, random_tokens(4 * 64).view(4, 64))
    block = adapter_for(model).blocks(model)[1]
    choices = [Choice(bits=b, group_size=g, method=GPTQ, act_order=True) for b in (3, 4, 8) for g in (32, 64)]
    memo_stats = block_stats(block, model, inputs)
    precompute_gptq(block, model, memo_stats, choices)
    assert len(memo_stats["mlp.down_proj"].memo) == len(choices)
    for choice in choices:
        memoized = compress_block(block, 1, model, choice, inputs, stats=memo_stats)
        fresh = compress_block(block, 1, model, choice, inputs, stats=block_stats(block, model, inputs))
        for path in adapter_for(model).linears.values():
            a, b = memoized.get_submodule(path), fresh.get_submodule(path)
            assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales), (choice, path)


# -- measured = shipped ---------------------------------------------------------------------------

SHIPPED_SPACE = {"name": "q", "bits": [3, 4, 16], "group_size": [32, 64], "method": "gptq", "act_order": True,
                 "embedding_bits": [4, 8], "sparsity": [0.5]}


def _recording(evaluator: SwapEvaluator) -> list[torch.Tensor]:
    """Keep the logits of every batch the evaluator measures."""
    seen, logits = [], evaluator._logits
    evaluator._logits = lambda batch: seen.append(logits(batch)) or seen[-1]
    return seen


def _held_out_logits(model, holdout: torch.Tensor, batch_size: int = 2) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=b, use_cache=False).logits[:, :-1].float() for b in holdout.split(batch_size)]


@pytest.mark.parametrize("family, observer", [("llama", "minmax"), ("tied-llama", "minmax"), ("llama", "best")])
def test_apply_ships_exactly_the_model_the_search_measured(family, observer):
    from autocompress.compress.tiny_models import tiny_model as tied_model

    model = tiny_model("llama") if family == "llama" else tied_model("llama", vocab=384)
    round_to_storage(model)  # what apply() ends with: the model as stored
    space = space_from_dict({**SHIPPED_SPACE, "observer": observer}, "t")
    slots = build_slots(space, model)
    calibration = random_tokens(8 * 64, seed=1).view(8, 64)
    holdout = random_tokens(4 * 64, seed=2).view(4, 64)
    embedding = {"model.embed_tokens": "embed:bits=4/g32"}
    if family == "llama":
        embedding["lm_head"] = "embed:bits=8/g64"
    picks = {**embedding, "model.layers.0": "bits=3/g32", "model.layers.1": "bits=4/g64+sparsity=0.5",
             "model.layers.2": "bits=16"}
    assert set(picks) == {s.name for s in slots}
    before = _held_out_logits(model, holdout)
    evaluator = SwapEvaluator(model, slots, holdout, calibration)
    seen = _recording(evaluator)
    measured = evaluator.measure(picks)
    schedule = to_schedule(slots, picks, model_fingerprint(model))
    assert schedule.units["model.layers.0"] == space.quant_choice(3, 32)
    assert (schedule.units["model.layers.0"].act_order, schedule.units["model.layers.0"].observer.value) == \
        (True, observer)
    shipped = apply(copy.deepcopy(model), schedule, calibration, progress=False, batch_size=8)
    for got, want in zip(_held_out_logits(shipped, holdout), seen):
        assert torch.equal(got, want)
    assert measured["kl"] > 0
    # per-window figures: one per held-aside window (equal lengths), averaging to the whole
    assert len(measured["window_kl"]) == len(measured["window_loss"]) == holdout.shape[0]
    assert sum(measured["window_kl"]) / 4 == pytest.approx(measured["kl"], rel=1e-5)
    assert sum(measured["window_loss"]) / 4 == pytest.approx(measured["loss"], rel=1e-6)
    # the evaluator put every original module back
    assert all(torch.equal(a, b) for a, b in zip(_held_out_logits(model, holdout), before))
    # and the old sequential calibration ships another model than the one measured
    sequential = apply(copy.deepcopy(model), schedule, calibration, progress=False, sequential=True)
    assert not all(torch.equal(a, b) for a, b in zip(_held_out_logits(sequential, holdout), seen))


def test_measured_and_shipped_bytes_agree_with_embedding_choices():
    model = tiny_model("llama")
    space = space_from_dict(SHIPPED_SPACE, "t")
    slots = build_slots(space, model)
    memory = MemoryModel.from_model(model)
    from autocompress.search.budget import Budget

    budget = Budget.parse(["memory=50%"], memory)
    base, tables = budget.cost.slot_costs(slots)
    rng = np.random.default_rng(1)
    for _ in range(10):
        picks = [int(rng.integers(len(s.options))) for s in slots]
        schedule = to_schedule(slots, {s.name: s.options[i].label for s, i in zip(slots, picks)},
                               model_fingerprint(model))
        summed = budget.cost.to_figures(base + sum(t[i] for t, i in zip(tables, picks)))
        assert summed["memory_bytes"] == memory.schedule_bytes(schedule)


# -- uniform baselines with embedding options ------------------------------------------------------

def test_uniform_fits_combine_block_options_with_every_embedding_option():
    from autocompress.search.budget import Budget
    from autocompress.search.objective import AdditivePredictor
    from autocompress.search.proposals import uniform_fits
    from autocompress.search.study import Context, SearchSettings

    model = tiny_model("llama")
    space = space_from_dict({"name": "u", "bits": [3, 4, 8, 16], "group_size": [64, 128], "embedding_bits": [4, 8]},
                            "t")
    slots = build_slots(space, model)
    memory = MemoryModel.from_model(model)
    budget = Budget.parse(["memory=40%"], memory)
    base, tables = budget.cost.slot_costs(slots)
    units = [UnitProfile(f"model.layers.{i}", i, kl={label: (i + 1) * 2.0 ** -b for label, c in space.probe_choices()
                                                     for b in [c.bits]}) for i in range(3)]
    extra = [UnitProfile(name, -1, kl={label: 0.01 * 2.0 ** -c.bits for label, c in space.embedding_choices()})
             for name in ("model.embed_tokens", "lm_head")]
    profile = Profile("m", "fp", "d", "dfp", "u", "sfp", "block", 512, 3.0,
                      {label: c.to_json() for label, c in space.probe_choices() + space.embedding_choices()},
                      units, extra_units=extra)
    predictor = AdditivePredictor(slots, profile)
    ctx = Context(SearchSettings("run", ("memory=40%",)), profile, model, "m", model_fingerprint(model), space, slots,
                  budget, base, tables, predictor.option_values(), predictor, None, None, {})
    limits = budget.raw_limits() - base
    fits = uniform_fits(ctx, limits)
    names = [name for name, _ in fits]
    assert names and len(set(names)) == len(names)
    embedding_labels = [o.label for o in slots[0].options]
    for name, picks in fits:
        block_label, embed_label, head_label = name.split("+")
        assert embed_label in embedding_labels and head_label in embedding_labels
        assert picks["model.embed_tokens"] == embed_label and picks["lm_head"] == head_label
        assert {picks[f"model.layers.{i}"] for i in range(3)} == {block_label}
        schedule = to_schedule(slots, picks, model_fingerprint(model))
        assert memory.schedule_bytes(schedule) <= budget.limits[0].value  # every one fits
    # embedding options other than 16 bits are combined in, and nothing that fits is left out
    assert any("embed:bits=4" in name for name in names)
    every = {(b.label, e.label, h.label) for b in slots[2].options for e in slots[0].options for h in slots[1].options}
    fitting = set()
    for b, e, h in every:
        picks = {"model.embed_tokens": e, "lm_head": h, **{f"model.layers.{i}": b for i in range(3)}}
        if memory.schedule_bytes(to_schedule(slots, picks, model_fingerprint(model))) <= budget.limits[0].value:
            fitting.add(f"{b}+{e}+{h}")
    assert set(names) == fitting
    predicted = [predictor.predict(picks) for _, picks in fits]
    assert predicted == sorted(predicted)  # best predicted first


# -- the run's calibration rows -----------------------------------------------------------------

def test_calibration_rows_round_trip(tmp_path):
    rows = random_tokens(3 * 16, seed=4).view(3, 16)
    written = CalibrationSet(rows, "curated", 2048)
    path = save_calibration(tmp_path / "run", written)
    assert path == tmp_path / "run" / CALIBRATION_FILE and not list((tmp_path / "run").glob(".*"))
    loaded = load_calibration(tmp_path / "run", written.fingerprint)
    assert torch.equal(loaded.rows, rows) and loaded.rows.dtype == torch.int64
    assert (loaded.mode, loaded.span, loaded.fingerprint) == ("curated", 2048, rows_fingerprint(rows))
    assert loaded.describe() == {"mode": "curated", "rows": 3, "seq_len": 16, "span": 2048,
                                 "fingerprint": written.fingerprint}
    assert load_calibration(tmp_path / "elsewhere") is None  # a run from before the rows existed
    # the fingerprint sees the ids and the shape
    assert rows_fingerprint(rows.view(6, 8)) != rows_fingerprint(rows)
    assert rows_fingerprint(rows.flip(0)) != rows_fingerprint(rows)
    assert rows_fingerprint(rows.to(torch.int32)) == rows_fingerprint(rows)


def test_other_or_broken_calibration_rows_are_refused(tmp_path):
    import safetensors.torch

    rows = random_tokens(2 * 16, seed=5).view(2, 16)
    save_calibration(tmp_path, CalibrationSet(rows, "first", 32))
    with pytest.raises(UserError) as err:
        load_calibration(tmp_path, "0123456789abcdef")
    assert "other calibration rows than profile.json recorded" in _one_line(err) and "--force" in str(err.value)
    path = tmp_path / CALIBRATION_FILE
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError) as err:
        load_calibration(tmp_path)
    assert "unreadable calibration rows" in _one_line(err)
    safetensors.torch.save_file({"rows": rows.to(torch.int32)}, str(path))
    with pytest.raises(UserError, match="expected int64 token rows"):
        load_calibration(tmp_path)
    safetensors.torch.save_file({"rows": rows.flatten()}, str(path))
    with pytest.raises(UserError, match=r"expected int64 token rows \[n, seq_len\]"):
        load_calibration(tmp_path)


def test_search_reads_the_runs_rows_and_holds_out_text_after_their_span(tmp_path, tokenizer):
    from search_helpers import PROFILE_TOKENS, make_run
    from space_helpers import space_file

    from autocompress.data import load_tokens
    from autocompress.search.study import SearchSettings, prepare

    space = space_file(tmp_path, "rtn-default")
    run = make_run(tmp_path, tokenizer, space=space)
    recorded = load_calibration(run)
    settings = SearchSettings(str(run), ("memory=60%",), space=space, holdout_tokens=512, window=128, progress=False)
    ctx = prepare(settings)
    assert torch.equal(ctx.calibration, recorded.rows)
    assert ctx.holdout_meta["start"] == PROFILE_TOKENS
    # rows drawn from a larger span (curated): the held-aside text starts after all of it
    save_calibration(run, CalibrationSet(recorded.rows, "curated", 3000))
    ctx = prepare(settings)
    assert ctx.holdout_meta["start"] == 3000
    expected = load_tokens("stdlib-docs", tokenizer, "calibration", 512, start=3000).tokens
    assert torch.equal(ctx.holdout.flatten(), expected[: ctx.holdout.numel()])
    # rows that are not the ones the profile recorded are refused
    save_calibration(run, CalibrationSet(recorded.rows.flip(0), "first", PROFILE_TOKENS))
    with pytest.raises(UserError, match="other calibration rows"):
        prepare(settings)


def test_apply_run_uses_the_runs_rows_and_ships_what_was_measured(tmp_path, tokenizer):
    from search_helpers import make_run

    from autocompress.compress.apply_run import ApplyConfig, apply_run
    from autocompress.compress.saving import load_compressed
    from autocompress.models import load_model

    space = space_from_dict({"name": "g", "bits": [3, 16], "group_size": [32, 64], "method": "gptq",
                             "act_order": True, "embedding_bits": [8]}, "t")
    run = make_run(tmp_path, tokenizer, space=space)
    loaded = load_model(str(tmp_path / "model"))
    slots = build_slots(space, loaded.model)
    picks = {s.name: s.options[1].label for s in slots}  # embed:bits=8/g32 (both units), bits=3/g64 (blocks)
    schedule = to_schedule(slots, picks, model_fingerprint(loaded.model), {"model": str(tmp_path / "model")})
    schedule.save(run / "schedule.json")
    result = apply_run(ApplyConfig(run_dir=str(run), seq_len=128, valid_tokens=256, progress=False))
    calibration = load_calibration(run)
    assert calibration.fingerprint in result.calibration and "as measured" in result.calibration
    shipped, _ = load_compressed(run / "model")
    expected = apply(loaded.model, schedule, calibration.rows, progress=False)
    tokens = random_tokens(2 * 32, seed=6).view(2, 32)
    with torch.no_grad():
        assert torch.equal(shipped(tokens).logits, expected(tokens).logits)
    other = apply_run(ApplyConfig(run_dir=str(run), out=tmp_path / "other", calib_tokens=256, seq_len=128,
                                  valid_tokens=256, progress=False))
    assert other.calibration == "the first 256 tokens of the calibration split"
    # the codes went to RUN/codes/; a second apply reads them instead of running GPTQ again
    assert len(list((run / "codes").glob("block-*.safetensors"))) == len(adapter_for(loaded.model).blocks(loaded.model))
    import autocompress.compress.apply as apply_module
    refuse = lambda *a, **k: pytest.fail("GPTQ ran although RUN/codes/ held the codes")  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(apply_module, "gptq_quantize_many", refuse)
        patch.setattr(apply_module, "gptq_quantize", refuse)
        apply_run(ApplyConfig(run_dir=str(run), out=tmp_path / "again", seq_len=128, valid_tokens=256,
                              progress=False))
    again, _ = load_compressed(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, expected(tokens).logits)


# -- fixed package bugs: regression tests ----------------------------------------------------

def test_transfer_reads_a_profile_with_group_size_labels():
    from autocompress.transfer.coordinates import model_coordinates
    from autocompress.transfer.sensitivity import LossTable

    model = tiny_model("llama")
    table = LossTable(model_coordinates(model), {"model.layers.0": {"bits=3/g64": 0.2, "bits=4/g64": 0.05}},
                      "profile")
    choice = load_space("quant-only").quant_choice(3, 64)
    assert table.loss("model.layers.0", choice) == pytest.approx(0.2)
    assert table.loss("model.layers.1", choice) > 0


def _saved_tiny_llama(tmp_path, tokenizer):
    """A tiny llama saved as a model directory, and a one-choice Wanda space to profile it with."""
    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, space_from_dict({"name": "w", "bits": [16], "sparsity": [0.5]}, "t")


def test_profile_run_reuses_rows_when_calib_tokens_is_not_a_multiple_of_the_row_length(tmp_path, tokenizer):
    from autocompress.profile.run import ProfileSettings, profile_run

    model_dir, space = _saved_tiny_llama(tmp_path, tokenizer)
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, proxies=False, additivity=False, progress=False,
                               calib_tokens=200, calib_seq_len=128, calibration="first")
    assert not profile_run(str(model_dir), tmp_path / "run", space=space, settings=settings).reused
    assert profile_run(str(model_dir), tmp_path / "run", space=space, settings=settings).reused


def test_profile_run_does_not_reuse_rows_of_another_length(tmp_path, tokenizer):
    from autocompress.profile.run import ProfileSettings, profile_run

    model_dir, space = _saved_tiny_llama(tmp_path, tokenizer)
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, proxies=False, additivity=False, progress=False,
                               calib_tokens=256, calib_seq_len=128, calibration="first")
    profile_run(str(model_dir), tmp_path / "run", space=space, settings=settings)
    shorter = dataclasses.replace(settings, calib_seq_len=64)
    try:
        outcome = profile_run(str(model_dir), tmp_path / "run", space=space, settings=shorter)
    except UserError:
        return  # refused: fine
    assert outcome.profile.meta["calibration"]["seq_len"] == 64  # reused rows of 128 tokens instead


def test_profile_of_structured_pruning_uses_the_runs_calibration_rows():
    from autocompress.models import LoadedModel
    from autocompress.profile import ProfileSettings, profile_model

    model = tiny_model("llama")
    loaded = LoadedModel(model, None, "tiny", "hub")
    space = space_from_dict({"name": "c", "bits": [16], "channel_ratio": [0.25], "head_ratio": [0.5]}, "t")
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, proxies=False, additivity=False, progress=False)
    kl = []
    for seed in (7, 8):
        rows = CalibrationSet(random_tokens(512, seed=seed).view(4, 128), "first", 512)
        kl.append([u.kl["channels=0.25"] for u in profile_model(loaded, random_tokens(256), space, settings,
                                                                   calibration=rows).units])
    assert kl[0] != kl[1]
