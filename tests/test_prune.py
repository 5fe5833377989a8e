"""Pruning: unstructured and 2:4 masks, heads (grouped-query attention), MLP channels, blocks."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel
from autocompress.compress.prune import drop_blocks, prune_channels, prune_heads, sparsity_mask, weight_scores
from autocompress.compress.quantize import QuantLinear
from autocompress.models import adapter_for, head_layout, model_fingerprint, parameter_count
from autocompress.schedule import Choice, PruneScore, Schedule, SparsityPattern
from tiny import random_tokens, tiny_model

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "phi3")


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def layer_with_uneven_inputs(seed: int = 0):
    """A weight and inputs whose features differ in scale by 100x (where Wanda should win)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 128, generator=generator) * torch.logspace(-1, 1, 128)[torch.randperm(128, generator=generator)]
    weight = torch.randn(32, 128, generator=generator)
    return weight, x


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7])
def test_unstructured_mask_prunes_the_exact_share_of_every_row(ratio):
    weight, x = layer_with_uneven_inputs()
    for score in PruneScore:
        mask = sparsity_mask(weight_scores(weight, x.pow(2).sum(0), score), SparsityPattern.UNSTRUCTURED, ratio)
        assert (mask.sum(dim=1) == round(ratio * 128)).all()


def test_two_four_mask_prunes_exactly_two_of_every_four():
    weight, x = layer_with_uneven_inputs()
    mask = sparsity_mask(weight_scores(weight, x.pow(2).sum(0), PruneScore.WANDA), SparsityPattern.TWO_FOUR, 0.5)
    assert (mask.view(32, 32, 4).sum(dim=-1) == 2).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        sparsity_mask(torch.rand(4, 6), SparsityPattern.TWO_FOUR, 0.5)


@pytest.mark.parametrize("pattern", [SparsityPattern.UNSTRUCTURED, SparsityPattern.TWO_FOUR])
def test_wanda_keeps_the_output_closer_than_magnitude(pattern):
    weight, x = layer_with_uneven_inputs()
    errors = {}
    for score in PruneScore:
        mask = sparsity_mask(weight_scores(weight, x.pow(2).sum(0), score), pattern, 0.5)
        errors[score] = (x @ weight.masked_fill(mask, 0).t() - x @ weight.t()).norm() / (x @ weight.t()).norm()
    assert errors[PruneScore.WANDA] < 0.7 * errors[PruneScore.MAGNITUDE], errors


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_heads_equals_silencing_them(family):
    """Pruned block == the original with the removed query heads' o_proj columns zeroed:
    so every kept query head still reads its own key/value head (GQA consistent)."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    layout = head_layout(model, 1)
    keep = torch.tensor([layout.num_kv_heads - 1])  # keep only the last key/value group
    silenced = copy.deepcopy(model)
    o_weight = adapter.block_linears(adapter.blocks(silenced)[1])["o"].weight
    kept_cols = prune_heads(adapter.blocks(model)[1], adapter, layout, keep)
    removed = torch.ones(o_weight.shape[1], dtype=torch.bool)
    removed[kept_cols] = False
    with torch.no_grad():
        o_weight[:, removed] = 0
    new = head_layout(model, 1)
    assert (new.num_heads, new.num_kv_heads) == (layout.group_size, 1)
    tokens = random_tokens(2 * 24).view(2, 24)
    torch.testing.assert_close(logits(model, tokens), logits(silenced, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_channels_equals_silencing_them(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    channels = adapter.mlp_channels(block)
    keep = torch.arange(0, channels, 3)
    silenced = copy.deepcopy(model)
    down = adapter.block_linears(adapter.blocks(silenced)[0])["down"]
    removed = torch.ones(channels, dtype=torch.bool)
    removed[keep] = False
    with torch.no_grad():
        down.weight[:, removed] = 0
    prune_channels(block, adapter, keep)
    assert adapter.mlp_channels(block) == len(keep)
    tokens = random_tokens(2 * 24).view(2, 24)
    torch.testing.assert_close(logits(model, tokens), logits(silenced, tokens), rtol=0, atol=1e-5)


def cached_decode_matches_full_forward(model, tokens):
    """Greedy steps with the KV cache give the same logits as one forward over the whole text."""
    full = logits(model, tokens)
    with torch.no_grad():
        out = model(input_ids=tokens[:, :10], use_cache=True)
        steps = [out.logits]
        for position in range(10, tokens.shape[1]):
            out = model(input_ids=tokens[:, position:position + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_pruning_removes_exactly_the_predicted_parameters(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    before = parameter_count(model)
    fingerprint = model_fingerprint(model)
    path = adapter.blocks_path
    schedule = Schedule(fingerprint, {
        f"{path}.0": Choice(head_ratio=0.5, score=PruneScore.WANDA),
        f"{path}.1": Choice(channel_ratio=0.25, score=PruneScore.MAGNITUDE),
        f"{path}.2": Choice(drop=True),
    })
    memory = MemoryModel.from_model(model)
    predicted = memory.schedule_parameters(schedule)
    block_params = [sum(p.numel() for p in block.parameters()) for block in adapter.blocks(model)]
    layout, channels = head_layout(model, 0), adapter.mlp_channels(adapter.blocks(model)[1])
    shapes = {role: (lin.out_features, lin.in_features, lin.bias is not None)
              for role, lin in adapter.block_linears(adapter.blocks(model)[0]).items()}
    apply(model, schedule, random_tokens(4 * 32).view(4, 32), progress=False)

    # By hand: half the key/value groups of block 0 (with their query heads), a quarter of the
    # MLP channels of block 1, all of block 2.
    removed_heads = layout.num_heads // 2
    removed_kv = layout.num_kv_heads // 2
    hd, hidden = layout.head_dim, shapes["o"][0]
    removed_rows = (removed_heads + 2 * removed_kv) * hd  # of q, k and v (fused or not)
    qkv_bias = any(shapes[role][2] for role in ("q", "qkv") if role in shapes)
    expected = removed_rows * (hidden + qkv_bias) + removed_heads * hd * hidden  # o loses columns
    removed_channels = round(0.25 * channels)
    gated = "gate" in shapes or "gate_up" in shapes
    up_bias = any(shapes[role][2] for role in ("up", "gate_up") if role in shapes)
    expected += removed_channels * (hidden + up_bias) * (2 if gated else 1)  # up (and gate) rows
    expected += removed_channels * hidden  # down loses columns
    expected += block_params[2]
    assert before - parameter_count(model) == expected
    assert parameter_count(model) == predicted

    assert len(adapter.blocks(model)) == 2 and model.config.num_hidden_layers == 2
    assert head_layout(model, 0) == type(layout)(layout.num_heads - removed_heads, layout.num_kv_heads - removed_kv, hd)
    assert adapter.mlp_channels(adapter.blocks(model)[1]) == channels - removed_channels
    mlp = adapter.blocks(model)[1].get_submodule(adapter.linears["down"].rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        assert mlp.intermediate_size == channels - removed_channels
    layer_indices = {m.layer_idx for block in adapter.blocks(model) for m in block.modules() if hasattr(m, "layer_idx")}
    assert layer_indices <= {0, 1}
    cached_decode_matches_full_forward(model, random_tokens(2 * 20, seed=3).view(2, 20))


def test_structured_choice_uses_activations_with_wanda():
    """Wanda and magnitude pick different channels when input scales are uneven."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    fingerprint = model_fingerprint(model)
    tokens = random_tokens(4 * 32).view(4, 32)
    kept = {}
    for score in PruneScore:
        pruned = copy.deepcopy(model)
        block = f"{adapter.blocks_path}.0"
        apply(pruned, Schedule(fingerprint, {block: Choice(channel_ratio=0.5, score=score)}), tokens,
              progress=False, fingerprint=fingerprint)
        kept[score] = adapter.block_linears(adapter.blocks(pruned)[0])["down"].weight
    assert kept[PruneScore.WANDA].shape == kept[PruneScore.MAGNITUDE].shape == (64, 48)
    assert not torch.equal(kept[PruneScore.WANDA], kept[PruneScore.MAGNITUDE])


def test_drop_blocks_keeps_the_cache_consistent():
    model = tiny_model("qwen2")
    drop_blocks(model, [0, 2])
    assert model.config.num_hidden_layers == 1 and len(adapter_for(model).blocks(model)) == 1
    assert all(m.layer_idx == 0 for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int))
    cached_decode_matches_full_forward(model, random_tokens(20, seed=4).view(1, 20))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_two_four_survives_quantization(family):
    model = tiny_model(family)
    schedule = Schedule.uniform(model, Choice(bits=4, group_size=32, sparsity=0.5, pattern=SparsityPattern.TWO_FOUR))
    apply(model, schedule, random_tokens(4 * 32).view(4, 32), progress=False)
    adapter = adapter_for(model)
    checked = 0
    for block in adapter.blocks(model):
        for module in adapter.block_linears(block).values():
            assert isinstance(module, QuantLinear)
            weight = module.dequantized_weight()
            zeros = (weight.view(weight.shape[0], -1, 4) == 0).sum(dim=-1)
            assert (zeros >= 2).all()
            checked += 1
    assert checked == len(adapter.blocks(model)) * len(adapter.linears)
