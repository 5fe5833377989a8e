"""Family adapters on tiny random models of every supported family."""
from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, random_tokens, tiny_model

from autocompress.errors import UserError
from autocompress.evaluate import perplexity
from autocompress.models import (adapter_for, config_head_dim, head_layout, linear_units, normalize,
                                 parameter_count, supported_families)

EXPECTED_ROLES = {
    "gpt2": {"qkv", "o", "up", "down"},
    "opt": {"q", "k", "v", "o", "up", "down"},
    "phi3": {"qkv", "o", "gate_up", "down"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_exposes_blocks_linears_heads_channels(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    assert len(blocks) == 3
    linears = adapter.block_linears(blocks[1])
    assert set(linears) == EXPECTED_ROLES.get(family, {"q", "k", "v", "o", "gate", "up", "down"})
    assert all(isinstance(layer, torch.nn.Linear) for layer in linears.values())
    layout = head_layout(model, 1)
    hidden = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    assert layout.head_dim == config_head_dim(model.config)
    assert layout.num_heads == 4
    assert layout.num_heads % layout.num_kv_heads == 0
    # Every block's attention output and MLP output land back in the residual width.
    assert linears["o"].out_features == hidden and linears["down"].out_features == hidden
    assert linears["o"].in_features == layout.num_heads * layout.head_dim
    assert adapter.mlp_channels(blocks[1]) == linears["down"].in_features
    names = linear_units(model)
    assert len(names) == 3 * len(linears)
    for name, (index, role) in names.items():
        assert model.get_submodule(name) is adapter.block_linears(blocks[index])[role]


def test_grouped_query_layout_is_read_from_shapes():
    layout = head_layout(tiny_model("llama"), 0)
    assert (layout.num_heads, layout.num_kv_heads, layout.group_size) == (4, 2, 2)
    phi = head_layout(tiny_model("phi3"), 0)
    assert (phi.num_heads, phi.num_kv_heads) == (4, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_evaluate(family):
    model = tiny_model(family)
    ppl = perplexity(model, random_tokens(512), window=64)
    # A random model is close to uniform over the vocabulary: perplexity near its size.
    assert 0.5 * model.config.vocab_size < ppl < 2 * model.config.vocab_size
    assert parameter_count(model) > 0


def test_gpt2_conv1d_becomes_an_equivalent_linear():
    from transformers import AutoModelForCausalLM
    from tiny import CONFIGS

    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).eval()
    ids = random_tokens(32).view(1, -1)
    with torch.no_grad():
        before = original(input_ids=ids).logits
        after = normalize(original)(input_ids=ids).logits
    assert isinstance(original.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert torch.allclose(before, after, atol=1e-5)


def test_unknown_family_names_the_supported_ones():
    class Config:
        model_type = "mamba"

    with pytest.raises(UserError) as info:
        adapter_for(Config())
    message = str(info.value)
    assert "mamba" in message
    for family in supported_families():
        assert family in message
