"""GPTQ: quantize a weight column by column, compensating each column's error in the rest.

For a layer with inputs X, the error ||W X - Q X||^2 has Hessian H = 2 X X^T. Quantizing
column j moves the remaining columns by ``-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j+1:`` (the
optimal-brain-surgeon update); with the upper Cholesky factor of H^-1 the updates of one
column never need the inverse recomputed (Frantar et al., 2022). Updates are applied lazily
per block of columns, so the O(N K^2) work is matrix-matrix.

Groups: without act-order, a group's scale and zero are computed from the weights as GPTQ
reaches the group's first column (already updated by earlier errors). With act-order the
columns are visited by decreasing Hessian diagonal, but the packing format groups columns
by their original index, so the groups' parameters are fixed up front from the original
weights ("static groups").

A pruning ``mask`` is honoured: pruned weights are quantized to exactly 0 and their error
is compensated like any other (SparseGPT's update with a fixed mask).
"""
from __future__ import annotations

import torch

from autocompress.kernels import packing

from .quantize import (SCALE_DTYPE, QuantizedWeight, dequantize_codes, effective_group_size, group_params,
                       quantize_codes, quantize_rtn)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, damping more if needed."""
    k = hessian.shape[0]
    mean_diag = hessian.diagonal().mean().clamp(min=1e-8)
    for attempt in range(6):
        h = hessian.clone()
        h.diagonal().add_(damp * (10 ** attempt) * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper
    raise RuntimeError(f"GPTQ: the Hessian ({k}x{k}) is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, *,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  mask: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [N, K] given its input Hessian [K, K].

    ``damp`` adds that fraction of the mean diagonal to H (stability); ``mask`` (bool [N, K],
    True = pruned) forces those weights to exactly 0.
    """
    n, k = weight.shape
    g = effective_group_size(group_size, k)
    groups = packing.num_groups(k, g)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    keep_mask = None if mask is None else ~mask
    if keep_mask is not None:
        w.mul_(keep_mask)
    # Inputs that are always zero carry no information: fix their weights to 0.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    scales = torch.empty(n, groups, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty_like(scales)
    include_zero = mask is not None
    if act_order:
        for index in range(groups):
            cols = slice(index * g, min((index + 1) * g, k))
            scales[:, index], zeros[:, index] = group_params(w[:, cols], bits, include_zero)
        perm = torch.argsort(h.diagonal(), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
        # Blocks hold whole groups, so a group's parameters are taken from up-to-date columns.
        block_size = max(block_size // g, 1) * g
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    keep = keep_mask[:, perm] if keep_mask is not None else None
    hinv = _inverse_cholesky(h, damp)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    group_of = (perm // g)

    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w1 = w[:, start:end].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            group = int(group_of[col])
            if not act_order and int(perm[col]) % g == 0:
                part = w1[:, i:i + min(g, k - col)]
                if keep is not None:
                    part = part * keep[:, col:col + part.shape[1]]
                params = group_params(part, bits, include_zero)
                scales[:, group], zeros[:, group] = params
            scale, zero = scales[:, group], zeros[:, group]
            column = w1[:, i]
            q = quantize_codes(column.unsqueeze(1), scale, zero, bits).squeeze(1)
            if keep is not None:
                # A pruned weight's code is the zero point, which dequantizes to exactly 0.
                q = torch.where(keep[:, col], q, zero.float())
            codes[:, col] = q.to(torch.uint8)
            dq = dequantize_codes(q.unsqueeze(1), scale, zero).squeeze(1)
            err = (column - dq) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]

    codes = codes[:, inv_perm]
    return QuantizedWeight(packing.pack(codes, bits), scales, zeros, bits, g, k)


OBSERVERS = ("minmax", "mse", "hqq", "best")


def _per_column(scales: torch.Tensor, zeros: torch.Tensor, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scales and zeros [N, K]: each group's parameters repeated over its columns."""
    group_of = torch.arange(k, device=scales.device) // g
    return scales.float()[:, group_of], zeros.float()[:, group_of]


def _round(weight: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes ``clamp(round(w / s + z))`` for per-column ``s``, ``z`` (fractional zeros work)."""
    return torch.clamp(torch.round(weight / s + z), 0, (1 << bits) - 1)


def group_errors(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g: int,
                 importance: torch.Tensor | None = None) -> torch.Tensor:
    """Squared rounding error per (row, group) [N, groups], columns weighted by ``importance`` [K]."""
    n, k = weight.shape
    s, z = _per_column(scales, zeros, g, k)
    error = (weight - (_round(weight, s, z, bits) - z) * s).square()
    if importance is not None:
        error = error * importance
    group_of = torch.arange(k, device=weight.device) // g
    return torch.zeros(n, scales.shape[1], device=weight.device).index_add_(1, group_of, error)


def _observe(weight: torch.Tensor, bits: int, g: int, observer: str,
             importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scales, zeros) [N, groups] of ``weight`` for static groups of ``g`` columns.

    ``best`` takes, per group, whichever of the other observers' parameters gives the lowest
    rounding error weighted by ``importance`` (the Hessian's diagonal: how much each input
    column's error costs the layer's output).
    """
    if observer == "best":
        candidates = [_observe(weight, bits, g, name) for name in ("minmax", "mse", "hqq")]
        errors = torch.stack([group_errors(weight, sc, zr, bits, g, importance) for sc, zr in candidates])
        pick = errors.argmin(dim=0, keepdim=True)
        scales = torch.stack([sc for sc, _ in candidates]).gather(0, pick).squeeze(0)
        zeros = torch.stack([zr for _, zr in candidates]).gather(0, pick).squeeze(0)
        return scales, zeros
    from .hqq import quantize_hqq, quantize_mse  # noqa: PLC0415

    if observer == "minmax":
        q = quantize_rtn(weight, bits, g)
    elif observer == "mse":
        q = quantize_mse(weight, bits, g)
    elif observer == "hqq":
        q = quantize_hqq(weight, bits, g, optimize_scale=True)
    else:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    return q.scales, q.zeros


@torch.no_grad()
def gptq_quantize_many(weight: torch.Tensor, hessian: torch.Tensor, grids: list[tuple[int, int | None]], *,
                       damp: float = 0.01, block_size: int = 32, observer: str = "minmax") -> list[QuantizedWeight]:
    """GPTQ with act-order for several (bits, group_size) grids of one weight in a single pass.

    GPTQ's updates are independent per output row given the shared Hessian, and with
    act-order every grid's group parameters are fixed up front, so the grids are stacked as
    rows of one [len(grids) * N, K] problem: the column loop (Python-bound on a CPU) runs once
    instead of once per grid. Each result equals ``gptq_quantize(..., act_order=True)`` for
    its grid up to float rounding of the shared updates.

    ``observer`` sets the groups' scale and zero from the original weights: ``minmax`` (the
    group's range, as GPTQ's reference code), ``mse`` (the clipped range with the lowest
    squared error, :func:`~.hqq.quantize_mse`) or ``hqq`` (:func:`~.hqq.quantize_hqq`'s
    optimized zero and scale). Codes are ``round(w / s + z)``, so fractional zeros work.
    """
    n, k = weight.shape
    w0 = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w0[:, dead] = 0.0
    metas, scale_cols, zero_cols, maxqs = [], [], [], []
    for bits, group_size in grids:
        g = effective_group_size(group_size, k)
        scales, zeros = _observe(w0, bits, g, observer, h.diagonal())
        s_cols, z_cols = _per_column(scales, zeros, g, k)
        scale_cols.append(s_cols)
        zero_cols.append(z_cols)
        maxqs.append(torch.full((n, 1), float((1 << bits) - 1), device=w0.device))
        metas.append((bits, g, scales, zeros))
    perm = torch.argsort(h.diagonal(), descending=True)
    inv_perm = torch.argsort(perm)
    # Transposed ([K, rows]): a column of W is a contiguous row here, so the per-column work
    # of the inner loop reads and updates contiguous memory.
    wt = w0.repeat(len(grids), 1)[:, perm].t().contiguous()
    s_all = torch.cat(scale_cols)[:, perm].t().contiguous()
    z_all = torch.cat(zero_cols)[:, perm].t().contiguous()
    maxq = torch.cat(maxqs).squeeze(1)
    hinv = _inverse_cholesky(h[perm][:, perm], damp)
    codes = torch.zeros_like(wt, dtype=torch.uint8)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w1 = wt[start:end].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            scale, zero = s_all[col], z_all[col]
            column = w1[i]
            q = torch.minimum(torch.clamp(torch.round(column / scale + zero), min=0), maxq)
            codes[col] = q.to(torch.uint8)
            err = (column - (q - zero) * scale) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            err1[i] = err
        wt[end:] -= hinv[start:end, end:].t() @ err1
    codes = codes.t()[:, inv_perm]
    out = []
    for index, (bits, g, scales, zeros) in enumerate(metas):
        rows = codes[index * n:(index + 1) * n]
        out.append(QuantizedWeight(packing.pack(rows, bits), scales, zeros, bits, g, k))
    return out


def quantize_observed(weight: torch.Tensor, bits: int, group_size: int | None, observer: str = "minmax",
                      mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with the groups' scale and zero set by ``observer`` (no Hessian: unweighted).

    ``minmax``, and any pruned weight (``mask``, True = pruned, kept exactly 0), take
    :func:`~.quantize.quantize_rtn`'s path.
    """
    if observer == "minmax" or mask is not None:
        return quantize_rtn(weight, bits, group_size, mask)
    k = weight.shape[1]
    g = effective_group_size(group_size, k)
    w = weight.detach().float()
    scales, zeros = _observe(w, bits, g, observer)
    codes = _round(w, *_per_column(scales, zeros, g, k), bits)
    return QuantizedWeight(packing.pack(codes.to(torch.uint8), bits), scales, zeros, bits, g, k)
