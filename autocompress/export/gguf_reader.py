"""Read a GGUF written by :func:`~.gguf_writer.export_gguf` back into a PyTorch model (for round-trip tests).

Everything comes from the file: the architecture (``llama``, ``deci`` or ``qwen2``), the
per-layer head counts and MLP widths (scalars, or ``deci``'s arrays), and the tensors,
dequantized with :mod:`autocompress.export.gguf_quants` and with the Q/K rope permutation
undone. The result is a plain ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` in fp32 whose
blocks are resized one by one, as autocompress resizes pruned blocks.

Example::

    model = gguf_to_torch("model.gguf")
    logits = model(input_ids=tokens).logits
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.utils import skip_init

from ..errors import UserError
from .gguf_writer import BLOCK_NORMS, BLOCK_TENSORS, PERMUTED_ARCHITECTURES, read_dense, rope_permutation

_LINEAR_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _per_layer(reader, key: str, layers: int) -> list[int]:
    value = _value(reader, key)
    if value is None:
        raise UserError(f"GGUF file has no {key!r}")
    if isinstance(value, list):
        if len(value) != layers:
            raise UserError(f"GGUF file: {key!r} has {len(value)} entries for {layers} layers")
        return [int(v) for v in value]
    return [int(value)] * layers


def gguf_to_torch(path: str | os.PathLike) -> nn.Module:
    """A ``transformers`` causal LM (fp32, eval mode) holding exactly what the GGUF at ``path`` holds.

    Supports the architectures :func:`~.gguf_writer.export_gguf` writes: ``llama``, ``deci``
    (per-layer sizes) and ``qwen2``. Raises :class:`UserError` for any other.
    """
    import gguf  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415
    from transformers.initialization import no_init_weights  # noqa: PLC0415

    reader = gguf.GGUFReader(os.fspath(path))
    arch = _value(reader, "general.architecture")
    if arch not in ("llama", "deci", "qwen2"):
        raise UserError(f"{path}: GGUF architecture {arch!r} cannot be read back; supported: llama, deci, qwen2")
    layers = int(_value(reader, f"{arch}.block_count"))
    heads = _per_layer(reader, f"{arch}.attention.head_count", layers)
    kv_heads = _per_layer(reader, f"{arch}.attention.head_count_kv", layers)
    channels = _per_layer(reader, f"{arch}.feed_forward_length", layers)
    hidden = int(_value(reader, f"{arch}.embedding_length"))
    head_dim = int(_value(reader, f"{arch}.attention.key_length", hidden // heads[0]))
    names = {t.name for t in reader.tensors}
    embedding = read_dense(reader, "token_embd.weight")
    theta = float(_value(reader, f"{arch}.rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if _value(reader, f"{arch}.rope.scaling.type") == "linear":
        factor = float(_value(reader, f"{arch}.rope.scaling.factor"))
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    common = dict(vocab_size=embedding.shape[0], hidden_size=hidden, intermediate_size=max(channels),
                  num_hidden_layers=layers, num_attention_heads=max(heads), num_key_value_heads=max(kv_heads),
                  head_dim=head_dim, max_position_embeddings=int(_value(reader, f"{arch}.context_length", 2048)),
                  rms_norm_eps=float(_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
                  rope_parameters=rope, tie_word_embeddings="output.weight" not in names)
    if arch == "qwen2":
        config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config = LlamaConfig(**common, attention_bias="blk.0.attn_q.bias" in names)
        model_class = LlamaForCausalLM
    with no_init_weights():
        model = model_class(config).float()
    model.model.embed_tokens.weight.data.copy_(embedding)
    model.model.norm.weight.data.copy_(read_dense(reader, "output_norm.weight"))
    if "output.weight" in names:
        model.lm_head.weight.data.copy_(read_dense(reader, "output.weight"))
    else:
        model.lm_head.weight = model.model.embed_tokens.weight
    permute = arch in PERMUTED_ARCHITECTURES
    for index, block in enumerate(model.model.layers):
        _load_block(reader, names, block, index, heads[index], kv_heads[index], channels[index], head_dim, permute)
    if "rope_freqs.weight" in names:  # Llama 3 rope scaling: llama.cpp divides each frequency by its factor
        rotary = model.model.rotary_emb
        rotary.inv_freq = rotary.inv_freq / read_dense(reader, "rope_freqs.weight").to(rotary.inv_freq.dtype)
        rotary.original_inv_freq = rotary.inv_freq
    return model.eval()


def _load_block(reader, names: set[str], block: nn.Module, index: int, heads: int, kv_heads: int, channels: int,
                head_dim: int, permute: bool) -> None:
    """Resize one decoder block to its own sizes and fill it from the file."""
    for norm, gguf_norm in BLOCK_NORMS.items():
        block.get_submodule(norm).weight.data.copy_(read_dense(reader, f"blk.{index}.{gguf_norm}.weight"))
    undo = {"q": rope_permutation(heads, head_dim).argsort() if permute else None,
            "k": rope_permutation(kv_heads, head_dim).argsort() if permute else None}
    for role, gguf_name in BLOCK_TENSORS.items():
        weight = read_dense(reader, f"blk.{index}.{gguf_name}.weight")
        bias_name = f"blk.{index}.{gguf_name}.bias"
        bias = read_dense(reader, bias_name) if bias_name in names else None
        if undo.get(role) is not None:
            weight = weight[undo[role]]
            bias = bias[undo[role]] if bias is not None else None
        linear = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight.data.copy_(weight)
        if bias is not None:
            linear.bias.data.copy_(bias)
        parent, _, attribute = _LINEAR_PATHS[role].rpartition(".")
        setattr(block.get_submodule(parent), attribute, linear)
    attention = block.self_attn
    attention.num_key_value_groups = heads // kv_heads
    for attribute, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attention, attribute, None), int):
            setattr(attention, attribute, value)
    if isinstance(getattr(block.mlp, "intermediate_size", None), int):
        block.mlp.intermediate_size = channels


__all__ = ["gguf_to_torch"]
