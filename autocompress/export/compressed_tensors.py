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

Our codes map onto compressed-tensors exactly. We keep unsigned codes ``q`` in [0, 2**b - 1]
and an fp16 integer zero ``z`` per (row, group): ``w = (q - z) * s``. compressed-tensors keeps
signed codes ``q - 2**(b-1)`` and zero points ``z - 2**(b-1)`` and computes
``(q_signed - zp_signed) * s``, the same number; its packer adds the offset back, so the int32
words hold ``q`` as one little-endian bit stream per row (code i at bits [i*b, (i+1)*b), codes
may straddle words; 1 to 8 bits). Zero points are packed the same way along the output
dimension. Where packed zero points cannot go, :class:`Layout` says what is written instead.

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
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from autocompress.kernels import packing

from ..compress.apply import block_head_layout
from ..compress.quant_embedding import QuantEmbedding, TiedQuantLinear
from ..compress.quantize import QuantLinear
from ..compress.storage import storage_dtype
from ..errors import UserError
from ..models import adapter_for, config_head_dim

WEIGHTS = "model.safetensors"
PACKED = "pack-quantized"
INT = "int-quantized"
DENSE = "dense"
GGUF_HINT = "use --format gguf, which carries per-layer shapes and GGUF blocks"


class Layout(str, Enum):
    """How asymmetric layers (a zero point per group) are written.

    ``STANDARD``: as compressed-tensors itself and llm-compressor write them, the zero points
    packed in ``weight_zero_point``; what vLLM's WNA16 kernels read. transformers 5.24 with
    compressed-tensors 0.20.1 cannot load packed zero points through its usual path (its
    meta-device pass keeps them unpacked, then refuses the shapes; llm-compressor issue #1618);
    with a single config group the checkpoint asks transformers to dequantize while loading,
    which does work, and :attr:`CTExport.transformers_loadable` says which case this is.

    ``PORTABLE``: no packed zero points, which that pair of versions loads whatever the mix:
    an asymmetric b-bit layer becomes symmetric codes ``q - z`` in the fewest bits that hold
    them (at most b + 1), an asymmetric layer that would need 9 becomes ``int-quantized`` int8
    codes with unpacked int8 zero points. Exact, but those layers grow by a bit, and vLLM
    serves only the bit widths its WNA16 kernels take.
    """

    STANDARD = "standard"
    PORTABLE = "portable"


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


@dataclass(frozen=True)
class _Packed:
    """One linear in compressed-tensors tensors, plus its scheme."""

    tensors: dict[str, torch.Tensor]
    bits: int
    group_size: int | None
    symmetric: bool
    format: str
    note: str
    two_four: bool


# ---------------------------------------------------------------------------------------
# Packing


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes [R, C] (1 <= bits <= 8) as compressed-tensors' int32 rows
    [R, ceil(C * bits / 32)]: one little-endian bit stream per row, code i at bits
    [i*bits, (i+1)*bits), a code may straddle two words."""
    rows, cols = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-cols) % 32)).view(rows, -1, 32)
    start = torch.arange(32, dtype=torch.int64) * bits  # 32 codes fill exactly `bits` words
    word, offset = start // 32, start % 32
    words = torch.zeros(rows, padded.shape[1], bits + 1, dtype=torch.int64)
    index = word.expand_as(padded)
    words.scatter_add_(2, index, (padded << offset) & 0xFFFFFFFF)  # disjoint bits: adding is OR
    words.scatter_add_(2, index + 1, padded >> (32 - offset))      # the part past the word's end
    words = words[..., :bits].reshape(rows, -1)[:, :math.ceil(cols * bits / 32)]
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()  # two's complement wrap


def natural_group(group_size: int, in_features: int) -> int:
    """The group width compressed-tensors can hold for our ``group_size`` over ``in_features`` inputs.

    Our last group may be narrower than the others; compressed-tensors needs the width to divide
    K, so a group size that does not is stored as gcd(g, K), each narrower group repeating its
    original group's scale and zero (the same weights exactly). Per-channel is K.
    """
    return in_features if group_size >= in_features else math.gcd(group_size, in_features)


def _group_layout(scales: torch.Tensor, zeros: torch.Tensor, group_size: int, in_features: int,
                  width: int | None = None):
    """(scales, zeros, stored group size or None for per-channel, note) with groups of ``width``
    columns (a divisor of the natural width; default the natural width itself)."""
    ours = min(group_size, in_features)
    stored = width or natural_group(group_size, in_features)
    first = torch.arange(0, in_features, stored) // ours  # the original group each stored group lies in
    note = "" if stored in (ours, in_features) else f"group size {ours} stored as {stored} (repeated scales)"
    # an explicit width stays a group (not per-channel) even when it spans K, so layers share a scheme
    return scales[:, first], zeros[:, first], (None if width is None and stored == in_features else stored), note


def _signed_bits(low: int, high: int) -> int:
    """The fewest bits whose signed range [-2**(b-1), 2**(b-1) - 1] holds [low, high]."""
    bits = 1
    while low < -(1 << (bits - 1)) or high > (1 << (bits - 1)) - 1:
        bits += 1
    return bits


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def pack_linear(module: QuantLinear, layout: Layout = Layout.STANDARD,
                scale_dtype: torch.dtype = torch.float16, group_width: int | None = None) -> _Packed | None:
    """compressed-tensors tensors for ``module`` in ``layout``, or None when no exact packed form exists.

    compressed-tensors keeps signed codes: our unsigned code ``q`` is ``q - 2**(b-1)`` there and
    our zero ``z`` is ``z - 2**(b-1)``; its packer adds the offset back, so the int32 words hold
    ``q`` itself. A layer whose zeros are all ``2**(b-1)`` is symmetric (no zero points). A zero
    outside [0, 2**b - 1] (possible with a clipping observer) cannot be packed in b bits; the
    layer is then stored in 8 bits, codes and zeros shifted by one constant. ``group_width`` (a
    divisor of :func:`natural_group`) stores smaller groups with repeated scales and writes zero
    points even where all are the midpoint, so that layers can share one scheme. Scales are our fp16
    values, in ``scale_dtype`` (fp32 for an fp32 model, so that loaders which dequantize in the
    scales' dtype reproduce the weights exactly).
    """
    bits, k = module.bits, module.in_features
    codes = packing.unpack(module.packed.detach().cpu(), bits, k).to(torch.int64)
    zeros = module.zeros.detach().cpu().float()
    if not torch.equal(zeros, zeros.round()):
        return None
    zeros = zeros.to(torch.int64)
    sparse = two_four(codes != zeros[:, torch.arange(k) // module.group_size])  # a weight is 0 where q == z
    scales, zeros, group_size, note = _group_layout(module.scales.detach().cpu(), zeros, module.group_size, k,
                                                    group_width)
    scales = scales.to(scale_dtype).contiguous()
    shape = torch.tensor([module.out_features, k], dtype=torch.int64)
    if group_width is None and bool((zeros == (1 << (bits - 1))).all()):
        return _Packed({"weight_packed": pack_int32(codes, bits), "weight_scale": scales, "weight_shape": shape},
                       bits, group_size, True, PACKED, note, sparse)
    if layout is Layout.PORTABLE:
        columns = torch.arange(k) // (k if group_size is None else group_size)
        signed = codes - zeros[:, columns]
        wide = max(bits, _signed_bits(int(signed.min()), int(signed.max())))
        if wide <= 8:
            return _Packed({"weight_packed": pack_int32(signed + (1 << (wide - 1)), wide), "weight_scale": scales,
                            "weight_shape": shape}, wide, group_size, True, PACKED,
                           _join(note, f"asymmetric {bits}-bit stored as symmetric {wide}-bit (no zero points)"
                                 if wide != bits else ""), sparse)
    maxq = (1 << bits) - 1
    low, high = int(zeros.min()), int(zeros.max())
    if low < 0 or high > maxq:
        shift = max(0, -low)
        if shift + max(maxq, high) > 255:
            return None
        codes, zeros, bits = codes + shift, zeros + shift, 8
        note = _join(note, f"zero points outside the {module.bits}-bit range: stored in 8 bits")
    if layout is Layout.PORTABLE:  # needs 9 signed bits: int8 codes and int8 zero points, nothing packed
        half = 1 << (bits - 1)
        return _Packed({"weight": (codes - half).to(torch.int8), "weight_scale": scales,
                        "weight_zero_point": (zeros - half).to(torch.int8)}, bits, group_size, False, INT,
                       _join(note, f"asymmetric {bits}-bit stored as unpacked int8 codes and zero points"), sparse)
    return _Packed({"weight_packed": pack_int32(codes, bits), "weight_scale": scales, "weight_shape": shape,
                    "weight_zero_point": pack_int32(zeros.t(), bits).t().contiguous()},
                   bits, group_size, False, PACKED, note, sparse)


def two_four(nonzero: torch.Tensor) -> bool:
    """Whether the bool mask [N, K] has at most 2 of every 4 consecutive inputs set (and not all rows full)."""
    n, k = nonzero.shape
    if k % 4 or not k:
        return False
    counts = nonzero.reshape(n, k // 4, 4).sum(dim=-1)
    return bool((counts <= 2).all()) and bool((counts < 4).any())


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


def _planned_scheme(module: QuantLinear) -> tuple[int, int | None, bool] | None:
    """(bits, group size or None, symmetric) :func:`pack_linear` gives ``module`` in the standard
    layout, read from its zeros alone (None: it will be written dense)."""
    zeros, bits = module.zeros.detach().float(), module.bits
    maxq = (1 << bits) - 1
    if not torch.equal(zeros, zeros.round()):
        return None
    low, high = zeros.min().item(), zeros.max().item()
    width = natural_group(module.group_size, module.in_features)
    group = None if width == module.in_features else width
    if low >= 0 and high <= maxq:
        return bits, group, bool((zeros == (1 << (bits - 1))).all())
    return (8, group, False) if max(0, -low) + max(maxq, high) <= 255 else None


def shared_group_width(modules: list[QuantLinear]) -> int | None:
    """A group width that puts every packed layer of a standard export in one scheme, when they
    have packed zero points and differ only in group size (or symmetry).

    transformers 5.24 loads packed zero points only with a single scheme (see :class:`Layout`);
    groups of the gcd of all widths, scales repeated, keep the weights exact. None when the
    layers differ in bits, or nothing needs it.
    """
    plans = [(plan, module) for module in modules if (plan := _planned_scheme(module)) is not None]
    schemes = {plan for plan, _ in plans}
    if len(schemes) < 2 or all(symmetric for _, _, symmetric in schemes) or len({b for b, _, _ in schemes}) > 1:
        return None
    return math.gcd(*(group or module.in_features for (_, group, _), module in plans))


def _head_tied(model: nn.Module) -> bool:
    """Whether the output head is the token embedding's weight (or codes)."""
    adapter = adapter_for(model)
    embedding, head = model.get_submodule(adapter.embeddings[0]), model.get_submodule(adapter.lm_head)
    if isinstance(head, TiedQuantLinear):
        return head.embedding is embedding
    return (not isinstance(embedding, QuantEmbedding) and isinstance(head, nn.Linear)
            and head.weight is embedding.weight)


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
    tied = _head_tied(model)
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


def _commit(staging: Path, out_dir: Path) -> None:
    """Put ``staging`` at ``out_dir``; an existing one is moved aside first and removed after."""
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out_dir, trash)
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


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
    quantized = [module for _, module in _linears(model, _head_tied(model)) if isinstance(module, QuantLinear)]
    width = shared_group_width(quantized) if layout is Layout.STANDARD else None
    tensors, shapes, records, ignore, embedding_note, tied = _collect(model, dtype, layout, width)
    config.tie_word_embeddings = tied
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = tied
    _check_shapes(config, shapes, tied)
    config_dict = config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    config_dict["quantization_config"], loadable = quantization_config(records, ignore)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".part", dir=out_dir.parent))
    except OSError as exc:
        raise UserError(f"cannot write {out_dir}: {exc.strerror or exc}; choose another output directory") from None
    try:
        safetensors.torch.save_file(_dedupe(tensors), str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        total = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        _commit(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {out_dir}: {exc.strerror or exc}; free some space or choose another "
                            f"output directory") from None
        raise
    return CTExport(out_dir, tuple(records), embedding_note, total, layout, loadable)
