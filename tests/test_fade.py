"""Fading: the structure a step removes is scaled to zero, then cut with no change to the output."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress.apply import DroppedBlock
from autocompress.compress.distill import DistillConfig, distill
from autocompress.compress.fade import fading, linear_ramp, plan_fades
from autocompress.compress.memory import MemoryModel
from autocompress.compress.staged import Gates, Recovery, StagedConfig, staged_apply
from autocompress.compress.staging import compress_step_, stage_units
from autocompress.compress.storage import round_to_storage
from autocompress.compress.tiny_models import random_tokens, tiny_model
from autocompress.errors import UserError
from autocompress.models import adapter_for, model_fingerprint
from autocompress.schedule import Choice, PruneScore, Schedule

ROWS = random_tokens(256, 4, 32)


def _logits(model, rows=ROWS):
    with torch.no_grad():
        return model(input_ids=rows, use_cache=False).logits


def test_linear_ramp_goes_from_one_to_zero_then_stays():
    values = [linear_ramp(i, 8, share=0.5) for i in range(8)]
    assert values[:4] == [0.75, 0.5, 0.25, 0.0] and values[4:] == [0.0] * 4
    assert linear_ramp(0, 1) == 0.0


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("score", [PruneScore.WANDA, PruneScore.MAGNITUDE])
def test_faded_structure_is_exactly_what_the_step_cuts(family, score):
    model = tiny_model(family, layers=3)
    round_to_storage(model)
    teacher = copy.deepcopy(model)
    fp = model_fingerprint(model)
    schedule = Schedule(fp, {"model.layers.0": Choice(channel_ratio=0.5, score=score),
                             "model.layers.1": Choice(head_ratio=0.5, channel_ratio=0.25, score=score),
                             "model.layers.2": Choice(drop=True)})
    units = stage_units(model, schedule)
    fades = plan_fades(model, units, ROWS, fp, teacher)
    assert [f.index for f in fades] == [0, 1, 2] and fades[2].drop
    channels = adapter_for(model).mlp_channels(adapter_for(model).blocks(model)[0])
    assert len(fades[0].channels) == channels // 2
    with fading(model, fades) as set_alpha:
        assert torch.allclose(_logits(model), _logits(teacher), atol=1e-6)  # alpha 1 changes nothing
        set_alpha(0.0)
        silenced = _logits(model)
    assert not torch.allclose(silenced, _logits(teacher), atol=1e-3)
    compress_step_(model, units, ROWS, fp, teacher)
    assert isinstance(adapter_for(model).blocks(model)[2], DroppedBlock)
    assert adapter_for(model).mlp_channels(adapter_for(model).blocks(model)[0]) == channels - channels // 2
    # The cut removes exactly the faded parts: the output does not move.
    assert torch.allclose(_logits(model), silenced, atol=1e-4)


def test_distillation_lowers_alpha_every_step_and_hooks_go_away():
    model = tiny_model("llama", layers=2)
    teacher = copy.deepcopy(model)
    fp = model_fingerprint(model)
    units = stage_units(model, Schedule(fp, {"model.layers.1": Choice(channel_ratio=0.5)}))
    fades = plan_fades(model, units, ROWS, fp, teacher)
    seen = []
    with fading(model, fades) as set_alpha:
        def lower(i, n):
            seen.append(linear_ramp(i, n, 1.0))
            set_alpha(seen[-1])
        distill(model, teacher, ROWS, DistillConfig(steps=4, batch_size=2, seq_len=32, lora_rank=0),
                progress=False, before_step=lower)
    assert seen == [0.75, 0.5, 0.25, 0.0]
    down = adapter_for(model).blocks(model)[1].mlp.down_proj
    assert not down._forward_pre_hooks
    assert float(down.weight[:, fades[0].channels].abs().max()) == 0.0


def test_staged_run_with_fading_ends_at_the_exact_size_and_logs_the_fade(tmp_path):
    model = tiny_model("llama", layers=3)
    fp = model_fingerprint(model)
    schedule = Schedule.uniform(model, Choice(channel_ratio=0.5, score=PruneScore.WANDA), fingerprint=fp)
    expected = MemoryModel.from_model(model).schedule_bytes(schedule)
    config = StagedConfig(step_fraction=0.1, gates=Gates(step_ppl_increase=None), recovery=Recovery.ALWAYS,
                          distill=DistillConfig(steps=3, batch_size=2, seq_len=32, lora_rank=0), calib_seq_len=32,
                          eval_window=32, progress=False, fade=True)
    tokens = random_tokens(256, 8, 32).reshape(-1)
    result = staged_apply(model, schedule, tokens, tokens[:128], config, tmp_path, fingerprint=fp)
    assert result.final_bytes == expected
    assert len(result.steps) == 3
    for step in result.steps:
        assert step.recovery["fade"] and step.recovery["steps"] == 3 and step.recovered is None


def test_fade_share_out_of_range_is_refused():
    with pytest.raises(UserError, match="fade share"):
        StagedConfig(fade=True, fade_share=0.0)
