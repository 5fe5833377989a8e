"""GGUF block types as schedule choices: the gguf space, apply, exact bytes, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, LlamaConfig

from autocompress.compress.apply import apply
from autocompress.compress.gguf_linear import GGUFEmbedding, GGUFLinear, TiedGGUFLinear, resolved_type
from autocompress.compress.memory import model_bytes, stored_bytes
from autocompress.compress.quant_embedding import embedding_unit, head_is_tied
from autocompress.compress.saving import load_compressed, save_compressed
from autocompress.errors import UserError
from autocompress.export import gguf_quants
from autocompress.models import adapter_for, model_fingerprint, normalize
from autocompress.schedule import GGUF_TYPE_BITS, Choice, Schedule
from autocompress.search.decisions import space_options
from autocompress.search.space import load_space, space_from_dict
from tiny import VOCAB, random_tokens, tiny_model


def wide_llama(seed: int = 0) -> torch.nn.Module:
    """A small Llama whose rows are 256 wide, so K types apply without falling back."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return normalize(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()


def gguf_schedule(model) -> Schedule:
    adapter = adapter_for(model)
    path = adapter.blocks_path
    return Schedule(model_fingerprint(model), {
        f"{path}.0": Choice(gguf="Q4_K", head_ratio=0.5),
        f"{path}.0.{adapter.linears['down']}": Choice(gguf="Q6_K"),
        f"{path}.1": Choice(gguf="Q5_0", channel_ratio=0.5),
        f"{path}.2": Choice(drop=True),
        embedding_unit(model): Choice(gguf="Q8_0"),
    })


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def test_the_types_the_schedule_knows_are_the_ones_the_packers_write():
    assert set(GGUF_TYPE_BITS) == set(gguf_quants.GGUF_WEIGHT_TYPES)


def test_the_builtin_gguf_space_offers_types_labelled_by_width():
    space = load_space("gguf")
    labels = [label for label, _ in space.quant_choices()]
    assert labels[0] == "bits=8/Q8_0" and "bits=4/Q4_K" in labels and "bits=2/Q2_K" in labels
    assert all(choice.gguf and choice.group_size is None for _, choice in space.quant_choices())
    assert [label for label, _ in space.embedding_choices()][0] == "embed:bits=8/Q8_0"
    merged = {o.label: o.choice for o in space_options(space)}
    assert merged["bits=4/Q4_K+channels=0.5"].gguf == "Q4_K"
    assert merged["bits=4/Q4_K+channels=0.5"].channel_ratio == 0.5


@pytest.mark.parametrize("data, message", [
    ({"gguf": ["Q4_K", "Q7_X"]}, "expected a list drawn from"),
    ({"gguf": ["Q4_K"], "bits": [4, 16]}, "lists types, not bit widths"),
    ({"gguf": ["Q4_K", "Q8_0"], "method": "gptq"}, "quantized as llama.cpp does"),
    ({"embedding_gguf": ["Q8_0"], "bits": [4, 16]}, "needs gguf types"),
    ({"gguf": ["Q4_K", "Q4_K"]}, "listed twice"),
])
def test_bad_gguf_spaces_are_refused_in_one_line(data, message):
    with pytest.raises(UserError, match=message) as info:
        space_from_dict({"name": "x", **data})
    assert "\n" not in str(info.value)


def test_a_gguf_choice_names_its_width_or_is_refused():
    assert Choice.from_json({"gguf": "Q3_K"}).bits == 3
    with pytest.raises(UserError, match="Q4_K is 4-bit"):
        Choice.from_json({"gguf": "Q4_K", "bits": 8})
    with pytest.raises(UserError, match="gguf must be one of"):
        Choice.from_json({"gguf": "IQ1_S"})


def test_fallback_follows_the_row_width():
    assert resolved_type("Q4_K", 256) == "Q4_K"
    assert resolved_type("Q4_K", 576) == gguf_quants.fallback_type("Q4_K", 576) != "Q4_K"
    assert resolved_type("Q8_0", 48) == "F16"  # no block type divides the row


@pytest.mark.parametrize("build", [wide_llama, lambda: tiny_model("llama")], ids=["wide", "tiny"])
def test_apply_writes_gguf_blocks_with_exact_bytes_and_they_save_and_load(build, tmp_path, tokenizer):
    model = build()
    tied = head_is_tied(model)
    schedule = gguf_schedule(model)
    predicted = model_bytes(model, schedule)
    tokens = random_tokens(8 * 32).view(8, 32)
    apply(model, schedule, tokens, progress=False)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    assert len(blocks) == 2  # block 2 dropped
    q = blocks[0].get_submodule(adapter.linears["q"])
    down = blocks[0].get_submodule(adapter.linears["down"])
    assert isinstance(q, GGUFLinear) and q.gguf_type == resolved_type("Q4_K", q.in_features)
    assert down.gguf_type == resolved_type("Q6_K", down.in_features)
    assert isinstance(model.get_submodule(embedding_unit(model)), GGUFEmbedding)
    assert isinstance(model.get_submodule(adapter.lm_head), TiedGGUFLinear) is tied
    assert stored_bytes(model) == predicted  # every byte as priced, blocks included

    # The dense weight is what the gguf package's (llama.cpp's) dequantizer reads from the blocks.
    for module in (q, down):
        expected = gguf_dequantize(module.blocks.numpy(), GGMLQuantizationType[module.gguf_type])
        assert np.array_equal(module.dequantized_weight().numpy(), expected.reshape(module.out_features, -1))

    compressed = logits(model, tokens[:2])
    out = save_compressed(model, tokenizer, schedule, tmp_path / "model")
    loaded, _ = load_compressed(out)
    assert isinstance(loaded.get_submodule(adapter.lm_head), TiedGGUFLinear) is tied
    assert torch.equal(logits(loaded, tokens[:2]), compressed)
    assert stored_bytes(loaded) == predicted


def test_importance_changes_the_rounding_and_the_same_inputs_give_the_same_blocks():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    importance = torch.rand(256, generator=torch.Generator().manual_seed(1)) ** 4
    plain = GGUFLinear.from_weight(weight, "Q4_K").blocks
    weighted = GGUFLinear.from_weight(weight, "Q4_K", importance=importance).blocks
    assert not torch.equal(plain, weighted)
    assert torch.equal(weighted, GGUFLinear.from_weight(weight, "Q4_K", importance=importance).blocks)
