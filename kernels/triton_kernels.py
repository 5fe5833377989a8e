"""Triton kernels for ``y = x @ dequant(W).T`` with group-wise 2/3/4/8-bit packed weights.

Two kernels share one dequantization step (codes -> ``(q - z) * s`` inside the K loop, fp32
accumulation, masked tails so any M, N and K work):

* :func:`gemm`: a tiled GEMM for prefill and evaluation batches (M > 16).
* :func:`splitk`: a split-K kernel for decode (M <= 16): few rows leave too few output tiles
  to fill the GPU, so K is cut into ``SPLIT_K`` slices whose partial sums meet in an fp32
  buffer through atomic adds. Decode is memory bound; the 16-row MMA tile is mostly padding
  and costs nothing that matters.

The packing is :mod:`.packing`'s: element k of a row sits at bits [k*b, (k+1)*b) of a
little-endian byte stream, so its byte is ``(k*b) >> 3`` and its shift ``(k*b) & 7``; a 3-bit
value can straddle two bytes, so that case also loads the next byte. Neighbouring k share a
byte for 2/4-bit codes; those repeated loads hit the same cache line (the AutoGPTQ/GemLite
pattern) instead of a shuffle that Triton cannot express for 3-bit.

Import this module only where :mod:`._triton_guard` says Triton is available. Under
``TRITON_INTERPRET=1`` the launchers pass one fixed configuration, because autotuning in the
interpreter would run every configuration at numpy speed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_guard import INTERPRET
from .reference import DECODE_MAX_M

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_SPLITK_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 16}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_K": 2}, num_warps=8, num_stages=3),
]
# Interpreter: large blocks mean few program instances (each costs tens of ms in numpy);
# SPLIT_K=2 still exercises the atomic reduction.
_INTERPRET_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
_INTERPRET_SPLITK = {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}


@triton.jit
def _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, K, N, row_bytes,
                  stride_pn, stride_sn, stride_sg,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of W.T in fp32; zero outside K and N."""
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    bit = offs_k * BITS
    byte = bit >> 3
    rows = packed_ptr + offs_n[None, :] * stride_pn + byte[:, None]
    word = tl.load(rows, mask=mask, other=0).to(tl.int32)
    if BITS == 3:
        # The next byte exists unless this is the last byte of the row.
        high_mask = mask & ((byte + 1) < row_bytes)[:, None]
        word = word | (tl.load(rows + 1, mask=high_mask, other=0).to(tl.int32) << 8)
    q = (word >> (bit & 7)[:, None]) & ((1 << BITS) - 1)
    if GROUP_SIZE % BLOCK_K == 0:
        # The whole tile lies in one group: one scale and zero per output feature.
        group = k0 // GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0)
        z = tl.load(zeros_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0)
        s = s.to(tl.float32)[None, :]
        z = z.to(tl.float32)[None, :]
    else:
        group = offs_k // GROUP_SIZE
        params = offs_n[None, :] * stride_sn + group[:, None] * stride_sg
        s = tl.load(scales_ptr + params, mask=mask, other=0).to(tl.float32)
        z = tl.load(zeros_ptr + params, mask=mask, other=0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _gemm_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, row_bytes,
                 stride_xm, stride_xk, stride_pn, stride_sn, stride_sg, stride_om, stride_on,
                 M_BUCKET,  # only an autotuning key: one tuning per power-of-two M
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile; tiles run in GROUP_M-row bands so W tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_n
    band = pid // per_band
    first_m = band * GROUP_M
    band_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_rows
    pid_n = (pid % per_band) // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        b = _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, K, N, row_bytes,
                          stride_pn, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_K).to(a.dtype)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _splitk_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, row_bytes,
                   stride_xm, stride_xk, stride_pn, stride_sn, stride_sg, stride_om, stride_on,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    """Partial product of one K slice for BLOCK_N outputs, added atomically to the fp32 ``out``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Slices are whole BLOCK_K tiles, so every tile but the last of the row is full.
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * span
    k_stop = tl.minimum(k_start + span, K)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        b = _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, K, N, row_bytes,
                          stride_pn, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_K).to(a.dtype)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.atomic_add(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"])(_gemm_kernel)
_splitk_tuned = triton.autotune(configs=_SPLITK_CONFIGS, key=["N", "K", "BITS", "GROUP_SIZE"],
                                reset_to_zero=["out_ptr"])(_splitk_kernel)


def _kernel_group_size(group_size: int, in_features: int) -> int:
    """The group size the kernels see.

    One group spanning all of K (per-channel) becomes the next power of two >= K: ``k // g``
    is still 0 for every k < K, and a power of two divides every BLOCK_K, which selects the
    one-scale-per-tile path instead of a per-element gather.
    """
    if group_size >= in_features:
        return triton.next_power_of_2(in_features)
    return group_size


def _common(x2d, packed, scales, bits, group_size, in_features):
    n = packed.shape[0]
    return dict(
        M=x2d.shape[0], N=n, K=in_features, row_bytes=packed.shape[1],
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1), stride_pn=packed.stride(0),
        stride_sn=scales.stride(0), stride_sg=scales.stride(1),
        BITS=bits, GROUP_SIZE=_kernel_group_size(group_size, in_features),
        IEEE_FP32=x2d.dtype == torch.float32,
    )


def gemm(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
         bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Tiled GEMM: ``x2d`` [M, K] times the packed W [N, K] transposed -> [M, N] in ``x2d.dtype``.

    Arguments are validated by :func:`autocompress.kernels.dispatch.quant_matmul`.
    """
    args = _common(x2d, packed, scales, bits, group_size, in_features)
    out = torch.empty(args["M"], args["N"], dtype=x2d.dtype, device=x2d.device)
    args.update(stride_om=out.stride(0), stride_on=out.stride(1))

    def grid(meta):
        return (triton.cdiv(args["M"], meta["BLOCK_M"]) * triton.cdiv(args["N"], meta["BLOCK_N"]),)

    bucket = min(triton.next_power_of_2(args["M"]), 4096)
    if INTERPRET:
        _gemm_kernel[grid](x2d, packed, scales, zeros, out, M_BUCKET=bucket, **args, **_INTERPRET_GEMM)
    else:
        _gemm_tuned[grid](x2d, packed, scales, zeros, out, M_BUCKET=bucket, **args)
    return out


def splitk(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Split-K decode kernel for ``x2d`` [M <= 16, K] -> [M, N] in ``x2d.dtype``."""
    args = _common(x2d, packed, scales, bits, group_size, in_features)
    if args["M"] > DECODE_MAX_M:
        raise ValueError(f"the split-K kernel takes at most {DECODE_MAX_M} rows, got {args['M']}")
    out = torch.zeros(args["M"], args["N"], dtype=torch.float32, device=x2d.device)
    args.update(stride_om=out.stride(0), stride_on=out.stride(1), BLOCK_M=DECODE_MAX_M)

    def grid(meta):
        return (triton.cdiv(args["N"], meta["BLOCK_N"]), meta["SPLIT_K"])

    if INTERPRET:
        _splitk_kernel[grid](x2d, packed, scales, zeros, out, **args, **_INTERPRET_SPLITK)
    else:
        _splitk_tuned[grid](x2d, packed, scales, zeros, out, **args)
    return out if x2d.dtype == torch.float32 else out.to(x2d.dtype)
