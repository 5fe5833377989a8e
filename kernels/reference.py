"""PyTorch twins of the Triton kernels, on the same packing (see :mod:`.packing`).

Each function computes ``y = x @ dequant(W).T`` the way its kernel decomposes it, with fp32
accumulation, so tests can compare a kernel to its twin and the CPU path needs no Triton.
"""
from __future__ import annotations

import torch

from .packing import dequantize

# Up to this many rows of x a matmul is a decode step: the split-K kernel (and twin) takes it.
DECODE_MAX_M = 16


def gemm_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Twin of the tiled GEMM: dequantize W [N, K] in fp32, one fp32 matmul, cast to ``x.dtype``.

    ``x`` is 2-D [M, K]; the result is [M, N].
    """
    weight = dequantize(packed, scales, zeros, bits, group_size, in_features, torch.float32)
    if x.dtype == torch.float32:
        return x @ weight.t()
    return (x.float() @ weight.t()).to(x.dtype)


def splitk_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, in_features: int, split_k: int = 4) -> torch.Tensor:
    """Twin of the split-K decode kernel: ``split_k`` partial products over K slices, summed in fp32.

    The slices are cut at whole bytes of the packed rows (multiples of 8 values), the way the
    kernel's K tiles are; the sum equals :func:`gemm_reference` up to fp32 rounding.
    """
    weight = dequantize(packed, scales, zeros, bits, group_size, in_features, torch.float32)
    step = -(-in_features // split_k)
    step += (-step) % 8
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        out += x[:, start:stop].float() @ weight[:, start:stop].t()
    return out.to(x.dtype)
