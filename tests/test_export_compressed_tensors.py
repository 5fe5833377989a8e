"""export_compressed_tensors: checkpoints that stock transformers loads, without autocompress.

Every exported directory is loaded in a subprocess that imports only torch and transformers
(the compressed-tensors package is transformers' own dependency for this format); its logits
on fixed ids must match the in-memory compressed model.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from autocompress.compress.apply import apply
from autocompress.compress.quantize import quantize_linear
from autocompress.errors import UserError
from autocompress.export.compressed_tensors import (CTExport, Layout, export_compressed_tensors, pack_int32,
                                                    pack_linear)
from autocompress.models import adapter_for, model_fingerprint
from autocompress.schedule import Choice, PruneScore, Schedule, SparsityPattern
from tiny import VOCAB, random_tokens, tiny_model

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3")
TOLERANCE = 1e-3  # max |diff| / max |logit|

# Loads each (directory, ids, output) job with stock transformers and saves its logits.
STOCK_LOADER = r"""
import json, sys
import safetensors.torch, torch
from transformers import AutoModelForCausalLM
for directory, ids_file, out_file in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = safetensors.torch.load_file(ids_file)["ids"]
    with torch.no_grad():
        logits = model(ids).logits
    safetensors.torch.save_file({"logits": logits.contiguous()}, out_file)
leaked = sorted(name for name in sys.modules if name.split(".")[0] == "autocompress")
assert not leaked, leaked
"""


def stock_logits(jobs: list[tuple[Path, torch.Tensor]], tmp: Path) -> list[torch.Tensor]:
    """Logits of each exported directory on its ids, computed by stock transformers in a subprocess."""
    specs = []
    for index, (directory, ids) in enumerate(jobs):
        ids_file, out_file = tmp / f"ids{index}.safetensors", tmp / f"logits{index}.safetensors"
        safetensors.torch.save_file({"ids": ids.contiguous()}, str(ids_file))
        specs.append((str(directory), str(ids_file), str(out_file)))
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp)), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([str(PYTHON), "-c", STOCK_LOADER, json.dumps(specs)], capture_output=True, text=True,
                          cwd=tmp, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [safetensors.torch.load_file(out)["logits"] for _, _, out in specs]


def relative_error(ours: torch.Tensor, stock: torch.Tensor) -> float:
    return ((ours - stock).abs().max() / ours.abs().max()).item()


def fixed_ids(count: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, count), generator=torch.Generator().manual_seed(7))


def mixed_schedule(model) -> Schedule:
    """4-bit, 8-bit, 5- and 6-bit, 16-bit linears, a dropped block, uniform head and MLP pruning,
    a quantized embedding (and head)."""
    adapter = adapter_for(model)
    path, roles = adapter.blocks_path, adapter.linears
    units = {
        f"{path}.0": Choice(bits=4, group_size=64, head_ratio=0.5, channel_ratio=0.25),
        f"{path}.0.{roles['o']}": Choice(bits=16),
        f"{path}.0.{next(iter(roles.values()))}": Choice(bits=4, group_size=32),
        f"{path}.1": Choice(drop=True),
        f"{path}.2": Choice(bits=8, group_size=128, head_ratio=0.5, channel_ratio=0.25),
        f"{path}.2.{roles['up' if 'up' in roles else 'gate_up']}": Choice(bits=6, group_size=32),
        f"{path}.2.{roles['down']}": Choice(bits=5, group_size=24),
        adapter.embeddings[0]: Choice(bits=8, group_size=32),
    }
    if not getattr(model.config, "tie_word_embeddings", False):
        units[adapter.lm_head] = Choice(bits=4, group_size=32)
    return Schedule(model_fingerprint(model), units)


def compressed(family: str, schedule_for=mixed_schedule) -> nn.Module:
    model = tiny_model(family)
    return apply(model, schedule_for(model), random_tokens(512).view(4, 128), progress=False)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """Each family compressed by the mixed schedule, exported in both layouts, plus a uniform
    4-bit model in the standard layout, and what stock transformers computes from each."""
    tmp = tmp_path_factory.mktemp("ct")
    ids = fixed_ids()
    cases = {}
    for family in FAMILIES:
        model = compressed(family)
        ours = logits_of(model, ids)
        for layout in Layout:
            result = export_compressed_tensors(model, tokenizer, tmp / f"{family}-{layout.value}", layout=layout)
            cases[(family, layout.value)] = (result, ours)
    uniform = compressed("llama", lambda m: Schedule.uniform(m, Choice(bits=4, group_size=32)))
    cases[("llama", "uniform")] = (export_compressed_tensors(uniform, tokenizer, tmp / "uniform"),
                                   logits_of(uniform, ids))
    loadable = [key for key, (result, _) in cases.items() if result.transformers_loadable]
    stock = stock_logits([(cases[key][0].path, ids) for key in loadable], tmp)
    return cases, dict(zip(loadable, stock))


@pytest.mark.parametrize("family", FAMILIES)
def test_portable_export_loads_in_stock_transformers_with_the_same_logits(exported, family):
    cases, stock = exported
    result, ours = cases[(family, "portable")]
    assert result.transformers_loadable
    assert relative_error(ours, stock[(family, "portable")]) <= TOLERANCE


def test_uniform_standard_export_loads_in_stock_transformers(exported):
    cases, stock = exported
    result, ours = cases[("llama", "uniform")]
    assert result.transformers_loadable and result.layout is Layout.STANDARD
    assert {(r.bits, r.group_size, r.symmetric) for r in result.linears if r.format != "dense"} == {(4, 32, False)}
    assert relative_error(ours, stock[("llama", "uniform")]) <= TOLERANCE


def test_records_say_what_each_layer_became(exported):
    cases, _ = exported
    result, _ = cases[("llama", "standard")]
    assert isinstance(result, CTExport) and result.total_bytes > 0
    records = {r.name: r for r in result.linears}
    assert not any(name.startswith("model.layers.2.") for name in records)  # 3 blocks, one dropped
    assert records["model.layers.0.self_attn.q_proj"].bits == 4
    assert records["model.layers.0.self_attn.q_proj"].group_size == 32
    assert records["model.layers.0.self_attn.k_proj"].group_size is None  # g64 over 64 inputs: per channel
    assert records["model.layers.0.self_attn.o_proj"].format == "dense"
    assert records["model.layers.1.self_attn.q_proj"].bits == 8
    assert records["model.layers.1.mlp.up_proj"].bits == 6
    down = records["model.layers.1.mlp.down_proj"]
    assert (down.bits, down.group_size) == (5, 24)  # 96 channels pruned to 72, groups of 24
    assert records["model.layers.0.mlp.down_proj"].group_size == 8  # g64 does not divide 72: gcd, scales repeated
    assert records["lm_head"].bits == 4
    assert "dequantized" in result.embedding
    assert not result.transformers_loadable  # mixed asymmetric groups: see Layout.STANDARD
    config = json.loads((result.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 72
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert "model.layers.0.self_attn.o_proj" in quant["ignore"]
    targets = [t for group in quant["config_groups"].values() for t in group["targets"]]
    assert sorted(targets) == sorted(r.name for r in result.linears if r.format != "dense")


def test_tied_head_is_written_once_with_the_dequantized_embedding(exported):
    cases, _ = exported
    result, _ = cases[("gemma", "standard")]
    assert "tied head" in result.embedding
    names = safetensors.safe_open(str(result.path / "model.safetensors"), "pt").keys()
    assert "lm_head.weight" not in names
    assert json.loads((result.path / "config.json").read_text())["tie_word_embeddings"] is True


def test_standard_layout_is_what_compressed_tensors_decompresses_exactly(exported):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    cases, _ = exported
    result, _ = cases[("qwen2", "standard")]
    config = QuantizationConfig.model_validate(json.loads((result.path / "config.json").read_text())
                                               ["quantization_config"])
    tensors = safetensors.torch.load_file(str(result.path / "model.safetensors"))
    model = compressed("qwen2")
    checked = 0
    for group in config.config_groups.values():
        for name in group.targets:
            state = {key.removeprefix(f"{name}."): value for key, value in tensors.items()
                     if key.startswith(f"{name}.weight")}
            weight = BaseCompressor.get_value_from_registry(group.format).decompress(state, group)["weight"]
            assert torch.equal(weight.float(), model.get_submodule(name).dequantized_weight()), name
            checked += 1
    assert checked == sum(r.format != "dense" for r in result.linears) > 5


def test_pack_int32_matches_compressed_tensors_for_every_width():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    for bits in range(1, 9):
        for cols in (1, 7, 33, 96):
            codes = torch.randint(0, 1 << bits, (5, cols), generator=torch.Generator().manual_seed(bits))
            signed = (codes - (1 << (bits - 1))).to(torch.int8)
            assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
            assert torch.equal(pack_int32(codes.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


def test_symmetric_codes_need_no_zero_points_and_clipped_zeros_still_fit():
    torch.manual_seed(0)
    linear = quantize_linear(nn.Linear(64, 16), 4, 32)
    linear.zeros.fill_(8)  # midpoint: symmetric
    packed = pack_linear(linear)
    assert packed.symmetric and "weight_zero_point" not in packed.tensors
    linear.zeros.fill_(-3)  # a clipping observer may put the zero outside [0, 15]
    packed = pack_linear(linear)
    assert packed.bits == 8 and "8 bits" in packed.note


def two_four_schedule(model) -> Schedule:
    path = adapter_for(model).blocks_path
    return Schedule(model_fingerprint(model), {
        f"{path}.0": Choice(bits=4, group_size=32, sparsity=0.5, pattern=SparsityPattern.TWO_FOUR,
                            score=PruneScore.MAGNITUDE),
        f"{path}.1": Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR, score=PruneScore.MAGNITUDE)})


def test_two_four_sparsity_is_recorded_and_stored_dense(tmp_path, tokenizer):
    model = compressed("llama", two_four_schedule)
    ids = fixed_ids()
    result = export_compressed_tensors(model, tokenizer, tmp_path / "out", layout=Layout.PORTABLE)
    sparse = {r.name for r in result.linears if r.sparsity == "2:4"}
    assert {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)} <= sparse
    assert not any(r.sparsity for r in result.linears if r.name.startswith("model.layers.2."))
    assert all("stored dense" in r.note for r in result.linears if r.sparsity)
    [stock] = stock_logits([(result.path, ids)], tmp_path)
    assert relative_error(logits_of(model, ids), stock) <= TOLERANCE


def test_non_uniform_pruning_is_refused_naming_gguf_and_nothing_is_written(tmp_path, tokenizer):
    model = compressed("llama", lambda m: Schedule(model_fingerprint(m), {
        "model.layers.0": Choice(channel_ratio=0.5), "model.layers.1": Choice(head_ratio=0.5)}))
    with pytest.raises(UserError, match="gguf") as error:
        export_compressed_tensors(model, tokenizer, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_gguf_blocks_are_refused_naming_gguf(tmp_path, tokenizer):
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj.gguf_type = "Q4_K"
    with pytest.raises(UserError, match="--format gguf"):
        export_compressed_tensors(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_layout_is_refused(tmp_path, tokenizer):
    with pytest.raises(UserError, match="gguf"):
        export_compressed_tensors(tiny_model("gpt2"), tokenizer, tmp_path / "out")


def test_existing_directory_needs_overwrite(tmp_path, tokenizer):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists"):
        export_compressed_tensors(model, tokenizer, out)
    assert (out / "keep.txt").exists()
    export_compressed_tensors(model, tokenizer, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, tokenizer, monkeypatch):
    import autocompress.export.compressed_tensors as module

    def broken(*args, **kwargs):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(module.safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk vanished"):
        export_compressed_tensors(tiny_model("llama"), tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_smollm2_4bit_export_loads_in_stock_transformers(tmp_path, smollm2):
    import copy

    model = copy.deepcopy(smollm2.model)
    apply(model, Schedule.uniform(model, Choice(bits=4, group_size=128)), progress=False)
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
    assert ids.shape[1] == 64
    result = export_compressed_tensors(model, smollm2.tokenizer, tmp_path / "smollm2")
    assert result.transformers_loadable
    # hidden size 576 is not a multiple of 128: every layer shares groups of 64 (scales repeated)
    assert {(r.bits, r.group_size, r.symmetric) for r in result.linears if r.format != "dense"} == {(4, 64, False)}
    [stock] = stock_logits([(result.path, ids)], tmp_path)
    assert relative_error(logits_of(model, ids), stock) <= TOLERANCE
