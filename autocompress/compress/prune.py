"""Pruning: unstructured and 2:4 masks, attention heads, MLP channels and whole blocks.

Importance is activation-aware (Wanda: ``|W_ij| * ||x_j||_2``, the norm taken over the
calibration tokens) or plain magnitude. Structured pruning physically shrinks the weight
matrices, so the model is really smaller and faster.

Heads and grouped-query attention: we remove *whole key/value groups* (a KV head together
with the query heads that read it). Every kept group keeps all its query heads, so
``num_key_value_groups`` (queries per KV head) is unchanged, HF's ``view(..., -1, head_dim)``
reshapes keep working, and the KV cache shrinks too. The granularity is one group; for
multi-head attention (one query per KV head) that is one head.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models import FamilyAdapter, HeadLayout, adapter_for
from ..schedule import PruneScore, SparsityPattern


def pruned_count(total: int, ratio: float) -> int:
    """How many of ``total`` items a ``ratio`` removes (rounded; at least one is kept)."""
    return min(int(round(ratio * total)), total - 1)


def kept_heads(layout: HeadLayout, ratio: float) -> HeadLayout:
    """The head layout after removing ``ratio`` of the key/value groups."""
    kv = layout.num_kv_heads - pruned_count(layout.num_kv_heads, ratio)
    return HeadLayout(kv * layout.group_size, kv, layout.head_dim)


def kept_channels(channels: int, ratio: float) -> int:
    """MLP intermediate channels left after removing ``ratio`` of them."""
    return channels - pruned_count(channels, ratio)


# ---------------------------------------------------------------------------------------
# Unstructured and N:M


def weight_scores(weight: torch.Tensor, input_sqnorm: torch.Tensor | None, score: PruneScore) -> torch.Tensor:
    """Importance of each weight [N, K]: |W| (magnitude) or |W| * ||x_j||_2 (Wanda)."""
    scores = weight.detach().float().abs()
    if score is PruneScore.WANDA:
        if input_sqnorm is None:
            raise ValueError("Wanda scores need the input norms from calibration")
        scores = scores * input_sqnorm.float().sqrt().reshape(1, -1)
    return scores


def sparsity_mask(scores: torch.Tensor, pattern: SparsityPattern, ratio: float) -> torch.Tensor:
    """Boolean mask [N, K], True where a weight is pruned.

    Unstructured prunes ``round(ratio * K)`` lowest scores in every output row (Wanda's
    per-output comparison group); 2:4 prunes the 2 lowest of every 4 consecutive inputs.
    """
    n, k = scores.shape
    if pattern is SparsityPattern.NONE or (pattern is SparsityPattern.UNSTRUCTURED and ratio == 0):
        return torch.zeros(n, k, dtype=torch.bool, device=scores.device)
    if pattern is SparsityPattern.TWO_FOUR:
        if k % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {k}")
        groups = scores.reshape(n, k // 4, 4)
        lowest = groups.topk(2, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
        return mask.reshape(n, k)
    count = int(round(ratio * k))
    mask = torch.zeros(n, k, dtype=torch.bool, device=scores.device)
    if count:
        mask.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
    return mask


# ---------------------------------------------------------------------------------------
# Shrinking linears


def shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding only the given output ``rows`` and input ``cols``."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` inside ``root``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _attention_module(adapter: FamilyAdapter, block: nn.Module) -> nn.Module:
    path = adapter.linears["o"].rpartition(".")[0]
    return block.get_submodule(path)


def head_group_scores(o_weight: torch.Tensor, o_input_sqnorm: torch.Tensor | None, layout: HeadLayout,
                      score: PruneScore) -> torch.Tensor:
    """Importance of each key/value group [num_kv_heads].

    A head's importance is the sum over its ``head_dim`` input columns of o_proj of
    ``||x_j||_2 * ||W_o[:, j]||_2`` (Wanda) or ``||W_o[:, j]||_2`` (magnitude): how much that
    head's output can move the residual stream. A group sums its query heads.
    """
    column = o_weight.detach().float().norm(dim=0)
    if score is PruneScore.WANDA and o_input_sqnorm is not None:
        column = column * o_input_sqnorm.float().sqrt()
    per_head = column.reshape(layout.num_heads, layout.head_dim).sum(dim=1)
    return per_head.reshape(layout.num_kv_heads, layout.group_size).sum(dim=1)


def channel_scores(down_weight: torch.Tensor, down_input_sqnorm: torch.Tensor | None, score: PruneScore) -> torch.Tensor:
    """Importance of each MLP channel: ``||a_j||_2 * ||W_down[:, j]||_2`` (Wanda) or the column norm."""
    column = down_weight.detach().float().norm(dim=0)
    if score is PruneScore.WANDA and down_input_sqnorm is not None:
        column = column * down_input_sqnorm.float().sqrt()
    return column


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order."""
    return scores.topk(keep).indices.sort().values


def prune_heads(block: nn.Module, adapter: FamilyAdapter, layout: HeadLayout, keep_groups: torch.Tensor) -> torch.Tensor:
    """Keep only the key/value groups ``keep_groups`` (with their query heads) of ``block``.

    Query, key, value rows and output-projection columns shrink; the attention module's
    head-count attributes follow. Returns the kept input columns of the output projection.
    """
    hd, gs = layout.head_dim, layout.group_size
    keep_groups = keep_groups.to(torch.long)
    q_heads = (keep_groups[:, None] * gs + torch.arange(gs)).reshape(-1)
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    kv_rows = (keep_groups[:, None] * hd + torch.arange(hd)).reshape(-1)
    linears = adapter.block_linears(block)
    if "qkv" in linears:
        q_width, kv_width = layout.num_heads * hd, layout.num_kv_heads * hd
        rows = torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])
        set_submodule(block, adapter.linears["qkv"], shrink_linear(linears["qkv"], rows=rows))
    else:
        set_submodule(block, adapter.linears["q"], shrink_linear(linears["q"], rows=q_rows))
        set_submodule(block, adapter.linears["k"], shrink_linear(linears["k"], rows=kv_rows))
        set_submodule(block, adapter.linears["v"], shrink_linear(linears["v"], rows=kv_rows))
    set_submodule(block, adapter.linears["o"], shrink_linear(linears["o"], cols=q_rows))
    new = HeadLayout(len(q_heads), len(keep_groups), hd)
    set_head_attributes(block, adapter, new)
    return q_rows


def set_head_attributes(block: nn.Module, adapter: FamilyAdapter, layout: HeadLayout) -> None:
    """Make the attention module of ``block`` agree with ``layout`` (after pruning or on load)."""
    attn = _attention_module(adapter, block)
    width = layout.num_heads * layout.head_dim
    for name, value in (("num_heads", layout.num_heads), ("num_attention_heads", layout.num_heads),
                        ("num_key_value_heads", layout.num_kv_heads), ("split_size", width)):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    if adapter.family == "phi3":
        # Phi-3 slices its fused qkv with config.num_attention_heads, a model-wide value, so a
        # pruned block carries its own copy of the config.
        config = copy.copy(attn.config)
        config.num_attention_heads, config.num_key_value_heads = layout.num_heads, layout.num_kv_heads
        attn.config = config


def prune_channels(block: nn.Module, adapter: FamilyAdapter, keep: torch.Tensor) -> None:
    """Keep only MLP intermediate channels ``keep`` of ``block`` (up/gate rows, down columns)."""
    keep = keep.to(torch.long)
    linears = adapter.block_linears(block)
    if "gate_up" in linears:
        width = linears["down"].in_features
        set_submodule(block, adapter.linears["gate_up"],
                      shrink_linear(linears["gate_up"], rows=torch.cat([keep, width + keep])))
    for role in ("gate", "up"):
        if role in linears:
            set_submodule(block, adapter.linears[role], shrink_linear(linears[role], rows=keep))
    set_submodule(block, adapter.linears["down"], shrink_linear(linears["down"], cols=keep))
    set_channel_attributes(block, adapter, len(keep))


def set_channel_attributes(block: nn.Module, adapter: FamilyAdapter, channels: int) -> None:
    """Make the MLP module's size attributes agree with ``channels`` (only bookkeeping)."""
    mlp = block.get_submodule(adapter.linears["down"].rpartition(".")[0]) if "." in adapter.linears["down"] else block
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = channels


# ---------------------------------------------------------------------------------------
# Depth


def drop_blocks(model: nn.Module, indices: set[int] | list[int]) -> None:
    """Remove decoder blocks ``indices`` from ``model`` in place, keeping the KV cache consistent.

    The remaining blocks get consecutive ``layer_idx`` values (caches index layers by them),
    and ``config.num_hidden_layers`` / ``config.layer_types`` shrink to match.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    drop = set(indices)
    kept = [i for i in range(len(blocks)) if i not in drop]
    new_list = nn.ModuleList([blocks[i] for i in kept])
    set_submodule(model, adapter.blocks_path, new_list)
    for new_index, block in enumerate(new_list):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)

