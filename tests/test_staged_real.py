"""Staged compression on the real SmolLM2-135M: steps, LoRA recovery, checkpoint equal to memory."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress.distill import DistillConfig
from autocompress.compress.lora import lora_modules
from autocompress.compress.saving import load_compressed
from autocompress.compress.staged import Gates, Recovery, StagedConfig, staged_apply
from autocompress.data import load_tokens
from autocompress.models import model_fingerprint
from autocompress.schedule import Choice, Schedule


@pytest.mark.real
def test_staged_quantization_with_lora_recovery_on_the_real_model(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    calib = load_tokens("stdlib-docs", smollm2.tokenizer, "calibration", 1024).tokens
    valid = load_tokens("stdlib-docs", smollm2.tokenizer, "calibration", 256, start=1024).tokens
    schedule = Schedule(model_fingerprint(model), {"model.layers.10": Choice(bits=3),
                                                   "model.layers.11": Choice(bits=3)})
    config = StagedConfig(one_shot=True, gates=Gates(step_ppl_increase=None), recovery=Recovery.ALWAYS,
                          distill=DistillConfig(steps=2, batch_size=1, seq_len=64, lora_rank=4),
                          calib_seq_len=128, eval_window=128, progress=False)
    result = staged_apply(model, schedule, calib, valid, config, tmp_path, tokenizer=smollm2.tokenizer,
                          fingerprint=schedule.fingerprint)
    assert [s.gate for s in result.steps] == ["passed after recovery"]
    step = result.steps[0]
    assert step.recovery["steps"] == 2 and step.recovered["kl"] > 0 and step.after["kl"] > 0
    # kept adapters live only on the two quantized blocks' 7 linears, and their bytes are counted
    wrappers = lora_modules(result.model)
    assert len(wrappers) == 14
    adapter_bytes = 2 * sum(w.lora_a.numel() + w.lora_b.numel() for w in wrappers)
    assert result.final_bytes == step.bytes_after
    # per block: 7 linears of 3,538,944 weights, 16-bit 7,077,888 bytes, 3-bit g128 1,446,912 bytes
    assert step.bytes_before - step.bytes_after == 2 * (7_077_888 - 1_446_912) - adapter_bytes
    checkpoint, _ = load_compressed(tmp_path / "staged" / "model")
    tokens = valid[:64].view(1, -1)
    with torch.no_grad():
        assert (checkpoint(tokens).logits - result.model(tokens).logits).abs().max() <= 1e-4
