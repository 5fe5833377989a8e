"""apply() with mixed schedules, save_compressed / load_compressed, and bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig

from autocompress.compress.apply import apply, block_stats, compress_block
from autocompress.compress.calibrate import capture_block_inputs, run_block
from autocompress.compress.quant_embedding import embedding_unit, head_is_tied
from autocompress.compress.quantize import QuantLinear
from autocompress.compress.saving import load_compressed, save_compressed
from autocompress.errors import UserError
from autocompress.models import adapter_for, load_model, model_fingerprint
from autocompress.schedule import Choice, PruneScore, QuantMethod, Schedule, SparsityPattern
from tiny import random_tokens, tiny_model

GPTQ = QuantMethod.GPTQ


def mixed_schedule(model) -> Schedule:
    """Per-block and per-linear choices of every kind in one schedule (3-block tiny models)."""
    adapter = adapter_for(model)
    path = adapter.blocks_path
    first, last = next(iter(adapter.linears.values())), adapter.linears["down"]
    return Schedule(model_fingerprint(model), {
        f"{path}.0": Choice(bits=4, group_size=32, method=GPTQ, head_ratio=0.5, channel_ratio=0.25),
        f"{path}.0.{last}": Choice(bits=16),
        f"{path}.1": Choice(bits=3, group_size=64, method=GPTQ, act_order=True, sparsity=0.5,
                            pattern=SparsityPattern.UNSTRUCTURED, score=PruneScore.WANDA),
        f"{path}.1.{first}": Choice(bits=8, group_size=None),
        f"{path}.2": Choice(bits=2, group_size=None, sparsity=0.5, pattern=SparsityPattern.TWO_FOUR,
                            score=PruneScore.MAGNITUDE),
        # a tied head is quantized through the embedding unit, which covers both
        embedding_unit(model) if head_is_tied(model) else "lm_head": Choice(bits=4, group_size=64),
    })


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "phi3", "gemma"])
def test_mixed_schedule_saves_and_loads_to_the_same_logits(family, tmp_path, tokenizer):
    model = tiny_model(family)
    schedule = mixed_schedule(model)
    tokens = random_tokens(8 * 32).view(8, 32)
    reference = logits(model, tokens[:2])
    apply(model, schedule, tokens, progress=False)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    first, last = next(iter(adapter.linears.values())), adapter.linears["down"]

    # Every linear got its own plan.
    assert not isinstance(blocks[0].get_submodule(last), QuantLinear)
    assert blocks[0].get_submodule(first).bits == 4 and blocks[0].get_submodule(first).group_size == 32
    assert blocks[1].get_submodule(first).bits == 8
    assert blocks[1].get_submodule(first).group_size == blocks[1].get_submodule(first).in_features
    assert blocks[1].get_submodule(last).bits == 3 and blocks[2].get_submodule(last).bits == 2
    assert isinstance(model.get_submodule("lm_head"), QuantLinear)
    compressed = logits(model, tokens[:2])
    assert compressed.shape == reference.shape and not torch.equal(compressed, reference)

    out = save_compressed(model, tokenizer, schedule, tmp_path / "model")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "schedule.json", "autocompress.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not list(tmp_path.glob(".*part*"))
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 3
    assert Schedule.load(out / "schedule.json") == schedule

    loaded, loaded_tokenizer = load_compressed(out)
    assert (logits(loaded, tokens[:2]) - compressed).abs().max() <= 1e-5
    assert loaded_tokenizer is not None and loaded_tokenizer("a b").input_ids == tokenizer("a b").input_ids
    # load_model recognises the directory too
    again = load_model(str(out))
    assert again.kind == "compressed"
    assert (logits(again.model, tokens[:2]) - compressed).abs().max() <= 1e-5


def test_dropped_blocks_save_and_load(tmp_path):
    model = tiny_model("llama")
    path = adapter_for(model).blocks_path
    schedule = Schedule(model_fingerprint(model), {f"{path}.1": Choice(drop=True),
                                                   f"{path}.2": Choice(bits=4, group_size=32, method=GPTQ)})
    tokens = random_tokens(4 * 32).view(4, 32)
    apply(model, schedule, tokens, progress=False)
    out = save_compressed(model, None, schedule, tmp_path / "m")
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2
    loaded, tokenizer = load_compressed(out)
    assert tokenizer is None and len(adapter_for(loaded).blocks(loaded)) == 2
    assert (logits(loaded, tokens[:1]) - logits(model, tokens[:1])).abs().max() <= 1e-5


def _two_block_schedule(model):
    """GPTQ after structured pruning on block 0 (so re-collected statistics would differ from the
    original's), act-order GPTQ with Wanda sparsity on block 1 (fed by block 0's outputs)."""
    return Schedule(model_fingerprint(model), {
        "model.layers.0": Choice(bits=3, group_size=32, method=GPTQ, channel_ratio=0.25),
        "model.layers.1": Choice(bits=4, group_size=32, method=GPTQ, act_order=True, sparsity=0.5,
                                 pattern=SparsityPattern.UNSTRUCTURED, score=PruneScore.WANDA)})


def test_apply_calibrates_every_block_on_the_original_activations():
    """apply() == compress_block with block_stats of the unchanged block on the original model's
    inputs (what the profile and the search's trials do), block after block."""
    model = tiny_model("llama")
    tokens = random_tokens(4 * 32).view(4, 32)
    schedule = _two_block_schedule(model)
    blocks = adapter_for(model).blocks(model)
    inputs0 = capture_block_inputs(model, tokens)
    inputs1 = inputs0.with_hidden(run_block(blocks[0], inputs0))  # the *original* block 0's outputs
    original = copy.deepcopy(blocks[0])
    expected = [compress_block(blocks[i], i, model, schedule.units[f"model.layers.{i}"], inputs,
                               stats=block_stats(blocks[i], model, inputs))
                for i, inputs in ((0, inputs0), (1, inputs1))]
    assert isinstance(blocks[0].mlp.down_proj, torch.nn.Linear)  # compress_block leaves the original
    assert torch.equal(run_block(original, inputs0), run_block(blocks[0], inputs0))
    # re-collecting the statistics after block 0's channels were pruned gives other codes
    recollected = compress_block(blocks[0], 0, model, schedule.units["model.layers.0"], inputs0)
    assert not torch.equal(run_block(recollected, inputs0), run_block(expected[0], inputs0))

    applied = copy.deepcopy(model)
    apply(applied, schedule, tokens, progress=False)
    for index, inputs in ((0, inputs0), (1, inputs1)):
        torch.testing.assert_close(run_block(adapter_for(applied).blocks(applied)[index], inputs),
                                   run_block(expected[index], inputs), rtol=0, atol=1e-6)
    again = copy.deepcopy(model)
    apply(again, schedule, tokens, progress=False)  # deterministic: the same codes twice
    assert torch.equal(logits(again, tokens), logits(applied, tokens))


def test_apply_sequential_calibrates_on_the_compressed_blocks_outputs():
    """sequential=True (the old behaviour): statistics re-collected stage by stage inside each block,
    and block 1 calibrated on the *compressed* block 0's outputs."""
    model = tiny_model("llama")
    tokens = random_tokens(4 * 32).view(4, 32)
    schedule = _two_block_schedule(model)
    blocks = adapter_for(model).blocks(model)
    inputs0 = capture_block_inputs(model, tokens)
    first = compress_block(blocks[0], 0, model, schedule.units["model.layers.0"], inputs0)
    inputs1 = inputs0.with_hidden(run_block(first, inputs0))
    second = compress_block(blocks[1], 1, model, schedule.units["model.layers.1"], inputs1)
    applied = copy.deepcopy(model)
    apply(applied, schedule, tokens, progress=False, sequential=True)
    applied_blocks = adapter_for(applied).blocks(applied)
    torch.testing.assert_close(run_block(applied_blocks[0], inputs0), run_block(first, inputs0), rtol=0, atol=1e-6)
    torch.testing.assert_close(run_block(applied_blocks[1], inputs1), run_block(second, inputs1), rtol=0, atol=1e-6)
    default = copy.deepcopy(model)
    apply(default, schedule, tokens, progress=False)
    assert not torch.equal(logits(default, tokens), logits(applied, tokens))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_gptq_through_apply_beats_rtn_on_correlated_activations(family):
    """A block fed low-rank, unevenly scaled hidden states (like a trained model's): GPTQ's
    Hessians, collected stage by stage inside the block, must pay off against RTN."""
    model = tiny_model(family)
    inputs = capture_block_inputs(model, random_tokens(8 * 32).view(8, 32))
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(8, 32, 6, generator=generator) @ torch.randn(6, 64, generator=generator)
    hidden = (latent + 0.05 * torch.randn(8, 32, 64, generator=generator)) * torch.logspace(-0.5, 0.5, 64)
    inputs = inputs.with_hidden(hidden)
    block = adapter_for(model).blocks(model)[0]
    exact = run_block(block, inputs)
    errors = {}
    for method in QuantMethod:
        compressed = compress_block(block, 0, model, Choice(bits=3, group_size=32, method=method), inputs)
        errors[method] = ((run_block(compressed, inputs) - exact).norm() / (exact - hidden).norm()).item()
    assert errors[GPTQ] < 0.6 * errors[QuantMethod.RTN], errors


# ---------------------------------------------------------------------------------------
# Bad input: one clear error, the model untouched, no partial output


@pytest.mark.parametrize("units,message", [
    ({"model.layers.7": Choice(bits=4)}, "unknown unit"),
    ({"model.layers.0.self_attn.q_proj": Choice(channel_ratio=0.5)}, "only be set on a block"),
    ({"model.layers.0": Choice(bits=7)}, "bits must be one of"),
    ({"model.layers.0": Choice(channel_ratio=1.0)}, r"channel_ratio must be in \[0, 1\)"),
    ({"model.layers.0": Choice(sparsity=-0.1, pattern=SparsityPattern.UNSTRUCTURED)}, "sparsity must be"),
    ({f"model.layers.{i}": Choice(drop=True) for i in range(3)}, "drops every block"),
])
def test_bad_schedules_are_refused_before_touching_the_model(units, message):
    model = tiny_model("llama")
    before = model_fingerprint(model)
    with pytest.raises(UserError, match=message):
        apply(model, Schedule(before, units), None, progress=False)
    assert model_fingerprint(model) == before


def test_a_schedule_for_another_model_is_refused():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    with pytest.raises(UserError, match="was made for model"):
        apply(model, Schedule.uniform(other, Choice(bits=4)), None, progress=False)


def test_bad_schedule_file_names_the_field(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"type": "schedule", "version": 1, "data": {
        "fingerprint": "x", "units": {"model.layers.0": {"bits": 4, "groupsize": 128}}}}))
    with pytest.raises(UserError, match="unknown field 'groupsize'"):
        Schedule.load(path)


def test_a_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_model("llama")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(UserError, match="disk full"):
        save_compressed(model, None, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save_compressed(tiny_model("llama"), None, None, tmp_path / "out")


def test_corrupt_or_missing_weights_give_one_clear_error(tmp_path):
    model = tiny_model("llama")
    apply(model, Schedule.uniform(model, Choice(bits=4, group_size=32)), None, progress=False)
    out = save_compressed(model, None, None, tmp_path / "m")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt weights file"):
        load_compressed(out)
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(UserError, match="corrupt weights file"):
        load_compressed(out)
    weights.unlink()
    with pytest.raises(UserError, match="weights file is missing"):
        load_compressed(out)


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    import safetensors.torch

    model = tiny_model("llama")
    apply(model, Schedule.uniform(model, Choice(bits=4, group_size=32)), None, progress=False)
    out = save_compressed(model, None, None, tmp_path / "m")
    tensors = safetensors.torch.load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.scales"] = torch.zeros(3, 3, dtype=torch.float16)
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="q_proj.scales"):
        load_compressed(out)


def test_calibration_is_required_only_when_needed():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs calibration tokens"):
        apply(copy.deepcopy(model), Schedule.uniform(model, Choice(bits=4, method=GPTQ)), None, progress=False)
    # RTN and magnitude pruning need none
    apply(model, Schedule.uniform(model, Choice(bits=4, group_size=32, sparsity=0.5,
                                                pattern=SparsityPattern.UNSTRUCTURED,
                                                score=PruneScore.MAGNITUDE)), None, progress=False)
