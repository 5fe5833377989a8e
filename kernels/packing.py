"""The one packing format shared by the quantizer and the kernels.

A quantized weight W of shape [N, K] (out_features, in_features) is stored as

* ``packed``: uint8 [N, ceil(K * bits / 8)]. Each row is a little-endian bit stream:
  element k occupies bits [k*bits, (k+1)*bits) of the row, so 2/4/8-bit values never
  straddle a byte and 3/5/6-bit values are packed densely (8 values in 3, 5 or 6 bytes).
* ``scales``, ``zeros``: fp16 (or bf16) [N, ceil(K / group_size)]; the last group may be
  narrower when group_size does not divide K. Per-channel quantization is group_size == K.

Dequantization is ``W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]``.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of ``in_features`` values at ``bits`` bits occupies."""
    return math.ceil(in_features * bits / 8)


def num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups per row (the last one may be narrower)."""
    return math.ceil(in_features / group_size)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``q`` [N, K] (values in [0, 2**bits)) into uint8 [N, ceil(K*bits/8)]."""
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    pad = (-k) % 8
    codes = q.to(torch.int64)
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    # Eight codes form one word of 8*bits bits (<= 64); the word splits into `bits` bytes.
    codes = codes.view(n, -1, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    words = (codes << shifts).sum(dim=-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    out = ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, -1)
    return out[:, : packed_row_bytes(k, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [N, ceil(K*bits/8)] -> uint8 codes [N, K]."""
    _check_bits(bits)
    n, nbytes = packed.shape
    if nbytes != packed_row_bytes(in_features, bits):
        raise ValueError(
            f"packed rows hold {nbytes} bytes, expected {packed_row_bytes(in_features, bits)} "
            f"for {in_features} values at {bits} bits"
        )
    k8 = in_features + (-in_features) % 8
    full = k8 * bits // 8
    data = packed.to(torch.int64)
    if full > nbytes:
        data = torch.nn.functional.pad(data, (0, full - nbytes))
    data = data.view(n, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (data << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)
    return codes.reshape(n, -1)[:, :in_features].to(torch.uint8)


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the dense weight [N, K] in ``dtype`` from its packed form."""
    q = unpack(packed, bits, in_features).to(dtype)
    group_of = torch.arange(in_features, device=packed.device) // group_size
    return (q - zeros.to(dtype)[:, group_of]) * scales.to(dtype)[:, group_of]


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int,
                  scale_bytes: int = 2) -> int:
    """Exact storage of one packed weight: codes plus one scale and one zero per group."""
    groups = num_groups(in_features, group_size)
    return out_features * (packed_row_bytes(in_features, bits) + 2 * scale_bytes * groups)
