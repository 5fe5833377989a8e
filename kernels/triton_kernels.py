"""Triton kernels for ``y = x @ dequant(W).T`` with group-wise 2/3/4/5/6/8-bit packed weights.

Two kernels share one dequantization step (codes -> ``(q - z) * s`` inside the K loop, fp32
accumulation, masked tails so any M, N and K work):

* :func:`gemm`: a tiled GEMM for prefill and evaluation batches (M > 16).
* :func:`splitk`: a split-K kernel for decode (M <= 16): few rows leave too few output tiles
  to fill the GPU, so K is cut into ``SPLIT_K`` slices whose partial sums meet in an fp32
  buffer through atomic adds. Decode is memory bound; the 16-row MMA tile is mostly padding
  and costs nothing that matters.

The packing is :mod:`.packing`'s: element k of a row sits at bits [k*b, (k+1)*b) of a
little-endian byte stream. Codes leave the bytes in one of two ways, chosen per shape by the
autotuner (``PLANES`` in the configurations):

* per element: load byte ``(k*b) >> 3`` (and the next one when b does not divide 8: 3, 5
  and 6-bit codes can straddle two bytes) and shift by ``(k*b) & 7``. Neighbours reload a
  shared byte from the same cache line (the AutoGPTQ/GemLite pattern): simple, but one load
  per code.
* byte planes: load each byte once as a contiguous tile, split it into its ``8 // b`` codes
  (3/6-bit: three bytes form a 24-bit word of 8/4 codes; 5-bit: five bytes hold 8 codes,
  read as two 20-bit halves) and interleave them with ``tl.join``.

Which is faster depends on the GPU and the shape; neither has been timed on a GPU yet.

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


def _config(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    """One autotuning candidate: block sizes and ``PLANES`` as keywords."""
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Small lists on purpose: each is benchmarked once per (M bucket, N, K, bits, group, dtype).
_GEMM_CONFIGS = [
    _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, PLANES=False),
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PLANES=False),
    _config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PLANES=False),
    _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, PLANES=False),
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PLANES=True),
    _config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, PLANES=True),
]
_SPLITK_CONFIGS = [
    _config(4, 3, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, PLANES=False),
    _config(4, 3, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, PLANES=False),
    _config(4, 3, BLOCK_N=64, BLOCK_K=256, SPLIT_K=8, PLANES=False),
    _config(2, 4, BLOCK_N=32, BLOCK_K=128, SPLIT_K=16, PLANES=False),
    _config(4, 3, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, PLANES=True),
    _config(4, 4, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, PLANES=True),
    _config(2, 4, BLOCK_N=32, BLOCK_K=256, SPLIT_K=16, PLANES=True),
]
# Interpreter: large blocks mean few program instances (each costs tens of ms in numpy);
# SPLIT_K=2 still exercises the atomic reduction.
INTERPRET_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "PLANES": False}
INTERPRET_SPLITK = {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "PLANES": False}


@triton.jit
def _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, K, N, row_bytes,
                  stride_pn, stride_sn, stride_sg,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, PLANES: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of W.T in fp32 (columns past N are zero).

    ``PLANES`` picks how codes leave the bytes; the autotuner keeps the faster one:
    False loads one byte per element (byte ``(k*b) >> 3``, plus the next when b does not
    divide 8); True loads each byte once, as contiguous rows of the packed tile, and
    interleaves the codes it holds (3/5/6-bit: 8 codes in 3/5 bytes, 4 codes in 3 bytes).
    """
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    row = packed_ptr + offs_n[None, :] * stride_pn
    if PLANES:
        q = _codes_planes(row, k0, mask_n, row_bytes, BITS, BLOCK_K, BLOCK_N)
    else:
        bit = offs_k * BITS
        byte = bit >> 3
        word = tl.load(row + byte[:, None], mask=mask, other=0).to(tl.int32)
        if 8 % BITS != 0:
            # Codes may straddle into the next byte, which exists unless this is the row's last.
            high_mask = mask & ((byte + 1) < row_bytes)[:, None]
            word = word | (tl.load(row + byte[:, None] + 1, mask=high_mask, other=0).to(tl.int32) << 8)
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
    # Codes past K (padding bits of the last byte) meet x == 0, so they add nothing.
    return (q.to(tl.float32) - z) * s


@triton.jit
def _codes_planes(row, k0, mask_n, row_bytes, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] from byte loads without repeats (k0 is a multiple of BLOCK_K).

    ``tl.join`` adds a trailing axis; joining codes in bit-reversed pairs and moving those
    axes in front of N puts code ``c`` of byte (or word) ``j`` at row ``j * per + c``.
    """
    if BITS == 8:
        q = _plane(row, k0 + tl.arange(0, BLOCK_K), mask_n, row_bytes)
    elif BITS == 4:
        b = _plane(row, k0 // 2 + tl.arange(0, BLOCK_K // 2), mask_n, row_bytes)
        q = tl.reshape(tl.permute(tl.join(b & 15, b >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
    elif BITS == 2:
        b = _plane(row, k0 // 4 + tl.arange(0, BLOCK_K // 4), mask_n, row_bytes)
        pairs = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
        q = tl.reshape(tl.permute(pairs, (0, 2, 3, 1)), (BLOCK_K, BLOCK_N))
    elif BITS == 6:  # 4 codes in each 3-byte word
        first = (k0 // 4 + tl.arange(0, BLOCK_K // 4)) * 3
        word = _plane(row, first, mask_n, row_bytes) | (_plane(row, first + 1, mask_n, row_bytes) << 8) \
            | (_plane(row, first + 2, mask_n, row_bytes) << 16)
        pairs = tl.join(tl.join(word & 63, (word >> 12) & 63), tl.join((word >> 6) & 63, word >> 18))
        q = tl.reshape(tl.permute(pairs, (0, 2, 3, 1)), (BLOCK_K, BLOCK_N))
    else:
        if BITS == 3:  # 8 codes in each 3-byte word
            first = (k0 // 8 + tl.arange(0, BLOCK_K // 8)) * 3
            lo = _plane(row, first, mask_n, row_bytes) | (_plane(row, first + 1, mask_n, row_bytes) << 8) \
                | (_plane(row, first + 2, mask_n, row_bytes) << 16)
            hi = lo >> 12
        else:  # 5 bits: 8 codes in 5 bytes, as two 20-bit halves (bits 0-19 and 20-39) in int32
            first = (k0 // 8 + tl.arange(0, BLOCK_K // 8)) * 5
            middle = _plane(row, first + 2, mask_n, row_bytes)
            lo = _plane(row, first, mask_n, row_bytes) | (_plane(row, first + 1, mask_n, row_bytes) << 8) \
                | (middle << 16)
            hi = (middle >> 4) | (_plane(row, first + 3, mask_n, row_bytes) << 4) \
                | (_plane(row, first + 4, mask_n, row_bytes) << 12)
        # Codes 0-3 are at BITS * c in lo, codes 4-7 at BITS * (c - 4) in hi.
        m = (1 << BITS) - 1
        low = tl.join(tl.join(lo & m, hi & m), tl.join((lo >> 2 * BITS) & m, (hi >> 2 * BITS) & m))
        high = tl.join(tl.join((lo >> BITS) & m, (hi >> BITS) & m),
                       tl.join((lo >> 3 * BITS) & m, (hi >> 3 * BITS) & m))
        q = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 3, 4, 1)), (BLOCK_K, BLOCK_N))
    return q


@triton.jit
def _plane(row, offs, mask_n, row_bytes):
    """Bytes ``offs`` [W] of the rows ``row`` [1, BLOCK_N] as an int32 [W, BLOCK_N] tile, 0 past the row end."""
    return tl.load(row + offs[:, None], mask=(offs < row_bytes)[:, None] & mask_n[None, :], other=0).to(tl.int32)


@triton.jit
def _accumulate(x_ptr, packed_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_start, k_stop, M, N, K, row_bytes,
                stride_xm, stride_xk, stride_pn, stride_sn, stride_sg,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PLANES: tl.constexpr):
    """fp32 sum over K tiles [k_start, k_stop) of x tile @ dequantized W tile (the loop both kernels share)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        b = _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, K, N, row_bytes,
                          stride_pn, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_K, BLOCK_N, PLANES).to(a.dtype)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gemm_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, row_bytes,
                 stride_xm, stride_xk, stride_pn, stride_sn, stride_sg, stride_om, stride_on,
                 M_BUCKET,  # only an autotuning key: one tuning per power-of-two M
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PLANES: tl.constexpr):
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
    acc = _accumulate(x_ptr, packed_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, 0, K, M, N, K, row_bytes,
                      stride_xm, stride_xk, stride_pn, stride_sn, stride_sg,
                      BITS, GROUP_SIZE, IEEE_FP32, BLOCK_M, BLOCK_N, BLOCK_K, PLANES)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _splitk_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, row_bytes,
                   stride_xm, stride_xk, stride_pn, stride_sn, stride_sg, stride_om, stride_on,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, PLANES: tl.constexpr):
    """Partial product of one K slice for BLOCK_N outputs, added atomically to the fp32 ``out``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Slices are whole BLOCK_K tiles, so every tile but the last of the row is full.
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * span
    k_stop = tl.minimum(k_start + span, K)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _accumulate(x_ptr, packed_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_start, k_stop, M, N, K, row_bytes,
                      stride_xm, stride_xk, stride_pn, stride_sn, stride_sg,
                      BITS, GROUP_SIZE, IEEE_FP32, BLOCK_M, BLOCK_N, BLOCK_K, PLANES)
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
         bits: int, group_size: int, in_features: int, config: dict | None = None) -> torch.Tensor:
    """Tiled GEMM: ``x2d`` [M, K] times the packed W [N, K] transposed -> [M, N] in ``x2d.dtype``.

    Arguments are validated by :func:`autocompress.kernels.dispatch.quant_matmul`. ``config``
    (block sizes, ``PLANES``) replaces autotuning, as under the interpreter (tests use it).
    """
    args = _common(x2d, packed, scales, bits, group_size, in_features)
    out = torch.empty(args["M"], args["N"], dtype=x2d.dtype, device=x2d.device)
    args.update(stride_om=out.stride(0), stride_on=out.stride(1))

    def grid(meta):
        return (triton.cdiv(args["M"], meta["BLOCK_M"]) * triton.cdiv(args["N"], meta["BLOCK_N"]),)

    bucket = min(triton.next_power_of_2(args["M"]), 4096)
    if config is not None or INTERPRET:
        _gemm_kernel[grid](x2d, packed, scales, zeros, out, M_BUCKET=bucket, **args, **(config or INTERPRET_GEMM))
    else:
        _gemm_tuned[grid](x2d, packed, scales, zeros, out, M_BUCKET=bucket, **args)
    return out


def splitk(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           bits: int, group_size: int, in_features: int, config: dict | None = None) -> torch.Tensor:
    """Split-K decode kernel for ``x2d`` [M <= 16, K] -> [M, N] in ``x2d.dtype`` (``config`` as in :func:`gemm`)."""
    args = _common(x2d, packed, scales, bits, group_size, in_features)
    if args["M"] > DECODE_MAX_M:
        raise ValueError(f"the split-K kernel takes at most {DECODE_MAX_M} rows, got {args['M']}")
    out = torch.zeros(args["M"], args["N"], dtype=torch.float32, device=x2d.device)
    args.update(stride_om=out.stride(0), stride_on=out.stride(1), BLOCK_M=DECODE_MAX_M)

    def grid(meta):
        return (triton.cdiv(args["N"], meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is not None or INTERPRET:
        _splitk_kernel[grid](x2d, packed, scales, zeros, out, **args, **(config or INTERPRET_SPLITK))
    else:
        _splitk_tuned[grid](x2d, packed, scales, zeros, out, **args)
    return out if x2d.dtype == torch.float32 else out.to(x2d.dtype)
