"""GGUF export: architecture and metadata, round trip through the file, tokenizer metadata, bad input."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from autocompress.compress.apply import apply
from autocompress.compress.quant_embedding import QuantEmbedding, TiedQuantLinear
from autocompress.compress.storage import round_to_storage
from autocompress.errors import UserError
from autocompress.export.gguf_reader import gguf_to_torch
from autocompress.export.llamacpp import llamacpp_bin
from autocompress.export.gguf_writer import as_exported, export_gguf, rope_permutation
from autocompress.models import adapter_for, model_fingerprint, normalize
from autocompress.schedule import Choice, Schedule
from tiny import CONFIGS, random_tokens, tiny_model

LLAMACPP_BIN = llamacpp_bin()


def tied_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of ``family`` whose output head shares the token embedding."""
    config = CONFIGS[family]()
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    return normalize(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()


def mixed_schedule(model, *, structural: bool = True) -> Schedule:
    """16-, 8- and 4-bit linears, pruned heads (block 0), pruned channels (block 1), a dropped
    block (2) and a quantized tied embedding; ``structural=False`` keeps every shape."""
    path = adapter_for(model).blocks_path
    units = {
        f"{path}.0": Choice(bits=16, head_ratio=0.5 if structural else 0.0),
        f"{path}.0.self_attn.q_proj": Choice(bits=8, group_size=None),
        f"{path}.1": Choice(bits=4, group_size=32, channel_ratio=0.25 if structural else 0.0),
        f"{path}.1.mlp.down_proj": Choice(bits=16),
        f"{path}.2": Choice(drop=structural, bits=8, group_size=64),
        "model.embed_tokens": Choice(bits=8, group_size=64),
    }
    return Schedule(model_fingerprint(model), units)


def compressed(family: str, *, structural: bool = True) -> torch.nn.Module:
    model = tied_tiny(family)
    apply(model, mixed_schedule(model, structural=structural), random_tokens(4 * 32).view(4, 32), progress=False)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def field(path, key):
    reader = gguf.GGUFReader(path)
    value = reader.fields.get(key)
    return None if value is None else value.contents()


def test_mixed_llama_is_deci_and_round_trips(tmp_path, tokenizer):
    model = compressed("llama")
    export = export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedQuantLinear)
    assert export.arch == "deci" and export.tied_head
    path = export.path
    assert field(path, "general.architecture") == "deci"
    assert field(path, "deci.block_count") == 2  # block 2 was dropped
    assert field(path, "deci.attention.head_count") == [2, 4]
    assert field(path, "deci.attention.head_count_kv") == [1, 2]
    assert field(path, "deci.feed_forward_length") == [96, 72]
    assert field(path, "deci.attention.key_length") == 16 and field(path, "deci.rope.dimension_count") == 16
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in names and "blk.2.attn_q.weight" not in names
    types = {record.name: record for record in export.records}
    assert types["token_embd.weight"].type == "Q8_0" and not types["token_embd.weight"].exact
    assert types["blk.0.attn_q.weight"].type == "Q8_0" and types["blk.0.attn_q.weight"].source_bits == 8
    assert types["blk.0.attn_k.weight"].type == "F16" and types["blk.0.attn_k.weight"].exact
    assert types["blk.1.ffn_down.weight"].type == "F16" and types["blk.0.attn_norm.weight"].type == "F32"
    assert types["blk.1.attn_q.weight"].source_bits == 4 and not types["blk.1.attn_q.weight"].exact
    assert export.total_bytes == path.stat().st_size > export.tensor_bytes
    assert not list(path.parent.glob(".*part"))

    tokens = random_tokens(24, seed=1).view(2, 12)
    reference = as_exported(model, export)
    back = gguf_to_torch(path)
    assert relative(logits(back, tokens), logits(reference, tokens)) <= 1e-4
    # requantization changed something, but not much
    assert 0 < relative(logits(reference, tokens), logits(model, tokens)) < 0.2
    assert isinstance(model.lm_head, TiedQuantLinear)  # as_exported works on a copy


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")])
def test_uniform_model_keeps_its_architecture_with_scalars(family, arch, tmp_path, tokenizer):
    model = compressed(family, structural=False)
    export = export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    assert export.arch == arch
    assert field(export.path, f"{arch}.block_count") == 3
    assert field(export.path, f"{arch}.attention.head_count") == 4
    assert field(export.path, f"{arch}.attention.head_count_kv") == 2
    assert field(export.path, f"{arch}.feed_forward_length") == 96
    names = {t.name for t in gguf.GGUFReader(export.path).tensors}
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    tokens = random_tokens(24, seed=2).view(2, 12)
    assert relative(logits(gguf_to_torch(export.path), tokens), logits(as_exported(model, export), tokens)) <= 1e-4


def test_sixteen_bit_model_is_exact_and_its_own_reference(tmp_path, tokenizer):
    model = tiny_model("llama")
    apply(model, Schedule(model_fingerprint(model), {"model.layers.1": Choice(head_ratio=0.5)}),
          random_tokens(4 * 32).view(4, 32), progress=False)
    with torch.no_grad():  # beyond fp16's range: stored as bf16, written as BF16
        model.model.layers[2].mlp.up_proj.weight[0, 0] = 1e5
    round_to_storage(model)
    export = export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    assert export.arch == "deci" and not export.tied_head
    assert {record.name: record.type for record in export.records}["blk.2.ffn_up.weight"] == "BF16"
    assert all(record.exact for record in export.records) and as_exported(model, export) is model
    assert "output.weight" in {t.name for t in gguf.GGUFReader(export.path).tensors}
    tokens = random_tokens(24, seed=3).view(2, 12)
    assert relative(logits(gguf_to_torch(export.path), tokens), logits(model, tokens)) <= 1e-4


def test_rope_permutation_matches_llamacpp_converter():
    heads, head_dim = 3, 8
    weight = torch.arange(heads * head_dim * 2, dtype=torch.float32).reshape(heads * head_dim, 2)
    # llama.cpp's converter: reshape(n_head, 2, hd / 2, ...).swapaxes(1, 2).reshape(...)
    converted = weight.reshape(heads, 2, head_dim // 2, 2).swapaxes(1, 2).reshape(weight.shape)
    perm = rope_permutation(heads, head_dim)
    assert torch.equal(weight[perm], converted) and torch.equal(converted[perm.argsort()], weight)


def test_gguf_typed_modules_are_written_verbatim(tmp_path, tokenizer):
    pytest.importorskip("autocompress.export.gguf_quants")
    from autocompress.compress.gguf_linear import GGUFEmbedding, GGUFLinear, TiedGGUFLinear

    model = round_to_storage(tied_tiny("llama"))  # 16-bit values, as apply() leaves them
    block = model.model.layers[0]
    for name, kind in (("q_proj", "Q8_0"), ("k_proj", "Q4_0"), ("v_proj", "Q5_1")):
        old = getattr(block.self_attn, name)
        setattr(block.self_attn, name, GGUFLinear.from_weight(old.weight, kind))
    embedding = GGUFEmbedding.from_embedding(model.model.embed_tokens, "Q8_0")
    model.model.embed_tokens, model.lm_head = embedding, TiedGGUFLinear(embedding)
    export = export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    records = {record.name: record for record in export.records}
    assert records["blk.0.attn_q.weight"].type == "Q8_0" and records["blk.0.attn_q.weight"].exact
    assert records["blk.0.attn_k.weight"].type == "Q4_0" and records["token_embd.weight"].exact
    tensors = {t.name: t for t in gguf.GGUFReader(export.path).tensors}
    assert "output.weight" not in tensors
    q_blocks = block.self_attn.q_proj.blocks
    assert bytes(tensors["blk.0.attn_q.weight"].data) == bytes(q_blocks[rope_permutation(4, 16)].numpy())
    assert as_exported(model, export) is model
    tokens = random_tokens(24, seed=4).view(2, 12)
    assert relative(logits(gguf_to_torch(export.path), tokens), logits(model, tokens)) <= 1e-4


def test_importance_reaches_the_quantizer(monkeypatch, tmp_path, tokenizer):
    from autocompress.export import gguf_writer

    seen = {}
    quants = gguf_writer._quants()
    original = quants.quantize

    def spy(weight, type_name, importance=None):
        seen[weight.shape] = importance
        return original(weight, type_name, importance)

    monkeypatch.setattr(quants, "quantize", spy)
    model = compressed("llama", structural=False)
    importance = torch.rand(96) + 0.5
    export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False,
                importance={"model.layers.2.mlp.down_proj": importance})
    assert torch.equal(torch.as_tensor(seen[(64, 96)]), importance)


def test_failed_export_keeps_the_old_file(monkeypatch, tmp_path, tokenizer):
    from autocompress.export import gguf_writer

    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gguf_writer, "add_tokenizer", broken)
    with pytest.raises(RuntimeError):
        export_gguf(tiny_model("llama"), tokenizer, out, progress=False)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_unsupported_family_is_one_line_user_error(family, tmp_path, tokenizer):
    with pytest.raises(UserError) as error:
        export_gguf(tiny_model(family), tokenizer, tmp_path / "model.gguf", progress=False)
    message = str(error.value)
    assert "\n" not in message and family in message and "llama" in message and "qwen2" in message
    assert not list(tmp_path.iterdir())


def test_unevenly_pruned_qwen2_is_one_line_user_error(tmp_path, tokenizer):
    with pytest.raises(UserError) as error:
        export_gguf(compressed("qwen2"), tokenizer, tmp_path / "model.gguf", progress=False)
    assert "\n" not in str(error.value) and "qwen2" in str(error.value)


def test_missing_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer"):
        export_gguf(tiny_model("llama"), None, tmp_path / "model.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def _read_llamacpp_logprobs(path: Path):
    """(tokens [chunks, n_ctx], log-probs [chunks, rows, vocab], first scored position) from the file
    ``llama-perplexity --kl-divergence-base`` writes: per scored position a float scale and
    minimum, then the vocabulary's log-probs as uint16 steps above that minimum."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw, np.int32, 3, 8))
    offset = 20
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, offset).reshape(n_chunk, n_ctx)
    offset += tokens.nbytes
    first = n_ctx // 2
    rows, width = n_ctx - 1 - first, 2 * ((n_vocab + 1) // 2) + 4
    data = np.frombuffer(raw, np.uint16, n_chunk * rows * width, offset).reshape(n_chunk, rows, width)
    head = data[..., :4].copy().view(np.float32)  # (scale, minimum log-prob) per row
    return tokens, head[..., 1:2] + head[..., 0:1] * data[..., 4:4 + n_vocab].astype(np.float32), first


@pytest.mark.skipif(not (LLAMACPP_BIN / "llama-perplexity").exists(),
                    reason="llama.cpp binaries not built (bench/llamacpp.sh build)")
@pytest.mark.parametrize("family, structural, arch", [("llama", True, "deci"), ("llama", False, "llama"),
                                                      ("qwen2", False, "qwen2")])
def test_llamacpp_computes_what_as_exported_computes(family, structural, arch, tokenizer, tmp_path):
    model = tied_tiny(family)
    with torch.no_grad():  # sharper attention, so that a wrong Q/K row order would show in the logits
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(4.0)
            block.self_attn.o_proj.weight.mul_(4.0)
    apply(model, mixed_schedule(model, structural=structural), random_tokens(4 * 32).view(4, 32), progress=False)
    export = export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    assert export.arch == arch
    text = " ".join(["the quick brown fox jumps over the lazy dog, then 1234 numbers follow."] * 40)
    (tmp_path / "text.txt").write_text(text)
    result = subprocess.run([str(LLAMACPP_BIN / "llama-perplexity"), "-m", str(export.path), "-f",
                             str(tmp_path / "text.txt"), "-c", "64", "-b", "64", "--chunks", "3", "-t", "1",
                             "--kl-divergence-base", str(tmp_path / "logits.bin")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tokens, theirs, first = _read_llamacpp_logprobs(tmp_path / "logits.bin")
    # llama.cpp tokenized the text from the GGUF vocabulary exactly as the HF tokenizer does
    assert tokens.reshape(-1).tolist() == tokenizer(text)["input_ids"][:tokens.size]
    ours = torch.log_softmax(logits(as_exported(model, export), torch.from_numpy(tokens.astype(np.int64))).double(),
                             dim=-1)[:, first:-1].numpy()
    kept = theirs > theirs.min(axis=-1, keepdims=True) + 1e-3  # llama.cpp clips 16 nats below the top
    difference = np.abs(ours - theirs)[kept]
    # llama.cpp rounds activations to 8 bits for quantized matmuls; a wrong rope order is ~5x this
    assert difference.max() < 0.015 and difference.mean() < 0.002


@pytest.mark.real
def test_smollm2_tokenizer_metadata_matches_its_source_gguf(smollm2, tmp_path):
    source = smollm2.path
    model = smollm2.model
    export = export_gguf(model, smollm2.tokenizer, tmp_path / "smollm2.gguf", progress=False)
    assert export.arch == "llama" and export.tied_head
    ours, theirs = gguf.GGUFReader(export.path), gguf.GGUFReader(source)
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template")
    for key in keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "context_length", "vocab_size"):
        assert ours.fields[f"llama.{key}"].contents() == theirs.fields[f"llama.{key}"].contents(), key
    assert {r.type for r in export.records if len(r.shape) == 2} == {"F16"}  # an uncompressed model: every weight F16


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 50000.0},
])
def test_rope_scaling_round_trips(rope, tmp_path, tokenizer):
    config = CONFIGS["llama"]()
    config.rope_parameters = rope
    torch.manual_seed(0)
    model = round_to_storage(normalize(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval())
    export = export_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    names = {t.name for t in gguf.GGUFReader(export.path).tensors}
    assert ("rope_freqs.weight" in names) == (rope["rope_type"] == "llama3")
    assert field(export.path, "llama.rope.freq_base") == rope["rope_theta"]
    tokens = random_tokens(80, seed=5).view(1, 80)
    assert relative(logits(gguf_to_torch(export.path), tokens), logits(model, tokens)) <= 1e-4
