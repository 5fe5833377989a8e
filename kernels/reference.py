"""PyTorch twins of the Triton kernels, on the same packing (see :mod:`.packing`).

Each function computes ``y = x @ dequant(W).T`` the way its kernel decomposes it, with fp32
accumulation, so tests can compare a kernel to its twin and the CPU path needs no Triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import num_groups

# Up to this many rows of x a matmul is a decode step: the split-K kernel (and twin) takes it.
DECODE_MAX_M = 16


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """uint8 codes [N, K] from packed rows, with byte-wide ops (no 64-bit words).

    Same result as :func:`.packing.unpack`, several times faster on CPU: 2/4/8-bit codes are
    shifted out of each byte; 3-bit rows are read as 24-bit words of 8 codes; 5/6-bit rows as
    runs of 5/6 bytes holding 8 codes, each code taken from its byte or byte pair.
    """
    n, nbytes = packed.shape
    mask = (1 << bits) - 1
    if bits == 3:
        data = F.pad(packed, (0, (-nbytes) % 3)).view(n, -1, 3).to(torch.int32)
        words = data[..., 0] | (data[..., 1] << 8) | (data[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        codes = ((words.unsqueeze(-1) >> shifts) & 7).to(torch.uint8)
    elif bits in (5, 6):
        # uint8 throughout: a 40/48-bit int64 word was slower than packing.unpack itself.
        data = F.pad(packed, (0, (-nbytes) % bits)).view(n, -1, bits)
        parts = []
        for c in range(8):
            byte, shift = divmod(c * bits, 8)
            code = data[..., byte] >> shift
            if shift + bits > 8:  # the high bits sit in the next byte (uint8 drops the overflow)
                code = code | (data[..., byte + 1] << (8 - shift))
            parts.append(code & mask)
        codes = torch.stack(parts, dim=-1)
    else:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(n, -1)[:, :in_features]


def dequantize_fp32(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int, in_features: int) -> torch.Tensor:
    """The dense fp32 weight [N, K], bit-for-bit what :func:`.packing.dequantize` returns.

    Groups are a reshape of the row (the narrower last group is padded, then cut off) and
    scales/zeros broadcast over them, instead of a per-column gather.
    """
    n = packed.shape[0]
    groups = num_groups(in_features, group_size)
    q = unpack_codes(packed, bits, in_features)
    if groups * group_size != in_features:
        q = F.pad(q, (0, groups * group_size - in_features))
    weight = (q.view(n, groups, group_size).float() - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return weight.view(n, -1)[:, :in_features].contiguous()


def gemm_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Twin of the tiled GEMM: dequantize W [N, K] in fp32, one fp32 matmul, cast to ``x.dtype``.

    ``x`` is 2-D [M, K]; the result is [M, N].
    """
    weight = dequantize_fp32(packed, scales, zeros, bits, group_size, in_features)
    if x.dtype == torch.float32:
        return x @ weight.t()
    return (x.float() @ weight.t()).to(x.dtype)


def splitk_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, in_features: int, split_k: int = 4) -> torch.Tensor:
    """Twin of the split-K decode kernel: ``split_k`` partial products over K slices, summed in fp32.

    The slices are cut at whole bytes of the packed rows (multiples of 8 values), the way the
    kernel's K tiles are; the sum equals :func:`gemm_reference` up to fp32 rounding.
    """
    weight = dequantize_fp32(packed, scales, zeros, bits, group_size, in_features)
    step = -(-in_features // split_k)
    step += (-step) % 8
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        out += x[:, start:stop].float() @ weight[:, start:stop].t()
    return out.to(x.dtype)
