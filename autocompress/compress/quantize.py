"""Group-wise asymmetric integer quantization (round-to-nearest) and the QuantLinear module.

Weights W [N, K] are cut along K into groups of ``group_size`` columns (the last group is
narrower when group_size does not divide K); each (row, group) gets an fp16 scale and an
fp16 zero point, and codes are ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``. Storage is
the shared packing format of :mod:`autocompress.kernels.packing`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocompress.kernels import packing, quant_matmul

# fp16 is the storage type of scales and zeros; quantizers compute with the rounded values
# so what the kernel reconstructs is exactly what the quantizer (and GPTQ's error
# compensation) assumed.
SCALE_DTYPE = torch.float16


@dataclass
class QuantizedWeight:
    """A packed weight: uint8 codes [N, ceil(K*bits/8)], fp16 scales and zeros [N, groups]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K] these codes stand for."""
        return packing.dequantize(self.packed, self.scales, self.zeros, self.bits, self.group_size,
                                  self.in_features, dtype)


def effective_group_size(group_size: int | None, in_features: int) -> int:
    """Group size in columns: None (per-channel) and sizes beyond K both mean K."""
    return in_features if group_size is None else min(group_size, in_features)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 towards +inf, so a scale never shrinks and the range stays covered."""
    rounded = x.to(SCALE_DTYPE)
    low = rounded.float() < x
    if low.any():
        rounded = torch.where(low, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)
    return rounded


def group_params(w: torch.Tensor, bits: int, include_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) per row of ``w`` [N, g] for asymmetric ``bits``-bit codes.

    ``include_zero`` widens the range to contain 0, so that pruned weights stay exactly 0.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    low, high = w.amin(dim=1), w.amax(dim=1)
    if include_zero:
        low, high = low.clamp(max=0), high.clamp(min=0)
    # A constant group has no range: widen it to contain 0 so its value is exact.
    flat = (high - low) <= 1e-12 * torch.maximum(low.abs(), high.abs()).clamp(min=1e-30)
    low = torch.where(flat, low.clamp(max=0), low)
    high = torch.where(flat, high.clamp(min=0), high)
    high = torch.where(high == low, low + 1, high)
    scale = _round_up_fp16(((high - low) / maxq).clamp(min=1e-7))
    zero = torch.round(-low / scale.float()).to(SCALE_DTYPE)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` [N, g] for per-row ``scale``/``zero`` [N] or [N, 1]."""
    maxq = (1 << bits) - 1
    s, z = scale.float().reshape(-1, 1), zero.float().reshape(-1, 1)
    return torch.clamp(torch.round(w.float() / s) + z, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float values of codes ``q`` [N, g] for per-row ``scale``/``zero``."""
    s, z = scale.float().reshape(-1, 1), zero.float().reshape(-1, 1)
    return (q - z) * s


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None,
                 mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` [N, K].

    ``mask`` (bool [N, K], True = pruned) keeps pruned weights exactly zero.
    """
    n, k = weight.shape
    g = effective_group_size(group_size, k)
    w = weight.detach().float()
    if mask is not None:
        w = w.masked_fill(mask, 0.0)
    groups = packing.num_groups(k, g)
    scales = torch.empty(n, groups, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for index in range(groups):
        cols = slice(index * g, min((index + 1) * g, k))
        scale, zero = group_params(w[:, cols], bits, include_zero=mask is not None)
        scales[:, index], zeros[:, index] = scale, zero
        codes[:, cols] = quantize_codes(w[:, cols], scale, zero, bits).to(torch.uint8)
    return QuantizedWeight(packing.pack(codes, bits), scales, zeros, bits, g, k)


def _quant_matmul(x, packed, scales, zeros, bits, group_size, in_features):
    """Route to the shared kernels' dispatcher (Triton on GPU, PyTorch reference on CPU)."""
    return quant_matmul(x, packed, scales, zeros, bits, group_size, in_features)


class QuantLinear(nn.Module):
    """A linear layer with packed integer weights; ``forward`` dequantizes inside the matmul."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = packing.num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(out_features, packing.packed_row_bytes(in_features, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """Wrap a :class:`QuantizedWeight` (and an optional bias) as a module."""
        module = cls(q.in_features, q.packed.shape[0], q.bits, q.group_size, bias=bias is not None,
                     device=q.packed.device, dtype=bias.dtype if bias is not None else torch.float32)
        module.packed.copy_(q.packed)
        module.scales.copy_(q.scales)
        module.zeros.copy_(q.zeros)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight [out, in] in fp32 (for inspection and tests)."""
        return packing.dequantize(self.packed, self.scales, self.zeros, self.bits, self.group_size,
                                  self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with W reconstructed from its packed codes."""
        out = _quant_matmul(x, self.packed, self.scales, self.zeros, self.bits, self.group_size, self.in_features)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize_linear(linear: nn.Linear, bits: int, group_size: int | None,
                    mask: torch.Tensor | None = None) -> QuantLinear:
    """RTN-quantize an ``nn.Linear`` into a :class:`QuantLinear` (the original is untouched)."""
    q = quantize_rtn(linear.weight, bits, group_size, mask)
    return QuantLinear.from_quantized(q, linear.bias)
