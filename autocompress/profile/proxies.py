"""Cheap proxies of sensitivity, and how well each one ranks units like the measurement does.

- ``fisher:<choice>``: the empirical-Fisher estimate of the loss increase, sum over calibration
  sequences of ``(dL/dW)^2 * (W - W_changed)^2`` over the unit's linear weights (the score
  NVIDIA Model Optimizer's AutoQuantize ranks layers by), for every choice that keeps the
  weight shapes (bit widths, sparsity, dropping the block).
- ``block_influence``: ShortGPT's 1 - cos(block input, block output), averaged over tokens.
- ``weight_kurtosis`` and ``weight_max_ratio`` (max |w| / mean |w|): outlier statistics.
- ``activation_norm``: mean L2 norm of the unit's input per token.

A model too large to measure exhaustively can be profiled by its best proxy; the Spearman
rank correlation stored in ``profile.json`` says how far that ranking can be trusted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.apply import DroppedBlock
from ..compress.quantize import QuantLinear
from ..models import adapter_for


def weight_stats(weights: list[torch.Tensor]) -> dict[str, float]:
    """Excess kurtosis and max|w| / mean|w| of the concatenated ``weights``."""
    flat = torch.cat([w.detach().reshape(-1).double() for w in weights])
    centred = flat - flat.mean()
    variance = centred.pow(2).mean()
    kurtosis = float(centred.pow(4).mean() / variance.pow(2) - 3.0) if variance > 0 else 0.0
    magnitude = flat.abs()
    mean = float(magnitude.mean())
    return {"weight_kurtosis": kurtosis, "weight_max_ratio": float(magnitude.max()) / mean if mean > 0 else 0.0}


def block_influence(block_input: torch.Tensor, block_output: torch.Tensor) -> float:
    """ShortGPT's block influence: 1 - mean cosine similarity of input and output hidden states."""
    cos = F.cosine_similarity(block_input.reshape(-1, block_input.shape[-1]).double(),
                              block_output.reshape(-1, block_output.shape[-1]).double(), dim=-1)
    return float(1.0 - cos.mean())


def mean_token_norm(hidden: torch.Tensor) -> float:
    """Mean L2 norm per token of hidden states [..., features]."""
    return float(hidden.reshape(-1, hidden.shape[-1]).double().norm(dim=-1).mean())


class LinearInputNorms:
    """Forward pre-hooks that record the mean per-token input norm of each linear of one block."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def hook_block(self, block: nn.Module, paths: list[str], prefix: str):
        """Register hooks on ``paths`` inside ``block``; returns the handles (remove them after)."""
        handles = []
        for path in paths:
            name = f"{prefix}.{path}"

            def hook(module, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                self.sums[name] = self.sums.get(name, 0.0) + float(x.norm(dim=-1).sum())
                self.counts[name] = self.counts.get(name, 0) + x.shape[0]

            handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
        return handles

    def mean(self, name: str) -> float:
        """Mean input norm per token of the linear ``name`` (full module path)."""
        return self.sums[name] / self.counts[name]


def squared_gradients(model: nn.Module, tokens: torch.Tensor, *, rows: int | None = None) -> dict[str, torch.Tensor]:
    """Sum over sequences of the squared next-token-loss gradient of every decoder linear weight.

    Keyed by the weight's module path (``model.layers.3.mlp.up_proj``). One sequence per
    backward pass, as AutoQuantize sums per-batch squared gradients; each gradient is folded
    into its accumulator as soon as it is ready, so at most one is alive.
    """
    adapter = adapter_for(model)
    linears = {f"{adapter.blocks_path}.{i}.{path}": block.get_submodule(path)
               for i, block in enumerate(adapter.blocks(model)) for path in adapter.linears.values()}
    linears = {name: module for name, module in linears.items() if type(module) is nn.Linear}
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {name: torch.zeros_like(module.weight) for name, module in linears.items()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in linears.items():
            module.weight.requires_grad_(True)

            def fold(param, name=name):
                sums[name] += param.grad.pow(2)
                param.grad = None

            handles.append(module.weight.register_post_accumulate_grad_hook(fold))
        for row in tokens[:rows]:
            with torch.enable_grad():
                logits = model(input_ids=row[None], use_cache=False).logits[0, :-1]
                loss = F.cross_entropy(logits.float(), row[1:])
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return sums


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The dense weight a (possibly quantized) linear computes with, or None for other modules."""
    if isinstance(module, QuantLinear):
        return module.dequantized_weight()
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return None


@torch.no_grad()
def fisher_score(squared_grads: dict[str, torch.Tensor], originals: dict[str, nn.Module],
                 changed: dict[str, nn.Module] | DroppedBlock) -> float | None:
    """Sum of grad^2 * (W - W_changed)^2 over the linears of one unit (full path -> module).

    ``changed`` maps the same paths to the modules that replace them, or is a
    :class:`DroppedBlock` (every weight removed). None when a shape changed (head or channel
    removal) or no gradient is known.
    """
    total = 0.0
    for name, original in originals.items():
        if name not in squared_grads:
            return None
        weight = original.weight.detach()
        if isinstance(changed, DroppedBlock):
            delta = weight
        else:
            new = dense_weight(changed[name])
            if new is None or new.shape != weight.shape:
                return None
            delta = weight - new
        total += float((squared_grads[name] * delta.pow(2)).sum())
    return total


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation, or None when it is undefined (fewer than 3 pairs, or a constant)."""
    from scipy.stats import spearmanr  # noqa: PLC0415

    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None
             and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho) if math.isfinite(rho) else None


def proxy_correlations(units, labels: list[str]) -> dict[str, float]:
    """Spearman of every proxy against the measured KL, keyed ``"<proxy> ~ <choice label>"``.

    Unit-level proxies are compared with each bit width's KL and with ``drop`` where present;
    ``fisher:<label>`` with the KL of the same label, and ``fisher ~ all choices`` pools every
    (unit, choice) pair that has both.
    """
    out: dict[str, float] = {}
    names = sorted({name for unit in units for name in unit.proxies if not name.startswith("fisher:")})
    compared = [label for label in labels if label.startswith("bits=") or label == "drop"]
    for name in names:
        for label in compared:
            rho = spearman([u.proxies.get(name) for u in units], [u.kl.get(label) for u in units])
            if rho is not None:
                out[f"{name} ~ {label}"] = rho
    pooled_x, pooled_y = [], []
    for label in labels:
        xs = [u.proxies.get(f"fisher:{label}") for u in units]
        ys = [u.kl.get(label) for u in units]
        rho = spearman(xs, ys)
        if rho is not None:
            out[f"fisher ~ {label}"] = rho
        pooled_x += xs
        pooled_y += ys
    rho = spearman(pooled_x, pooled_y)
    if rho is not None:
        out["fisher ~ all choices"] = rho
    return out
