"""Gradual staged compression: units move through intermediate choices to exactly the final schedule."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.compress.distill import DistillConfig
from autocompress.compress.memory import MemoryModel
from autocompress.compress.quantize import QuantLinear
from autocompress.compress.staged import Gates, Recovery, StagedConfig, staged_apply
from autocompress.compress.staging import gradual_levels, gradual_plan, level_choice, stage_units
from autocompress.compress.tiny_models import random_tokens, tiny_model
from autocompress.errors import UserError
from autocompress.models import adapter_for, model_fingerprint
from autocompress.schedule import Choice, PruneScore, Schedule

CALIB = random_tokens(256, 8, 64).reshape(-1)
VALID = random_tokens(256, 4, 64, seed=1).reshape(-1)


def _config(**kwargs) -> StagedConfig:
    base = dict(step_fraction=0.15, gates=Gates(step_ppl_increase=None), recovery=Recovery.ALWAYS,
                distill=DistillConfig(steps=2, batch_size=2, seq_len=32, lora_rank=2), lora_merge="requantize",
                calib_seq_len=64, eval_window=64, progress=False, gradual=True)
    base.update(kwargs)
    return StagedConfig(**base)


def test_level_choices_are_monotone_and_end_at_the_choice():
    choice = Choice(bits=3, group_size=32, channel_ratio=0.6, head_ratio=0.5, score=PruneScore.WANDA)
    steps = [level_choice(choice, k, 4) for k in range(5)]
    assert steps[-1] == choice
    assert [c.bits for c in steps] == [16, 8, 4, 3, 3]  # ladder 8 -> 4 -> 3 spread over 4 levels
    assert [round(c.channel_ratio, 2) for c in steps] == [0.0, 0.15, 0.3, 0.45, 0.6]
    assert [c.head_ratio for c in steps] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert level_choice(Choice(drop=True), 2, 3) == Choice() and level_choice(Choice(drop=True), 3, 3).drop


def test_each_level_removes_at_most_the_fraction():
    model = tiny_model("llama", layers=3)
    fp = model_fingerprint(model)
    schedule = Schedule.uniform(model, Choice(channel_ratio=0.75, score=PruneScore.WANDA), fingerprint=fp)
    memory = MemoryModel.from_model(model)
    units = stage_units(model, schedule)
    levels = gradual_levels(memory, units, fp, 0.1)
    plan, weights = gradual_plan(memory, units, fp, levels)
    size = memory.schedule_bytes(Schedule(fp))
    assert levels > 1 and len(plan) == levels * len(units)
    for level in range(levels):
        removed = sum(weights[u.name] for u in plan[level * len(units):(level + 1) * len(units)])
        assert 0 < removed <= 0.1 * size
        size -= removed
    assert size == memory.schedule_bytes(schedule)

    with_head = Schedule(fp, {**schedule.units, "lm_head": Choice(bits=4, group_size=32)})
    units = stage_units(model, with_head)
    plan, _ = gradual_plan(memory, units, fp, gradual_levels(memory, units, fp, 0.1))
    heads = [u for u in plan if u.index is None]  # compressed once, with its final choice, last
    assert [u.entries for u in heads] == [{"lm_head": with_head.units["lm_head"]}] and plan[-1] is heads[0]


def test_gradual_run_reaches_the_final_shapes_and_bytes_through_monotone_steps(tmp_path):
    model = tiny_model("llama", layers=3)
    original = copy.deepcopy(model)
    fp = model_fingerprint(model)
    schedule = Schedule(fp, {
        "model.layers.0": Choice(bits=3, group_size=32, channel_ratio=0.5),
        "model.layers.1": Choice(channel_ratio=0.6, score=PruneScore.WANDA),
        "model.layers.2": Choice(bits=4, group_size=32, head_ratio=0.5),
    })
    seen = []

    def shapes(record):
        blocks = adapter_for(model).blocks(model)
        channels = [adapter_for(model).mlp_channels(b) for b in blocks]
        kv = [b.self_attn.k_proj.out_features for b in blocks]
        bits = [getattr(b.mlp.down_proj, "bits", 16) for b in blocks]
        seen.append((record.bytes_after, channels, kv, bits))

    result = staged_apply(model, schedule, CALIB, VALID, _config(step_fraction=0.3), tmp_path, fingerprint=fp,
                          on_step=shapes)
    assert len(result.steps) > 2 and all("@" in u for s in result.steps for u in s.units)
    for (b0, c0, k0, q0), (b1, c1, k1, q1) in zip(seen, seen[1:]):  # never grows back
        assert b1 < b0 and all(x >= y for x, y in zip(c0, c1)) and all(x >= y for x, y in zip(k0, k1))
        assert all(x >= y for x, y in zip(q0, q1))
    assert len({c[0] for _, c, _, _ in seen}) > 2  # block 0's channels really moved in several steps
    assert result.schedule.units == schedule.units

    reference = copy.deepcopy(original)
    apply(reference, schedule, CALIB.reshape(-1, 64), progress=False, fingerprint=fp)
    got = {k: v.shape for k, v in result.model.state_dict().items()}
    assert got == {k: v.shape for k, v in reference.state_dict().items()}
    assert result.final_bytes == MemoryModel.from_model(original).schedule_bytes(schedule) == seen[-1][0]
    assert result.model.model.layers[0].mlp.down_proj.bits == 3


def test_a_failed_level_keeps_the_unit_at_its_previous_level(tmp_path):
    model = tiny_model("llama", layers=2)
    fp = model_fingerprint(model)
    # 8 and 4 bits barely move a random model; 2 bits per channel wrecks it.
    schedule = Schedule(fp, {"model.layers.0": Choice(bits=2, group_size=16)})
    config = _config(step_fraction=0.3, recovery=Recovery.NEVER, gates=Gates(step_kl=0.005, step_ppl_increase=None))
    result = staged_apply(model, schedule, CALIB, VALID, config, tmp_path, fingerprint=fp)

    assert [s.gate for s in result.steps] == ["passed"] * (len(result.steps) - 1) + ["rolled back"]
    assert result.frozen == [result.steps[-1].units[0]] and result.frozen[0].startswith("model.layers.0@")
    kept = result.schedule.units["model.layers.0"]
    assert 2 < kept.bits < 16  # an intermediate rung, not the final choice, not the original
    q = result.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bits == kept.bits
    assert torch.isfinite(torch.tensor(result.final.perplexity))


def test_an_interrupted_gradual_run_resumes_at_the_next_level(tmp_path):
    def schedule_for(model):
        return Schedule.uniform(model, Choice(channel_ratio=0.5, score=PruneScore.WANDA),
                                fingerprint=model_fingerprint(model))

    config = _config(step_fraction=0.2, recovery=Recovery.NEVER)
    reference = tiny_model("llama", layers=2)
    full = staged_apply(reference, schedule_for(reference), CALIB, VALID, config, tmp_path / "full")

    class Interrupt(Exception):
        pass

    def stop_after_one(record):
        if record.index == 1:
            raise Interrupt

    model = tiny_model("llama", layers=2)
    with pytest.raises(Interrupt):
        staged_apply(model, schedule_for(model), CALIB, VALID, config, tmp_path / "run", on_step=stop_after_one)
    fresh = tiny_model("llama", layers=2)
    with pytest.raises(UserError, match="gradual"):
        staged_apply(fresh, schedule_for(fresh), CALIB, VALID, replace(config, resume=True, gradual=False),
                     tmp_path / "run")
    resumed = staged_apply(fresh, schedule_for(fresh), CALIB, VALID, replace(config, resume=True), tmp_path / "run")
    assert [s.units for s in resumed.steps] == [s.units for s in full.steps] and len(full.steps) > 1
    assert resumed.final_bytes == full.final_bytes
    assert resumed.final.perplexity == pytest.approx(full.final.perplexity, rel=1e-4)
