"""Memory accounting: the bytes MemoryModel predicts are the bytes save_compressed writes."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel, dense_bytes, stored_bytes, unit_bytes
from autocompress.compress.quant_embedding import embedding_unit, head_is_tied
from autocompress.compress.saving import save_compressed
from autocompress.models import adapter_for, model_fingerprint, normalize, parameter_count
from autocompress.schedule import Choice, PruneScore, QuantMethod, Schedule, SparsityPattern
from tiny import random_tokens, tiny_model


def payload_bytes(path) -> int:
    """Tensor bytes in a safetensors file (everything but its JSON header)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def head_entry(model, choice: Choice) -> dict[str, Choice]:
    """The output head's schedule entry: a tied head is the embedding unit's (quantized, never pruned)."""
    if not head_is_tied(model):
        return {"lm_head": choice}
    return {embedding_unit(model): Choice(bits=choice.bits, group_size=choice.group_size)}


def schedules(model) -> dict[str, Schedule]:
    adapter = adapter_for(model)
    path, fingerprint = adapter.blocks_path, model_fingerprint(model)
    down = adapter.linears["down"]
    return {
        "dense": Schedule(fingerprint, head_entry(model, Choice())),
        # K = 96 (down) with groups of 64: a narrow last group of 32; per-channel elsewhere
        "narrow-groups": Schedule(fingerprint, {
            **{f"{path}.{i}": Choice(bits=3, group_size=64) for i in range(3)},
            f"{path}.1.{down}": Choice(bits=2, group_size=None),
            f"{path}.2.{down}": Choice(bits=8, group_size=128)}),
        "mixed-structure": Schedule(fingerprint, {
            f"{path}.0": Choice(bits=4, group_size=32, head_ratio=0.5, channel_ratio=0.25, score=PruneScore.MAGNITUDE),
            f"{path}.1": Choice(drop=True),
            f"{path}.2": Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR, score=PruneScore.MAGNITUDE,
                                channel_ratio=0.5),
            f"{path}.2.{down}": Choice(bits=4, group_size=64),
            **head_entry(model, Choice(bits=8, group_size=128))}),
        "quantized-head": Schedule(fingerprint, head_entry(model, Choice(bits=4, group_size=None))),
        "pruned-gptq-head": Schedule(fingerprint, {
            f"{path}.0": Choice(bits=4, group_size=32, method=QuantMethod.GPTQ),
            **head_entry(model, Choice(bits=3, group_size=32, method=QuantMethod.GPTQ, sparsity=0.25,
                                       pattern=SparsityPattern.UNSTRUCTURED))}),
        "pruned-head": Schedule(fingerprint, head_entry(model, Choice(sparsity=0.5,
                                                                      pattern=SparsityPattern.TWO_FOUR))),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "phi3", "gemma"])
@pytest.mark.parametrize("name", ["dense", "narrow-groups", "mixed-structure", "quantized-head",
                                  "pruned-gptq-head", "pruned-head"])
def test_predicted_bytes_equal_the_saved_tensor_bytes(family, name, tmp_path):
    model = tiny_model(family)
    schedule = schedules(model)[name]
    memory = MemoryModel.from_model(model)
    predicted = memory.schedule_bytes(schedule)
    parameters = memory.schedule_parameters(schedule)
    if name == "dense":
        assert predicted == dense_bytes(model)
    apply(model, schedule, random_tokens(4 * 32).view(4, 32), progress=False)
    assert stored_bytes(model) == predicted
    assert parameter_count(model) == parameters  # packed codes count as weights
    out = save_compressed(model, None, schedule, tmp_path / "m")
    assert payload_bytes(out / "model.safetensors") == predicted


def test_the_parts_add_up():
    model = tiny_model("gpt2")  # tied embeddings
    memory = MemoryModel.from_model(model)
    adapter = adapter_for(model)
    path, paths = adapter.blocks_path, list(adapter.linears.values())
    schedule = schedules(model)["narrow-groups"]
    total = memory.base_bytes()
    for i in range(3):
        choice, linears = schedule.block_plan(path, i, paths)
        block = memory.block_bytes(i, choice, linears)
        total += block
        # A block is its 16-bit norms plus its linears, each priced on its own.
        norms = memory.block_bytes(i, Choice()) - sum(unit_bytes(memory, f"{path}.{i}.{p}", Choice()) for p in paths)
        assert norms == 4 * 64 * 2  # two LayerNorms, weight and bias
        assert block == norms + sum(unit_bytes(memory, f"{path}.{i}.{p}", c) for p, c in linears.items())
    assert total == memory.schedule_bytes(schedule)
    # 3-bit codes of c_attn (192 x 64, groups of 64): 24 bytes per row plus one fp16 scale and zero
    assert unit_bytes(memory, f"{path}.0.attn.c_attn", Choice(bits=3, group_size=64)) == 192 * (24 + 4) + 192 * 2
    # A tied head quantized adds its own copy: the embedding stays.
    head = Choice(bits=4, group_size=None)
    head_bytes = unit_bytes(memory, "lm_head", head)
    assert head_bytes == 384 * (64 * 4 // 8 + 2 * 2)
    assert memory.base_bytes(head) == memory.base_bytes() + head_bytes


def test_file_size_is_within_one_percent_of_the_prediction(tmp_path):
    """On a model big enough that the safetensors header is small beside the weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=320, intermediate_size=864, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=True)
    model = normalize(AutoModelForCausalLM.from_config(config)).eval()
    fingerprint = model_fingerprint(model)
    schedule = Schedule(fingerprint, {
        "model.layers.0": Choice(bits=3, group_size=128, method=QuantMethod.GPTQ, channel_ratio=0.25),
        "model.layers.1": Choice(bits=4, group_size=64),  # 320 = 2.5 x 128, 864 = 13.5 x 64
        "model.layers.1.mlp.down_proj": Choice(bits=2, group_size=128),
        "model.embed_tokens": Choice(bits=4, group_size=128),  # tied: the head shares its codes
    })
    predicted = MemoryModel.from_model(model).schedule_bytes(schedule)
    apply(model, schedule, random_tokens(4 * 64).view(4, 64), progress=False, fingerprint=fingerprint)
    out = save_compressed(model, None, schedule, tmp_path / "m")
    size = os.path.getsize(out / "model.safetensors")
    assert payload_bytes(out / "model.safetensors") == predicted
    assert abs(size - predicted) <= 0.01 * predicted
