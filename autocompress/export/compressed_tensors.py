"""Export a compressed model as a compressed-tensors checkpoint that stock tools load.

transformers (with the ``compressed-tensors`` package) and vLLM read the directory without
autocompress. What it holds:

* ``model.safetensors``: every quantized linear in compressed-tensors' tensors
  (``weight_packed`` int32, ``weight_scale``, ``weight_shape``, ``weight_zero_point`` where
  asymmetric), every other tensor in 16 bits (its storage type, so the values are the ones the
  in-memory model computes with);
* ``config.json``: the family's config with the compressed sizes (fewer layers after dropped
  blocks, fewer heads or a narrower MLP after uniform pruning) and a ``quantization_config``
  with one config group per distinct (format, bits, group size, symmetric) combination, its
  ``targets`` the exact module names, 16-bit linears in ``ignore``;
* the tokenizer files and ``generation_config.json``.

Our codes map onto compressed-tensors exactly (:mod:`autocompress.export.ct_packing` packs
each linear and says how). Where packed zero points cannot go, :class:`Layout` says what is
written instead.

What cannot be expressed: per-block shapes (non-uniform pruning), GGUF blocks and LoRA
adapters, refused with a one-line :class:`UserError` (naming ``--format gguf``); a quantized
token embedding (and a head tied to it), written dequantized; 2:4 sparsity, stored dense
because compressed-tensors dropped its sparse-24 format after 0.14 (both noted in the records).

Example::

    model, tokenizer = load_compressed("runs/x/model")
    result = export_compressed_tensors(model, tokenizer, "runs/x/ct")
    result.transformers_loadable       # False: re-export with layout=Layout.PORTABLE
    # elsewhere, without autocompress:
    AutoModelForCausalLM.from_pretrained("runs/x/ct")
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..compress.apply import block_head_layout
from ..compress.quant_embedding import QuantEmbedding, head_is_tied
from ..compress.quantize import QuantLinear
from ..compress.saving import commit_dir, staging_dir
from ..compress.storage import storage_dtype
from ..errors import UserError
from ..models import adapter_for, config_head_dim
# packing lives in ct_packing; its public names stay importable from here
from .ct_packing import (INT, PACKED, Layout, _join, natural_group, pack_int32, pack_linear,  # noqa: F401
                         shared_group_width, two_four)

WEIGHTS = "model.safetensors"
DENSE = "dense"
GGUF_HINT = "use --format gguf, which carries per-layer shapes and GGUF blocks"


@dataclass(frozen=True)
class LinearExport:
    """How one linear layer was written.

    ``bits`` 16 and ``format`` ``dense`` for a 16-bit layer; ``group_size`` is the group size
    in the file (None: one scale per output row); ``sparsity`` is ``"2:4"`` when the weight
    has that pattern (stored dense); ``note`` says what differs from the in-memory layout.
    """

    name: str
    in_features: int
    bits: int
    group_size: int | None
    symmetric: bool | None
    format: str
    sparsity: str | None = None
    note: str = ""


@dataclass(frozen=True)
class CTExport:
    """The result of :func:`export_compressed_tensors`: where, what, how many bytes, and whether
    transformers 5.24 with compressed-tensors 0.20.1 can load it (see :class:`Layout`)."""

    path: Path
    linears: tuple[LinearExport, ...]
    embedding: str | None
    total_bytes: int
    layout: Layout
    transformers_loadable: bool


# ---------------------------------------------------------------------------------------
# Structure


def _refuse_inexpressible(model: nn.Module) -> None:
    """UserError for modules no stock layout holds: GGUF blocks and LoRA adapters."""
    for name, module in model.named_modules():
        if hasattr(module, "gguf_type"):
            raise UserError(f"{name} holds GGUF blocks ({module.gguf_type}), which compressed-tensors cannot express; "
                            f"{GGUF_HINT}")
        if hasattr(module, "lora_record"):
            raise UserError(f"{name} carries LoRA adapters, which compressed-tensors cannot express; merge them into "
                            f"the codes first, or {GGUF_HINT}")


def export_config(model: nn.Module):
    """A copy of ``model.config`` with the compressed sizes; UserError if blocks differ in shape."""
    adapter = adapter_for(model)
    if adapter.conv1d:
        raise UserError(f"{adapter.family}'s Conv1D projections cannot hold compressed-tensors weights; {GGUF_HINT}")
    config = copy.deepcopy(model.config)
    blocks = adapter.blocks(model)
    shapes = {(layout.num_heads, layout.num_kv_heads, adapter.mlp_channels(block))
              for block in blocks for layout in [block_head_layout(block, adapter, model.config)]}
    if len(shapes) > 1:
        detail = ", ".join(f"{h} heads/{kv} kv/{c} channels" for h, kv, c in sorted(shapes))
        raise UserError(f"blocks differ in shape ({detail}); a stock config has one shape for every layer, "
                        f"so compressed-tensors cannot express this model: {GGUF_HINT}")
    heads, kv_heads, channels = shapes.pop()
    config.head_dim = config_head_dim(model.config)  # explicit: heads * head_dim may no longer be hidden_size
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    width_key = "ffn_dim" if hasattr(config, "ffn_dim") else "intermediate_size"
    setattr(config, width_key, channels)
    config.num_hidden_layers = len(blocks)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _check_shapes(config, tensors: dict[str, tuple[int, ...]], tied: bool) -> None:
    """Refuse when the stock model built from ``config`` would expect other shapes than ours."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    expected = {name: tuple(t.shape) for name, t in stock.state_dict().items()}
    for name, shape in tensors.items():
        if expected.get(name, shape) != shape:
            raise UserError(f"{name}: the stock {config.model_type} layout expects shape {expected[name]}, ours is "
                            f"{shape}; compressed-tensors cannot express this model: {GGUF_HINT}")
    missing = sorted(set(expected) - set(tensors) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise UserError(f"{missing[0]}: the stock {config.model_type} layout expects this tensor, which the "
                        f"compressed model lacks; compressed-tensors cannot express it: {GGUF_HINT}")


# ---------------------------------------------------------------------------------------
# Tensors and config


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)


def _sixteen_bit(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.bfloat16):
        tensor = tensor.to(storage_dtype(tensor))
    return tensor.contiguous()


def _lossless_16(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in 16 bits when that keeps every value, else as it is (a dequantized table)."""
    tensor = tensor.detach().cpu()
    small = tensor.to(storage_dtype(tensor))
    return (small if torch.equal(small.to(tensor.dtype), tensor) else tensor).contiguous()


def _scheme(bits: int, group_size: int | None, symmetric: bool) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": "group" if group_size else "channel", "dynamic": False, "actorder": None}


def quantization_config(records: list[LinearExport], ignore: list[str]) -> tuple[dict, bool]:
    """compressed-tensors' ``quantization_config`` for these layer records, and whether
    transformers 5.24 with compressed-tensors 0.20.1 loads it (see :class:`Layout`)."""
    groups: dict[tuple, list[str]] = {}
    for record in records:
        if record.format != DENSE:
            groups.setdefault((record.format, record.bits, record.group_size, record.symmetric), []).append(record.name)
    config_groups = {}
    ordered = sorted(groups.items(), key=lambda item: str(item[0]))
    for index, ((fmt, bits, group_size, symmetric), names) in enumerate(ordered):
        config_groups[f"group_{index}"] = {"targets": names, "weights": _scheme(bits, group_size, symmetric),
                                           "input_activations": None, "output_activations": None, "format": fmt}
    formats = {fmt for fmt, *_ in groups}
    config = {"quant_method": "compressed-tensors",
              "format": formats.pop() if len(formats) == 1 else ("mixed-precision" if formats else DENSE),
              "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
              "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}
    packed_zeros = any(fmt == PACKED and not symmetric for fmt, _, _, symmetric in groups)
    if packed_zeros and len(groups) == 1:
        # transformers' load-time dequantization reads packed zero points correctly, but with
        # one scheme for every layer; vLLM ignores this key.
        config["dequantize"] = True
    return config, not packed_zeros or len(groups) == 1


def _linears(model: nn.Module, tied: bool) -> list[tuple[str, nn.Module]]:
    """Every linear written as a linear (a tied head is not: it is the embedding), by name."""
    head = adapter_for(model).lm_head
    return sorted((name, module) for name, module in model.named_modules()
                  if isinstance(module, (nn.Linear, QuantLinear)) and not (tied and name == head))


def _collect(model: nn.Module, dtype: torch.dtype, layout: Layout,
             group_width: int | None = None) -> tuple[dict, dict, list[LinearExport], list[str], str | None, bool]:
    """Everything to write: tensors, stock shapes, per-linear records, ignored names, embedding note, tied."""
    adapter = adapter_for(model)
    embedding_name, head_name = adapter.embeddings[0], adapter.lm_head
    embedding = model.get_submodule(embedding_name)
    head = model.get_submodule(head_name)
    tied = head_is_tied(model)
    tensors, shapes, records, ignore = {}, {}, [], []
    embedding_note = None
    replaced = set()  # modules written here, not through the state dict

    if isinstance(embedding, QuantEmbedding):
        weight = embedding.dequantized_weight().to(dtype)
        tensors[f"{embedding_name}.weight"] = _lossless_16(weight)
        shapes[f"{embedding_name}.weight"] = tuple(weight.shape)
        replaced.add(embedding_name)
        embedding_note = (f"{embedding.bits}-bit embedding written dequantized "
                          f"({tensors[f'{embedding_name}.weight'].dtype}); compressed-tensors has no stock loading "
                          f"for quantized embeddings" + ("; the tied head shares it" if tied else ""))
    if tied:
        replaced.add(head_name)
        if head.bias is not None:
            tensors[f"{head_name}.bias"] = _sixteen_bit(head.bias)
            shapes[f"{head_name}.bias"] = tuple(head.bias.shape)

    linears = _linears(model, tied)
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    for name, module in linears:
        packed = pack_linear(module, layout, scale_dtype, group_width) if isinstance(module, QuantLinear) else None
        dense = None if packed is not None else (module.dequantized_weight().to(dtype)
                                                 if isinstance(module, QuantLinear) else module.weight.detach())
        sparsity = "2:4" if (packed.two_four if packed is not None else two_four(dense != 0)) else None
        note = "2:4 stored dense: compressed-tensors 0.15+ has no sparse-24 format" if sparsity else ""
        shapes[f"{name}.weight"] = (module.out_features, module.in_features)
        if module.bias is not None:
            tensors[f"{name}.bias"] = _sixteen_bit(module.bias)
            shapes[f"{name}.bias"] = tuple(module.bias.shape)
        if packed is None:
            if isinstance(module, QuantLinear):
                note = _join(note, "zero points not packable: dequantized")
                tensors[f"{name}.weight"] = _lossless_16(dense)
            else:
                tensors[f"{name}.weight"] = _sixteen_bit(dense)
            ignore.append(name)
            records.append(LinearExport(name, module.in_features, 16, None, None, DENSE, sparsity, note))
            continue
        tensors.update({f"{name}.{key}": value for key, value in packed.tensors.items()})
        records.append(LinearExport(name, module.in_features, packed.bits, packed.group_size, packed.symmetric,
                                    packed.format, sparsity,
                                    _join(packed.note, note)))
        replaced.add(name)

    prefixes = tuple(f"{name}." for name in replaced | {name for name, _ in linears})
    for key, value in model.state_dict().items():
        if key not in tensors and not key.startswith(prefixes):
            tensors[key] = _sixteen_bit(value)
            shapes[key] = tuple(value.shape)
    if tied:
        ignore.append(head_name)
    return tensors, shapes, records, ignore, embedding_note, tied


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: give every tensor its own."""
    seen, out = set(), {}
    for key, value in tensors.items():
        ptr = (value.data_ptr(), value.numel())
        out[key] = value.clone() if value.numel() and ptr in seen else value
        seen.add(ptr)
    return out


# ---------------------------------------------------------------------------------------
# Writing


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *,
                              overwrite: bool = False, layout: Layout = Layout.STANDARD) -> CTExport:
    """Write ``model`` (compressed by :func:`~autocompress.compress.apply.apply` or loaded by
    :func:`~autocompress.compress.saving.load_compressed`) as a compressed-tensors checkpoint.

    Quantized linears become group-wise int weights that reproduce our codes exactly
    (``pack-quantized``, asymmetric with packed zero points or symmetric where every zero is
    the midpoint; ``layout`` says how asymmetric layers are written, see :class:`Layout`),
    16-bit linears are listed in ``ignore``. Dropped blocks and uniform head or channel pruning
    go into the config; per-block shapes, GGUF blocks and LoRA adapters raise
    :class:`UserError`. The directory is written beside ``out_dir`` and renamed into place, so
    a failure leaves nothing half-written; an existing ``out_dir`` is refused unless
    ``overwrite``. The model is not changed.

    Example::

        result = export_compressed_tensors(model, tokenizer, "out/ct")
        if not result.transformers_loadable:   # mixed asymmetric schemes (see Layout)
            result = export_compressed_tensors(model, tokenizer, "out/ct", overwrite=True,
                                               layout=Layout.PORTABLE)
        [r for r in result.linears if r.format == "dense"]   # what stayed 16-bit
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another output directory or allow overwriting")
    _refuse_inexpressible(model)
    config = export_config(model)
    dtype = model_dtype(model)
    quantized = [module for _, module in _linears(model, head_is_tied(model)) if isinstance(module, QuantLinear)]
    width = shared_group_width(quantized) if layout is Layout.STANDARD else None
    tensors, shapes, records, ignore, embedding_note, tied = _collect(model, dtype, layout, width)
    config.tie_word_embeddings = tied
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = tied
    _check_shapes(config, shapes, tied)
    config_dict = config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    config_dict["quantization_config"], loadable = quantization_config(records, ignore)

    staging = staging_dir(out_dir)
    try:
        safetensors.torch.save_file(_dedupe(tensors), str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        total = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        commit_dir(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {out_dir}: {exc.strerror or exc}; free some space or choose another "
                            f"output directory") from None
        raise
    return CTExport(out_dir, tuple(records), embedding_note, total, layout, loadable)