"""The compression operators on the real SmolLM2-135M: a mixed schedule on a few blocks."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel
from autocompress.compress.quantize import QuantLinear
from autocompress.compress.saving import load_compressed, save_compressed
from autocompress.data import load_tokens
from autocompress.models import adapter_for, head_layout, model_fingerprint, parameter_count
from autocompress.schedule import Choice, PruneScore, QuantMethod, Schedule, SparsityPattern

pytestmark = pytest.mark.real


def test_mixed_schedule_on_smollm2_saves_loads_and_matches_the_accounting(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    fingerprint = model_fingerprint(model)
    schedule = Schedule(fingerprint, {
        # 576 = 4.5 x 128: every quantized linear reading the hidden state has a narrow last group
        "model.layers.0": Choice(bits=4, group_size=128, method=QuantMethod.GPTQ, act_order=True),
        "model.layers.0.mlp.down_proj": Choice(bits=8, group_size=None),
        "model.layers.1": Choice(bits=3, group_size=64, channel_ratio=0.25, head_ratio=0.25,
                                 score=PruneScore.WANDA),
        "model.layers.2": Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR, bits=4, group_size=128,
                                 method=QuantMethod.GPTQ),
        "model.layers.3": Choice(drop=True),
    })
    memory = MemoryModel.from_model(model)
    predicted, parameters = memory.schedule_bytes(schedule), memory.schedule_parameters(schedule)
    calibration = load_tokens("stdlib-docs", smollm2.tokenizer, "calibration", max_tokens=8 * 256).tokens
    text = load_tokens("stdlib-docs", smollm2.tokenizer, "evaluation", max_tokens=128).tokens.view(1, -1)
    with torch.no_grad():
        original = model(input_ids=text).logits
    apply(model, schedule, calibration, progress=False, seq_len=256, fingerprint=fingerprint)

    adapter = adapter_for(model)
    assert len(adapter.blocks(model)) == 29
    assert head_layout(model, 1) == type(head_layout(model, 0))(6, 2, 64)
    assert adapter.mlp_channels(adapter.blocks(model)[1]) == 1152
    assert isinstance(adapter.blocks(model)[0].self_attn.q_proj, QuantLinear)
    assert adapter.blocks(model)[0].mlp.down_proj.bits == 8
    assert parameter_count(model) == parameters  # packed codes count as weights
    with torch.no_grad():
        compressed = model(input_ids=text).logits
    # Four of 30 blocks compressed: close to the original, but not equal.
    agreement = (compressed.argmax(-1) == original.argmax(-1)).float().mean().item()
    assert 0.6 < agreement < 1.0

    out = save_compressed(model, smollm2.tokenizer, schedule, tmp_path / "model")
    size = os.path.getsize(out / "model.safetensors")
    assert abs(size - predicted) <= 0.01 * predicted
    assert predicted < memory.schedule_bytes(Schedule(fingerprint, {}))
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert (loaded(input_ids=text).logits - compressed).abs().max().item() <= 1e-5
