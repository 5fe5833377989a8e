"""Calibration-free refinement of the per-group scale and zero: HQQ and an MSE clip search.

Round-to-nearest takes each (row, group)'s scale and zero from the group's min and max, so
one outlier stretches the grid and every other weight of the group pays for it. Both
quantizers here keep our asymmetric format (fp16 scale and zero per (row, group),
``W = (q - zero) * scale``) and only choose better parameters, from the weight alone:

* :func:`quantize_hqq`, Half-Quadratic Quantization (Badri & Shaji, 2023). It minimizes an
  lp-norm (p < 1) of the error ``W - (q - z) s``, a sparsity-promoting loss that lets a few
  weights carry a large error so the rest fit well. The half-quadratic split introduces an
  auxiliary error ``e`` and alternates in closed form: codes for the current parameters
  ``q = clamp(round(W / s + z))``; ``e`` = the current error shrunk by the generalized
  soft-threshold of the lp norm; the zero that best explains ``W - e`` with these codes,
  ``z = mean(q - (W - e) / s)`` (and optionally the scale, by least squares); the penalty
  weight ``beta`` grows by ``kappa`` each step. The zero becomes fractional, which the fp16
  storage and the kernels' ``(q - z) * s`` already allow.
* :func:`quantize_mse`, the classic clip search: shrink each group's [min, max] by factors
  of a grid and keep, per group, the factor with the lowest squared error.

Each (row, group) is one row of a [rows, group width] matrix, so all groups are optimized at
once (the narrower last group, if any, is a second matrix). Every candidate is evaluated
with its fp16-rounded scale and zero, and each group keeps its best candidate by squared
reconstruction error, the RTN parameters included: the result is never worse than RTN on
any group, and what is stored reconstructs exactly what was measured. Codes are
``clamp(round(W / s + z), 0, 2**bits - 1)``, which for an integral zero (RTN, the clip
search) is RTN's ``round(W / s) + z`` up to the side an exact tie falls on.
"""
from __future__ import annotations

from typing import Callable

import torch

from autocompress.kernels import packing

from .quantize import SCALE_DTYPE, QuantizedWeight, effective_group_size, group_params

# Clip factors of the MSE search: the group's [min, max] times 1.00, 0.98, ..., 0.80.
MSE_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))


def _codes(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Float codes of ``rows`` [M, g] for per-row ``scale``/``zero`` [M, 1] (fp32)."""
    return torch.clamp(torch.round(rows / scale + zero), 0, maxq)


def _squared_error(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared reconstruction errors per row [M, 1], the codes [M, g])."""
    q = _codes(rows, scale, zero, maxq)
    error = rows - (q - zero) * scale
    return error.square().sum(dim=1, keepdim=True), q


def _as_fp32(params: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) [M] as fp32 columns [M, 1]."""
    scale, zero = params
    return scale.float().unsqueeze(1), zero.float().unsqueeze(1)


def _to_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the fp16 storage type, kept in fp32 for computing."""
    return x.to(SCALE_DTYPE).float()


def shrink_lp(error: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """Generalized soft-threshold: the proximal step of ``|e|^p / beta``, applied elementwise.

    ``sign(e) * relu(|e| - |e|^(p-1) / beta)``; p = 1 is the ordinary soft-threshold.
    """
    magnitude = error.abs()
    threshold = magnitude.clamp(min=1e-8).pow(lp_norm - 1) / beta
    return torch.sign(error) * torch.relu(magnitude - threshold)


def _hqq_params(rows: torch.Tensor, bits: int, iterations: int, lp_norm: float, beta: float, kappa: float,
                optimize_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ-optimized fp16 (scale, zero) [M] for the groups ``rows`` [M, g]."""
    maxq = (1 << bits) - 1
    scale, zero = _as_fp32(group_params(rows, bits))
    best_scale, best_zero = scale, zero
    best_error, q = _squared_error(rows, scale, zero, maxq)
    for _ in range(iterations):
        target = rows - shrink_lp(rows - (q - zero) * scale, beta, lp_norm)
        q_mean, target_mean = q.mean(dim=1, keepdim=True), target.mean(dim=1, keepdim=True)
        if optimize_scale:
            # Least-squares line target ~ s * q + c through the current codes; keep the old
            # scale where the fit is degenerate (one code only) or not positive.
            centered = q - q_mean
            variance = centered.square().mean(dim=1, keepdim=True)
            fitted = (centered * (target - target_mean)).mean(dim=1, keepdim=True) / variance.clamp(min=1e-12)
            usable = (variance > 0) & (fitted > 0) & torch.isfinite(fitted)
            scale = torch.where(usable, _to_fp16(fitted.clamp(min=1e-7)), scale)
        # With the codes fixed, this zero minimizes ||target - (q - z) s||^2 for the stored scale.
        zero = _to_fp16(q_mean - target_mean / scale)
        beta *= kappa
        error, q = _squared_error(rows, scale, zero, maxq)
        best_error, best_scale, best_zero = _keep_better(error, scale, zero, best_error, best_scale, best_zero)
    return best_scale.squeeze(1).to(SCALE_DTYPE), best_zero.squeeze(1).to(SCALE_DTYPE)


def _keep_better(error, scale, zero, best_error, best_scale, best_zero):
    """Per group, the (error, scale, zero) with the lower error."""
    better = error < best_error
    return (torch.where(better, error, best_error), torch.where(better, scale, best_scale),
            torch.where(better, zero, best_zero))


def _mse_params(rows: torch.Tensor, bits: int, grid: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) [M] of the clip factor with the lowest squared error per group."""
    maxq = (1 << bits) - 1
    low, high = rows.amin(dim=1), rows.amax(dim=1)
    best_scale, best_zero = _as_fp32(group_params(rows, bits))
    best_error, _ = _squared_error(rows, best_scale, best_zero, maxq)
    for factor in grid:
        # group_params of the two-column [low, high] * factor is RTN's for that clipped range.
        scale, zero = _as_fp32(group_params(torch.stack([low * factor, high * factor], dim=1), bits))
        error, _ = _squared_error(rows, scale, zero, maxq)
        best_error, best_scale, best_zero = _keep_better(error, scale, zero, best_error, best_scale, best_zero)
    return best_scale.squeeze(1).to(SCALE_DTYPE), best_zero.squeeze(1).to(SCALE_DTYPE)


def _quantize_groups(weight: torch.Tensor, bits: int, group_size: int | None,
                     fit: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] with the per-group parameters ``fit`` returns for [M, g] groups."""
    n, k = weight.shape
    g = effective_group_size(group_size, k)
    w = weight.detach().float()
    groups, full = packing.num_groups(k, g), k // g
    maxq = (1 << bits) - 1
    scales = torch.empty(n, groups, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    # Full groups as one [N * full, g] matrix (row-major: row n's groups are consecutive),
    # then the narrower last group, if any, as [N, K - full * g].
    parts = [(slice(0, full * g), slice(0, full))] if full else []
    if full < groups:
        parts.append((slice(full * g, k), slice(full, groups)))
    for cols, group_slice in parts:
        count = group_slice.stop - group_slice.start
        rows = w[:, cols].reshape(n * count, -1)
        scale, zero = fit(rows)
        q = _codes(rows, scale.float().unsqueeze(1), zero.float().unsqueeze(1), maxq)
        scales[:, group_slice], zeros[:, group_slice] = scale.view(n, count), zero.view(n, count)
        codes[:, cols] = q.view(n, -1).to(torch.uint8)
    return QuantizedWeight(packing.pack(codes, bits), scales, zeros, bits, g, k)


@torch.no_grad()
def quantize_hqq(weight: torch.Tensor, bits: int, group_size: int | None, *, iterations: int = 20,
                 lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 optimize_scale: bool = False) -> QuantizedWeight:
    """HQQ-quantize ``weight`` [N, K]: RTN's format with the zero point (and optionally the scale)
    of each (row, group) optimized for the lp-norm error, without calibration data.

    ``iterations`` half-quadratic steps start from RTN's min/max parameters; ``lp_norm`` is p,
    ``beta`` the initial penalty weight, multiplied by ``kappa`` per step. The threshold is in
    the weight's units, as in the paper: for LLM-sized weights (errors ~1e-3) and beta = 10 it
    exceeds every error, the shrunk error is 0 and each step is the least-squares zero for
    the current codes (alternating minimization of the squared error). ``optimize_scale``
    also refits the scale by least squares at each step (markedly lower error). Each group
    keeps its lowest-squared-error iterate, so the result is never worse than RTN.
    """
    return _quantize_groups(weight, bits, group_size,
                            lambda rows: _hqq_params(rows, bits, iterations, lp_norm, beta, kappa, optimize_scale))


@torch.no_grad()
def quantize_mse(weight: torch.Tensor, bits: int, group_size: int | None, *,
                 grid: tuple[float, ...] = MSE_GRID) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] with each group's [min, max] clipped by the ``grid`` factor
    (in (0, 1]) that gives that group the lowest squared error; RTN (factor 1) always competes.
    """
    return _quantize_groups(weight, bits, group_size, lambda rows: _mse_params(rows, bits, tuple(grid)))
