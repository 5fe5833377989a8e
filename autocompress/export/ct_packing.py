"""Pack one quantized linear into compressed-tensors' tensors, exactly.

:mod:`autocompress.export.compressed_tensors` assembles the checkpoint (config, tensors,
files); this module turns one :class:`~autocompress.compress.quantize.QuantLinear` into the
tensors and scheme compressed-tensors reads, and picks the group layout that lets layers
share one scheme.

Our codes map onto compressed-tensors exactly. We keep unsigned codes ``q`` in [0, 2**b - 1]
and an fp16 integer zero ``z`` per (row, group): ``w = (q - z) * s``. compressed-tensors keeps
signed codes ``q - 2**(b-1)`` and zero points ``z - 2**(b-1)`` and computes
``(q_signed - zp_signed) * s``, the same number; its packer adds the offset back, so the int32
words hold ``q`` as one little-endian bit stream per row (code i at bits [i*b, (i+1)*b), codes
may straddle words; 1 to 8 bits). Zero points are packed the same way along the output
dimension. Where packed zero points cannot go, :class:`Layout` says what is written instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from autocompress.kernels import packing

from ..compress.quantize import QuantLinear

PACKED = "pack-quantized"
INT = "int-quantized"


class Layout(str, Enum):
    """How asymmetric layers (a zero point per group) are written.

    ``STANDARD``: as compressed-tensors itself and llm-compressor write them, the zero points
    packed in ``weight_zero_point``; what vLLM's WNA16 kernels read. transformers 5.24 with
    compressed-tensors 0.20.1 cannot load packed zero points through its usual path (its
    meta-device pass keeps them unpacked, then refuses the shapes; llm-compressor issue #1618);
    with a single config group the checkpoint asks transformers to dequantize while loading,
    which does work, and
    :attr:`~autocompress.export.compressed_tensors.CTExport.transformers_loadable` says which
    case this is.

    ``PORTABLE``: no packed zero points, which that pair of versions loads whatever the mix:
    an asymmetric b-bit layer becomes symmetric codes ``q - z`` in the fewest bits that hold
    them (at most b + 1), an asymmetric layer that would need 9 becomes ``int-quantized`` int8
    codes with unpacked int8 zero points. Exact, but those layers grow by a bit, and vLLM
    serves only the bit widths its WNA16 kernels take.
    """

    STANDARD = "standard"
    PORTABLE = "portable"


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
# One linear


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
# One scheme for many linears


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

