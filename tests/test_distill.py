"""Distillation recovery and LoRA adapters on quantized layers."""
from __future__ import annotations

import copy

import torch
from torch import nn

from autocompress.compress.apply import apply
from autocompress.compress.distill import DistillConfig, distill, kd_eval_loss, kd_loss
from autocompress.compress.lora import LoRAQuantLinear, add_lora, lora_modules, merge_lora
from autocompress.compress.quantize import QuantLinear, quantize_linear
from autocompress.compress.tiny_models import random_tokens, tiny_model
from autocompress.schedule import Choice, PruneScore, Schedule


def test_kd_loss_is_zero_for_equal_outputs_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    hidden = [torch.randn(2, 5, 8)]
    loss, kl, mse = kd_loss(logits, logits, 2.0, hidden, hidden, 1.0)
    assert abs(float(loss)) < 1e-6 and abs(kl) < 1e-6 and mse == 0.0
    loss, kl, mse = kd_loss(logits + torch.randn_like(logits), logits, 2.0, [hidden[0] + 1], hidden, 1.0)
    assert kl > 0.01 and mse > 0.01 and abs(float(loss) - (kl + mse)) < 1e-4


def test_distillation_reduces_the_kd_loss_of_a_pruned_model():
    teacher = tiny_model("llama", layers=3)
    student = copy.deepcopy(teacher)
    schedule = Schedule.uniform(student, Choice(channel_ratio=0.5, score=PruneScore.MAGNITUDE))
    apply(student, schedule, progress=False)
    rows = random_tokens(256, 16, 32)
    config = DistillConfig(steps=40, batch_size=4, seq_len=32, lr=3e-3, lora_rank=0)
    before = kd_eval_loss(student, teacher, rows, config)
    weights_before = student.model.layers[0].mlp.down_proj.weight.clone()
    result = distill(student, teacher, rows, config, progress=False)
    after = kd_eval_loss(student, teacher, rows, config)
    assert result.steps == 40 and result.trained_parameters > 0 and result.lora_parameters == 0
    assert after < 0.7 * before, (before, after)
    assert not torch.equal(weights_before, student.model.layers[0].mlp.down_proj.weight)
    # trained weights are rounded to their 16-bit storage values; nothing is left trainable
    w = student.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, w.half().float()) and not any(p.requires_grad for p in student.parameters())


def test_distillation_stops_at_the_time_limit():
    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    result = distill(student, teacher, random_tokens(256, 4, 16), DistillConfig(steps=10_000, seconds=0.0,
                     seq_len=16, lora_rank=0), progress=False)
    assert result.steps == 0


def test_lora_on_a_quantlinear_trains_and_changes_the_output():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    base = quantize_linear(dense, bits=2, group_size=32)
    wrapper = LoRAQuantLinear(base, rank=4)
    x = torch.randn(256, 64)
    with torch.no_grad():
        assert torch.allclose(wrapper(x), base(x), atol=1e-5)  # B starts at zero
        target = dense(x)
        error_before = (base(x) - target).pow(2).mean()
    optimizer = torch.optim.Adam([wrapper.lora_a, wrapper.lora_b], lr=1e-2)
    for _ in range(200):
        loss = (wrapper(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        error_after = (wrapper(x) - target).pow(2).mean()
        assert not torch.allclose(wrapper(x), base(x), atol=1e-3)
    assert error_after < 0.8 * error_before, (error_before, error_after)
    assert torch.equal(wrapper.base.packed, base.packed)  # the codes stay frozen
    merged = merge_lora(nn.Sequential(wrapper), "requantize")
    assert merged == 1


def test_add_and_merge_lora_on_a_quantized_model():
    model = tiny_model("llama", layers=2)
    apply(model, Schedule.uniform(model, Choice(bits=4, group_size=32)), progress=False)
    wrappers = add_lora(model, rank=2)
    assert len(wrappers) == 2 * 7 and len(lora_modules(model)) == 14
    with torch.no_grad():
        wrappers[0].lora_b.normal_()
    merge_lora(model, "requantize")
    assert not lora_modules(model)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bits == 4 and q.group_size == 32


def test_kept_adapters_are_saved_and_loaded_with_equal_logits(tmp_path):
    from autocompress.compress.memory import stored_bytes
    from autocompress.compress.saving import load_compressed, save_compressed

    model = tiny_model("llama", layers=2)
    schedule = Schedule.uniform(model, Choice(bits=3, group_size=32))
    apply(model, schedule, progress=False)
    bytes_plain = stored_bytes(model)
    add_lora(model, rank=2)
    with torch.no_grad():
        for wrapper in lora_modules(model):
            wrapper.lora_b.normal_(0, 0.05)
    merge_lora(model, "keep")
    assert len(lora_modules(model)) == 14
    assert stored_bytes(model) - bytes_plain == 2 * sum(2 * (w.in_features + w.out_features) for w in lora_modules(model))
    save_compressed(model, None, schedule, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert len(lora_modules(loaded)) == 14
    tokens = random_tokens(256, 2, 16)
    with torch.no_grad():
        want, got = model(tokens).logits, loaded(tokens).logits
        plain = copy.deepcopy(model)
        merge_lora(plain, "discard")
        assert (want - plain(tokens).logits).abs().max() > 1e-3  # the adapters do something
    assert (want - got).abs().max() <= 1e-5
