"""Align the target's blocks to the source's blocks by what they do, not only where they sit.

Relative depth places target block ``i`` of ``n`` at ``i / (n - 1)``. That is right for a model
of the same shape, and wrong for one with blocks removed from the middle: every block after the
gap slides towards the front and takes the choice of a source block it has nothing to do with.

A block's **signature** is cheap to measure with one forward pass on a few calibration tokens:
ShortGPT's block influence, ``1 - cos(block input, block output)`` averaged over tokens. It has
a recognisable shape over depth (the first block rewrites the embedding, a few "hub" blocks and
the last blocks stand out) that survives dropping and narrowing blocks. :func:`align_blocks`
finds the monotone map of target blocks onto source blocks that matches the two signatures
best (dynamic programming over ``log`` influence plus a small pull towards equal relative
depth), so a kept block maps to the source block it came from, and each target block inherits
the relative depth of its source block (:func:`aligned_depths`). Without a signature on either
side transfer falls back to plain relative depth.

Example::

    source_sig = block_signature(source_model, tokens)      # stored by describe()
    target_sig = block_signature(target_model, tokens)
    align_blocks(source_sig, target_sig)                  # e.g. [0, 1, 2, 4, 5] (block 3 dropped)
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

# Weight of the squared relative-depth difference against the squared log-influence difference:
# small enough that a clear signature wins, large enough to decide between look-alike blocks.
DEPTH_WEIGHT = 1.0
_FLOOR = 1e-4  # influence below this is noise; also keeps log finite


def block_signature(model, tokens: torch.Tensor, *, seq_len: int = 256, rows: int = 4,
                    bos: int | None = None) -> list[float]:
    """Block influence of every decoder block of ``model`` on ``rows`` windows of ``seq_len`` of
    ``tokens`` (1-D ids; each window BOS first with the tokenizer's ``bos`` id), from one
    forward pass with hooks on the blocks."""
    from ..compress.calibrate import block_output, token_batch  # noqa: PLC0415
    from ..models import adapter_for  # noqa: PLC0415

    blocks = list(adapter_for(model).blocks(model))
    if not blocks:
        raise UserError("the model has no decoder blocks; transfer needs a decoder-only transformer")
    seq_len = max(1, min(seq_len, tokens.numel()))
    batch = token_batch(tokens, seq_len, min(rows, max(1, tokens.numel() // seq_len)), bos=bos)
    sums = [0.0] * len(blocks)

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = block_output(output)
            cos = torch.nn.functional.cosine_similarity(hidden_in.reshape(-1, hidden_in.shape[-1]).double(),
                                                        hidden_out.reshape(-1, hidden_out.shape[-1]).double(), dim=-1)
            sums[index] += float(1.0 - cos.mean())
        return hook

    handles = [block.register_forward_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _feature(signature: list[float]) -> list[float]:
    return [math.log(max(float(v), _FLOOR)) for v in signature]


def _depth(index: int, count: int) -> float:
    return index / (count - 1) if count > 1 else 0.0


def align_blocks(source: list[float], target: list[float], *, depth_weight: float = DEPTH_WEIGHT) -> list[int]:
    """For each target block, the source block it matches: a monotone map minimising the summed
    squared difference of ``log`` signatures plus ``depth_weight`` times the squared difference of
    relative depths. Target blocks map to distinct source blocks when the target is not deeper
    than the source (a model with blocks removed), else several may share one."""
    m, n = len(source), len(target)
    if m == 0 or n == 0:
        raise UserError("block alignment needs at least one block on each side")
    fs, ft = _feature(source), _feature(target)
    cost = [[(ft[i] - fs[j]) ** 2 + depth_weight * (_depth(i, n) - _depth(j, m)) ** 2 for j in range(m)]
            for i in range(n)]
    strict = n <= m
    inf = float("inf")
    best = [[inf] * m for _ in range(n)]
    back = [[-1] * m for _ in range(n)]
    best[0] = list(cost[0])
    for i in range(1, n):
        # running minimum over the allowed predecessors j' < j (strict) or j' <= j
        low, arg = inf, -1
        for j in range(m):
            if not strict and best[i - 1][j] < low:
                low, arg = best[i - 1][j], j
            if low < inf:
                best[i][j], back[i][j] = low + cost[i][j], arg
            if strict and best[i - 1][j] < low:
                low, arg = best[i - 1][j], j
    j = min(range(m), key=lambda k: best[n - 1][k])
    path = [j]
    for i in range(n - 1, 0, -1):
        j = back[i][j]
        path.append(j)
    return path[::-1]


def aligned_depths(source: list[float], target: list[float], **options) -> list[float]:
    """Relative depth (in the source) of the source block each target block aligns to."""
    return [_depth(j, len(source)) for j in align_blocks(source, target, **options)]


def signature_from_profile(profile) -> list[float] | None:
    """Per-block influence from a profile's ``block_influence`` proxies (any unit of the block),
    or None when the profile does not hold it for every block."""
    values: dict[int, float] = {}
    for unit in profile.units:
        value = unit.proxies.get("block_influence") if unit.proxies else None
        if value is not None and math.isfinite(value) and unit.block >= 0:
            values.setdefault(unit.block, float(value))
    if not values or sorted(values) != list(range(max(values) + 1)):
        return None
    return [values[i] for i in range(len(values))]


__all__ = ["block_signature", "align_blocks", "aligned_depths", "signature_from_profile", "DEPTH_WEIGHT"]
